"""Writing files so that a reader never sees half of one: the only place sdtune renames into place.

Every file sdtune writes (models, states' sidecars, caches, captions, logs, sample images) is first
written to a temporary sibling, flushed to the disk, and renamed over its final name: a crash, a
kill or a full disk leaves the previous version (or nothing), never a torn file.

The rules, the same for every writer:
- the temporary name is unique (`mkstemp` in the destination's folder, so the rename stays on one
  file system): two processes writing the same name at once never write into one file, and the
  last rename wins with one whole version;
- the file is fsynced before the rename, and the folder after it where the system allows, so that
  after a power cut the name points to the new bytes, not to an empty file;
- the final permissions are those a plain open() would give (0666 less the umask), not mkstemp's
  owner-only 0600;
- on any failure the temporary file is removed and the error goes on unchanged, for the caller to
  word (`sdtune.errors.write_error` turns a full disk or a read-only folder into one clear line).

`atomic_path` yields a temporary path for libraries that write by path (safetensors, torch.save,
PIL); `write_bytes` / `write_text` are the short forms. `swap_folder` is the folder-level
counterpart: a folder cannot be renamed over a non-empty one, so the previous one steps aside first.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdtune.umask import give_default_mode

# Temporary names carry the writer's process id, so that cleaning up after a killed writer can tell
# its leftovers (process gone) from the work in progress of a live one.
_TMP = ".{name}.tmp-{pid}-"
_ASIDE = ".{name}.old-"


@contextmanager
def atomic_path(final: str | Path, *, directory: bool = False, clean_up: bool = False) -> Iterator[Path]:
    """A temporary sibling of `final` to write to (a file, or a folder when `directory`); renamed over
    `final` when the block succeeds, removed when it fails.

    `clean_up` first removes what a killed earlier write of `final` left (worth it for big files such
    as models, where each leftover is as big as the model; a folder set aside is put back)."""
    final = Path(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if clean_up:
            _clean_up_after_a_kill(final)
        prefix = _TMP.format(name=final.name, pid=os.getpid())
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
            os.close(fd)
            tmp = Path(name)
        give_default_mode(tmp, directory=directory)  # mkstemp/mkdtemp would leave it owner-only
        yield tmp
        if directory:
            swap_folder(tmp, final, Path(tempfile.mkdtemp(prefix=_ASIDE.format(name=final.name), dir=final.parent)) / "x")
        else:
            _fsync_file(tmp)
            os.replace(tmp, final)
            _fsync_folder(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | Path, data: bytes, *, clean_up: bool = False) -> Path:
    """Write `data` to `path` atomically (see the module's rules)."""
    path = Path(path)
    with atomic_path(path, clean_up=clean_up) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, "\\n" line ends on every system) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def atomic_write_text(path: str | Path, text: str, backup: bool = False) -> Path | None:
    """`write_text`, creating the folder, and first keeping an existing file's content as
    `<name>.bak` when `backup` (the metadata commands' undo); returns the backup's path if made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup_path = None
    if backup and path.exists():
        backup_path = path.with_name(path.name + ".bak")
        shutil.copy2(path, backup_path)
    write_text(path, text)
    return backup_path


def swap_folder(new: Path, final: Path, aside: Path) -> None:
    """Put the folder `new` under the name `final`, atomically for readers of `final`'s contents.

    A folder cannot be renamed over a non-empty one: the previous `final` is first renamed to
    `aside`, so there is never a moment with a half-written folder under the final name. A kill
    between the two renames leaves the previous version at `aside`, where the caller looks for it
    (`atomic_path(clean_up=True)` puts it back; a training state is read from `<name>.old`)."""
    _fsync_tree(new)
    if final.exists():
        if aside.exists():  # left by a crash after an earlier swap: the folder in place is the newer one
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(new, final)
    _fsync_folder(final.parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    if aside.parent != final.parent and aside.parent.name.startswith(_ASIDE.format(name=final.name)):
        shutil.rmtree(aside.parent, ignore_errors=True)


def _clean_up_after_a_kill(final: Path) -> None:
    """Undo what a write of `final` that was killed (kill -9, a power cut) left behind.

    Such a write had no chance to clean up: its temporary file or folder stays, hidden by its leading
    dot, and one more piles up with every kill. Only those of processes that no longer run are
    removed: another process writing the same name right now keeps its file. A folder killed between
    its two renames is missing, its previous version set aside in `.<name>.old-*/x`: that version is
    put back, so that a failure of this write too still leaves it."""
    stem = glob.escape(f".{final.name}.")
    for aside in sorted(final.parent.glob(stem + "old-*")):
        if not final.exists() and (aside / "x").exists():
            os.replace(aside / "x", final)
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in final.parent.glob(stem + "tmp-*"):
        if not _writer_alive(tmp.name[len(f".{final.name}.tmp-"):].split("-", 1)[0]):
            _remove(tmp)


def _writer_alive(pid: str) -> bool:
    if not pid.isdigit():  # not a name this module makes
        return False
    if int(pid) == os.getpid():
        return True  # another thread of this process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _remove(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; not every system can open a folder for this (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder (EINVAL): the rename is still atomic
    finally:
        os.close(fd)
