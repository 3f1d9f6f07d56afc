"""Can a folder be written? Tried for real, before the work that would fill it.

Permission bits alone do not tell: root ignores them, while a read-only file system or an immutable
folder refuses root too. So a folder is created if missing (as the run would create it) and a small
temporary file is made and removed in it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from sdtune.errors import UserError


def write_problem(folder: str | Path, created: list[Path] | None = None) -> str | None:
    """Why `folder` cannot be written (e.g. "Read-only file system"), or None when it can. Folders
    made on the way are appended to `created`, outermost first."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    if created is not None:
        created.extend(missing)
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sdtune-write-check-"):
            pass  # made and removed: a probe, not a file to keep
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def holds_entries(folder: Path) -> bool:
    """Whether a cache folder already holds entries (anywhere below it)."""
    return folder.is_dir() and next(folder.rglob("*.safetensors"), None) is not None


def cache_refusal(folder: Path, problem: str, what: str, needed: str) -> UserError:
    needed = f"; {needed}" if needed else ""
    return UserError(f"cannot write {what} ({problem}){needed}", where=str(folder),
                     fix="Give --cache_dir a folder on writable storage (without it the cache is kept beside the "
                         "images), or make this folder writable.")


def check_cache_folders(folders: Iterable[Path], what: str) -> None:
    """Refuse at once a cache folder that will be written and cannot be: one that holds no entries
    yet. One that does is left alone and not written to here: a complete cache is read without
    writing, so it may live on read-only storage; the cache refuses before encoding when it has
    something to write there and cannot."""
    for folder in dict.fromkeys(Path(f) for f in folders):
        if holds_entries(folder):
            continue
        problem = write_problem(folder)
        if problem:
            raise cache_refusal(folder, problem, what, "")
