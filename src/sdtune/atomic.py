"""Writing a text file so that a crash never leaves it half-written: a temporary sibling, then a rename.

Below every package that writes small text files (metadata, captions, config dumps), so that none of
them has to import another's helpers for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sdtune.umask import give_default_mode

__all__ = ["atomic_write_text"]


def atomic_write_text(path: str | Path, text: str, backup: bool = False) -> Path | None:
    """Write `text` to `path` via a temp file in the same folder; returns the backup path if made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup_path = None
    if backup and path.exists():
        backup_path = path.with_name(path.name + ".bak")
        shutil.copy2(path, backup_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        give_default_mode(tmp)  # mkstemp makes it owner-only
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup_path
