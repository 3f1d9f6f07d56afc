"""`merge_metadata`: caption and tag files into one metadata JSON/JSONL file.

One pass does what sd-scripts' merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py do
in two: `<stem>.caption` -> "caption", `<stem>.txt` -> "tags". An image without one of the files
is counted and listed, not a crash (sd-scripts reads the file before checking that it exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import UserError
from sdtune.metadata import check_metadata_name, read_metadata, write_metadata
from sdtune.prep.files import check_unique_keys, find_images, image_key, normalize_extension, read_text, sidecar


@dataclass
class MergeResult:
    images: int = 0
    captions: int = 0
    tags: int = 0
    missing_captions: list[Path] = field(default_factory=list)
    missing_tags: list[Path] = field(default_factory=list)
    backup: Path | None = None


def merge_metadata(train_data_dir: str | Path, out_json: str | Path, *, in_json: str | Path | None = None,
                   captions: bool = True, tags: bool = True, caption_extension: str = ".caption",
                   tags_extension: str = ".txt", full_path: bool = False, recursive: bool = False) -> MergeResult:
    """Read the caption and/or tag file of every image and write them into `out_json`.

    The starting metadata is `in_json`, else `out_json` itself when it exists (updated in place; the
    previous file is kept as `<out_json>.bak`), else empty. Keys are the file stem, or the image path
    as found with `full_path` (needed with `recursive`, where stems could repeat).
    """
    if not captions and not tags:
        raise UserError("nothing to merge", fix="Merge captions, tags or both.")
    if recursive and not full_path:
        raise UserError("--recursive needs --full_path", where="--recursive",
                        fix="Add --full_path so images in different folders cannot share a key.")
    out_json = check_metadata_name(out_json, "out_json")
    caption_extension = normalize_extension(caption_extension)
    tags_extension = normalize_extension(tags_extension, "--tags_extension")
    if captions and tags and caption_extension == tags_extension:
        raise UserError(f"captions and tags would both be read from {caption_extension} files",
                        where="--caption_extension", fix="Give them different extensions, or merge only one kind.")
    images = find_images(train_data_dir, recursive)
    check_unique_keys(images, full_path)

    source = Path(in_json) if in_json else out_json if out_json.exists() else None
    meta = read_metadata(source) if source is not None else {}

    result = MergeResult(images=len(images))
    for image in images:
        record = meta.setdefault(image_key(image, full_path), {})
        if captions:
            text = _read_sidecar(image, caption_extension)
            if text is None:
                result.missing_captions.append(image)
            else:
                record["caption"] = text
                result.captions += 1
        if tags:
            text = _read_sidecar(image, tags_extension)
            if text is None:
                result.missing_tags.append(image)
            else:
                record["tags"] = text
                result.tags += 1
    result.backup = write_metadata(out_json, meta)
    return result


def _read_sidecar(image: Path, extension: str) -> str | None:
    path = sidecar(image, extension)
    if not path.is_file():
        return None
    return read_text(path).strip()
