"""One error type for user mistakes.

Code anywhere below the CLI raises `UserError` for anything the user can fix (a missing file, a bad
value, an unsupported option). The CLI prints it as one line and exits with status 2; `--debug`
shows the traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """A mistake the user can act on: what went wrong, where, and how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text = f"{text.rstrip('.')}. {self.fix}"
        return text


# errno -> what the user is told; errors a user can fix by freeing space or choosing another folder
_WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_error(exc: BaseException, target: str | Path) -> UserError | None:
    """A UserError for an OSError a user can act on (full disk, quota, read-only, permissions) raised
    while writing `target`; None for anything else (a bug, which keeps its traceback)."""
    if not isinstance(exc, OSError) or exc.errno not in _WRITE_PROBLEMS:
        return None
    return UserError(f"cannot write {Path(target).name}: {_WRITE_PROBLEMS[exc.errno]}; nothing was replaced "
                     "(an earlier file of that name is intact) and the partial output was removed",
                     where=str(Path(target).parent), fix="Free some space or write to another folder, then run again.")
