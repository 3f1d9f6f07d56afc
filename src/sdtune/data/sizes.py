"""Image sizes for images whose metadata has none: read from the headers in parallel threads and,
when the user chose disk caches (--cache_latents_to_disk or --cache_dir), kept in
`image-sizes.json` in the latent cache's folder of each image folder, so that a later plan of the
same images opens none of them.

An entry holds the file's modification time (ns) and length with the size; a file changed since is
read again. Unreadable images are never cached (their message comes from a fresh read). The cache is
an optimisation: a damaged file is ignored and rewritten, and one that cannot be written is left
alone (the cache folder's writability is checked before training anyway). No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdtune.atomic import write_text
from sdtune.data.buckets import Size
from sdtune.data.images import BadImage, read_size

SIZES_FILE = "image-sizes.json"
CACHE_FOLDER = ".sdtune-cache"


def cache_file(image: Path, cache_dir: str | None) -> Path:
    """Where the sizes of `image`'s folder are kept: the latent cache's folder for that image folder
    (the rule of latent_cache.cache_folder, which cannot be imported here: that module imports the plan)."""
    if cache_dir is None:
        return image.parent / CACHE_FOLDER / SIZES_FILE
    tag = hashlib.sha256(str(image.parent.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{image.parent.name or 'root'}-{tag}" / SIZES_FILE


def read_sizes(paths: list[Path], workers: int, *, disk: bool = False,
               cache_dir: str | None = None) -> list[Size | BadImage]:
    """The size of each image (or its BadImage), in order; cached on disk when `disk`."""
    if not disk:
        return _map(_read, paths, workers)
    files: dict[Path, dict] = {}
    for p in paths:
        where = cache_file(p, cache_dir)
        if where not in files:
            files[where] = _load(where)

    def one(p: Path):
        try:
            st = os.stat(p)
        except OSError:
            return _read(p), None
        entry = files[cache_file(p, cache_dir)].get(p.name)
        if entry and entry[0] == st.st_mtime_ns and entry[1] == st.st_size:
            return (entry[2], entry[3]), None
        size = _read(p)
        return size, (None if isinstance(size, BadImage) else [st.st_mtime_ns, st.st_size, *size])

    results = _map(one, paths, workers)
    new: dict[Path, dict] = defaultdict(dict)
    for p, (_size, entry) in zip(paths, results):
        if entry is not None:
            new[cache_file(p, cache_dir)][p.name] = entry
    for where, entries in new.items():
        _save(where, {**files[where], **entries})
    return [size for size, _entry in results]


def _read(p: Path) -> Size | BadImage:
    try:
        return read_size(p)
    except BadImage as exc:
        return exc


def _map(fn, paths: list[Path], workers: int) -> list:
    if len(paths) < 64 or workers <= 1:
        return [fn(p) for p in paths]
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, paths), total=len(paths), desc="reading image sizes", unit="img",
                         leave=False, disable=None))


def _load(where: Path) -> dict:
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(v, list) and len(v) == 4 and all(type(x) is int for x in v) and v[2] > 0 and v[3] > 0}


def _save(where: Path, entries: dict) -> None:
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        write_text(where, json.dumps(entries, separators=(",", ":")))
    except OSError:
        pass  # an optimisation only: the next plan reads the headers again
