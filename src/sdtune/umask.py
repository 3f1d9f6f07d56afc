"""Permissions of the files sdtune creates through temporary names.

`tempfile.mkstemp` makes files readable by their owner only (0600) and `mkdtemp` folders 0700,
whatever the user's umask: a model saved that way could not be read by another account or a web UI
running as another user. Renamed into place, a file must have the mode any other file the user
creates gets: 0666 (folders 0777) less the umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def _current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (at import, before any threads)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()


def give_default_mode(path: str | Path, *, directory: bool = False) -> None:
    """chmod `path` to what a plain open()/mkdir() would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)
