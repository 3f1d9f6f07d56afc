"""Metadata records for training: each key's image file and its typed, checked fields.

Reading the file and resolving keys to images is `sdtune.metadata`'s job (shared with the
preparation commands). `train_resolution` (`[w, h]`, the bucket prepare_buckets_latents.py chose)
and `sdtune_latents` (how sdtune's prepare step cached the image's latents, see
`sdtune.data.prepared`) are read; other fields are tolerated and ignored. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import UserError
from sdtune.metadata import read_metadata, resolve_key

__all__ = ["MetadataRecord", "load_records", "resolve_key"]


@dataclass(frozen=True)
class MetadataRecord:
    key: str
    path: Path
    caption: str | None
    tags: str | None
    image_size: tuple[int, int] | None
    train_resolution: tuple[int, int] | None = None
    prepared_latents: dict | None = None


def _text(value, key: str, field: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # some taggers write tag lists
    if not isinstance(value, str):
        raise UserError(f"{field!r} of {key!r} is a {type(value).__name__}, expected text", where=where,
                        fix=f'Write it as a string: "{field}": "...".')
    return value


def _size(value, key: str, where: str, field: str = "image_size") -> tuple[int, int] | None:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    fix = ("Fix or remove it (sizes are read from the image when absent)." if field == "image_size"
           else "Run prepare_buckets_latents.py again, or remove it.")
    raise UserError(f"{field} of {key!r} is {value!r}, expected [width, height]", where=where, fix=fix)


def _bucket(value, key: str, where: str) -> tuple[int, int] | None:
    size = _size(value, key, where, field="train_resolution")
    if size is not None and (size[0] % 8 or size[1] % 8):
        raise UserError(f"train_resolution of {key!r} is {list(size)}, not a multiple of 8 (the VAE downsamples by 8)",
                        where=where, fix="Run prepare_buckets_latents.py again, or remove train_resolution.")
    return size


def _prepared(value, key: str, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"sdtune_latents of {key!r} is a {type(value).__name__}, expected an object", where=where,
                        fix="Run prepare_buckets_latents.py again, or remove sdtune_latents.")
    return value


def load_records(metadata_file: str | Path, image_dir: str | Path | None) -> list[MetadataRecord]:
    """All records of a metadata file with their image paths; every listed image must exist."""
    where = str(metadata_file)
    raw = read_metadata(metadata_file)
    root = Path(image_dir).expanduser() if image_dir else None
    if root is not None and not root.is_dir():
        raise UserError("image folder not found", where=str(root), fix="Check image_dir / --train_data_dir.")
    records, missing = [], []
    for key, value in raw.items():
        path = resolve_key(key, root)
        if path is None:
            missing.append(key)
            continue
        records.append(MetadataRecord(
            key=key, path=path,
            caption=_text(value.get("caption"), key, "caption", where),
            tags=_text(value.get("tags"), key, "tags", where),
            image_size=_size(value.get("image_size"), key, where),
            train_resolution=_bucket(value.get("train_resolution"), key, where),
            prepared_latents=_prepared(value.get("sdtune_latents"), key, where)))
    if missing:
        listed = ", ".join(repr(k) for k in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        if root is None and any(not Path(k).is_absolute() for k in missing):
            fix = (f"The keys are relative and not found from the working directory ({Path.cwd()}): set image_dir "
                   "in the subset (or --train_data_dir), or run from the folder the keys start from.")
        else:
            fix = (f"Check that the images are in {root or 'the named folders'} and that the keys match their names "
                   f"(keys with folders, as --full_path writes them, are also tried from {Path.cwd()}).")
        raise UserError(f"{len(missing)} of {len(raw)} images in the metadata were not found: {listed}{more}",
                        where=where, fix=fix)
    if not records:
        raise UserError("the metadata lists no images", where=where,
                        fix="Write the images' captions into it with `sdtune merge` (or sd-scripts' merge scripts).")
    return records
