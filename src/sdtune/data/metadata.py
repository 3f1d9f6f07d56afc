"""Metadata records for training: each key's image file and its typed, checked fields.

Reading the file and resolving keys to images is `sdtune.metadata`'s job (shared with the
preparation commands). `train_resolution` (`[w, h]`, the bucket prepare_buckets_latents.py chose)
and `sdtune_latents` (how sdtune's prepare step cached the image's latents, see
`sdtune.data.prepared`) are read; other fields are tolerated and ignored. No torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import UserError
from sdtune.metadata import IMAGE_EXTENSIONS, read_metadata, resolve_key

__all__ = ["MetadataRecord", "load_records", "resolve_key"]


@dataclass(frozen=True, slots=True)  # slots: a million records fit in a fraction of the memory
class MetadataRecord:
    key: str
    file: str  # the image's path as pathlib spells it; a Path for each of a million records costs seconds
    caption: str | None
    tags: str | None
    image_size: tuple[int, int] | None
    train_resolution: tuple[int, int] | None = None
    prepared_latents: dict | None = None

    @property
    def path(self) -> Path:
        return Path(self.file)


def _text(value, key: str, field: str, where: str) -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # some taggers write tag lists
    if not isinstance(value, str):
        raise UserError(f"{field!r} of {key!r} is a {type(value).__name__}, expected text", where=where,
                        fix=f'Write it as a string: "{field}": "...".')
    return value


def _size(value, key: str, where: str, field: str = "image_size") -> tuple[int, int] | None:
    if value is None:
        return None
    if type(value) is list and len(value) == 2:  # the usual [w, h], checked without generators
        w, h = value
        if type(w) is int and type(h) is int and w > 0 and h > 0:
            return w, h
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


class _Listings:
    """`resolve_key` over folder listings: each folder is listed once, so a million keys cost a few
    listings instead of about four million file-status calls (on network storage, round trips).

    A listing only ever confirms a file that exists; a key it does not find goes to `resolve_key`
    itself, which then decides (a folder that cannot be listed, a case-insensitive file system where
    the key's case differs from the name on disk). Candidates are tried in `resolve_key`'s order.
    """

    def __init__(self):
        self._names: dict[str, frozenset[str] | None] = {}
        # resolve_key's order of extensions for a stem
        self._suffixes = tuple(s for ext in IMAGE_EXTENSIONS for s in (ext, ext.upper()))

    def _listing(self, folder: str) -> frozenset[str] | None:
        names = self._names.get(folder, False)
        if names is False:
            names = self._names[folder] = self._list(folder or ".")
        return names

    def _has(self, folder: str, name: str) -> bool:
        names = self._listing(folder)
        return name in names if names is not None else os.path.isfile(os.path.join(folder, name))

    def _stem(self, key: str, root: str) -> str | None:
        """A bare file stem (the usual key: no folder, no dot, no ~) found in the image folder's
        listing: the first candidate `resolve` would try for it, without the path handling a million
        keys pay for (about a third of planning a million images)."""
        names = self._listing(root)
        if names:
            for suffix in self._suffixes:
                if key + suffix in names:
                    return _join(root, key + suffix)
        return None

    @staticmethod
    def _list(folder: str) -> frozenset[str] | None:
        try:
            with os.scandir(folder) as entries:
                return frozenset(e.name for e in entries if e.is_file())
        except OSError:
            return None

    def resolve(self, key: str, root: str | None) -> str | None:
        """`root` is the image folder as pathlib spells it (`str(Path(...))`)."""
        if (root is not None and key and "." not in key and key[0] != "~" and os.sep not in key
                and not (os.altsep and os.altsep in key)):
            found = self._stem(key, root)
            if found is not None:
                return found
        as_is = _normal(os.path.expanduser(key))
        if as_is not in ("", "."):
            # both candidates end in the key's file name: only their folders differ
            folder, name = os.path.split(as_is) if os.sep in as_is else ("", as_is)
            folders = [folder]
            if root is not None and not os.path.isabs(as_is):
                folders.append(os.path.join(root, folder) if folder else root)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                for f in folders:
                    if self._has(f, name):
                        return _join(f, name)
            for f in reversed(folders):
                for ext in IMAGE_EXTENSIONS:
                    for candidate in (name + ext, name + ext.upper()):
                        if self._has(f, candidate):
                            return _join(f, candidate)
        found = resolve_key(key, None if root is None else Path(root))  # the rare rest, by the one rule
        return None if found is None else str(found)


def _join(folder: str, name: str) -> str:
    """os.path.join for a folder in pathlib's spelling and a plain name, without its generality."""
    if not folder:
        return name
    return folder + name if folder.endswith(os.sep) else folder + os.sep + name


def _normal(path: str) -> str:
    """The path as pathlib spells it (no doubled or trailing separators, no "." parts), as
    `resolve_key` builds its candidates; a plain file name needs no work."""
    if os.sep in path or (os.altsep and os.altsep in path) or path in ("", ".") or path.startswith("."):
        return str(Path(path))
    return path


def load_records(metadata_file: str | Path, image_dir: str | Path | None) -> list[MetadataRecord]:
    """All records of a metadata file with their image paths; every listed image must exist."""
    where = str(metadata_file)
    raw = read_metadata(metadata_file)
    root = Path(image_dir).expanduser() if image_dir else None
    if root is not None and not root.is_dir():
        raise UserError("image folder not found", where=str(root), fix="Check image_dir / --train_data_dir.")
    records, missing = [], []
    listings, folder = _Listings(), None if root is None else str(root)
    for key, value in raw.items():
        path = listings.resolve(key, folder)
        if path is None:
            missing.append(key)
            continue
        # positional, and absent fields skip their checks: a million records add up
        bucket, prepared = value.get("train_resolution"), value.get("sdtune_latents")
        records.append(MetadataRecord(
            key, path, _text(value.get("caption"), key, "caption", where), _text(value.get("tags"), key, "tags", where),
            _size(value.get("image_size"), key, where),
            None if bucket is None else _bucket(bucket, key, where),
            None if prepared is None else _prepared(prepared, key, where)))
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
