"""sd-scripts metadata files: the one reader and writer, and how a key names an image file.

Formats:
  * JSON  (`*.json`):  `{"<key>": {"caption"?, "tags"?, "image_size"?: [w, h], ...}, ...}`
  * JSONL (`*.jsonl`): one `{"image_path": "<key>", "caption"?, "tags"?, "image_size"?, ...}` per line.
Both are read into the same `{key: record}` dict (file order kept; a JSONL record's `image_path` is
its key and is not repeated in the record) and written back in the format the file name asks for,
atomically, the previous file kept as `<name>.bak`.

The preparation commands (`sdtune.prep`) write these files and training (`sdtune.data`) reads them;
this module sits below both so that each accepts exactly the files the other writes, without either
importing the other. Key resolution (`resolve_key`) tries, in this order:

1. the key as a path as it stands: absolute, or relative to the working directory. This is what the
   `--full_path` preparation steps write when given a relative image folder (`train_data/a.png`), and
   what sd-scripts' fine-tuning dataset tried first when its documented workflow was written;
2. relative to the subset's image folder (sd-scripts today);
3. a stem or a path without extension, by trying the image extensions, in the image folder and then
   as it stands (the merge scripts' keys without `--full_path`).

No torch, no PIL.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.atomic import atomic_write_text
from sdtune.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "is_jsonl", "check_metadata_name", "read_metadata", "write_metadata", "resolve_key"]

# sd-scripts' list, matched case-insensitively: what preparation looks for in a folder and what a
# metadata key without extension is completed with.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def check_metadata_name(path: str | Path, option: str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise UserError("metadata file must end in .json or .jsonl", where=f"{option} {path}",
                        fix="Name it e.g. meta_cap.json (or .jsonl for one record per line).")
    return path


def read_metadata(path: str | Path) -> dict[str, dict]:
    """The metadata as `{key: record}`, in file order; a bad file is a UserError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError("metadata file not found", where=str(path), fix="Check metadata_file / --in_json.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("metadata file is not UTF-8 text", where=str(path),
                        fix="Re-save it as UTF-8 (sdtune merge and the sd-scripts tools write UTF-8).") from None
    if is_jsonl(path):
        return _read_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", where=str(path),
                        fix="Fix the file, or name it .jsonl if it holds one record per line.") from None
    if not isinstance(data, dict):
        raise UserError(f"the top level is a {type(data).__name__}, expected an object keyed by image",
                        where=str(path), fix='Write {"image.png": {"caption": "..."}, ...}.')
    for key, value in data.items():
        if not isinstance(value, dict):
            raise UserError(f"the entry of {key!r} is a {type(value).__name__}, expected an object",
                            where=str(path), fix='Write {"caption": "...", "tags": "..."}.')
    return data


def _read_jsonl(text: str, path: Path) -> dict[str, dict]:
    data: dict[str, dict] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {lineno} is not valid JSON ({exc.msg})", where=str(path),
                            fix="Fix that line, or name the file .json if it holds one JSON object.") from None
        if not isinstance(record, dict) or not isinstance(record.get("image_path"), str):
            raise UserError(f"line {lineno} has no \"image_path\" string", where=str(path),
                            fix='Each line must be {"image_path": "...", "caption": "..."}.')
        key = record.pop("image_path")
        data[key] = record
    return data


def write_metadata(path: str | Path, meta: dict[str, dict]) -> Path | None:
    """Write `{key: record}` as JSON or JSONL (by suffix), atomically; returns the backup path if any."""
    path = Path(path)
    if is_jsonl(path):
        text = "".join(json.dumps({"image_path": k, **v}, ensure_ascii=False) + "\n" for k, v in meta.items())
    else:
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text, backup=True)


def resolve_key(key: str, image_dir: Path | None) -> Path | None:
    """The image file a metadata key names, or None when none exists (order: see the module doc)."""
    as_is = Path(key).expanduser()
    paths = [as_is]
    if image_dir is not None and not as_is.is_absolute():
        paths.append(image_dir / as_is)
    for p in paths:
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            return p
    for p in reversed(paths):  # a stem names an image of the image folder first
        for ext in IMAGE_EXTENSIONS:
            for cand in (p.with_name(p.name + ext), p.with_name(p.name + ext.upper())):
                if cand.is_file():
                    return cand
    for p in paths:  # an image with an unusual extension named explicitly: let PIL judge it
        if p.is_file():
            return p
    return None
