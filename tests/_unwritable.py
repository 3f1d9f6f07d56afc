"""Unwritable places for tests that run as root (which ignores permission bits).

`read_only(folder)` bind-mounts a folder read-only over itself (EROFS, as on a read-only mount);
`immutable(folder)` sets the immutable attribute (EPERM even for root). Each skips the test, saying
why, where the machine does not allow it (not root, no mount namespace rights, a file system
without attributes). A path below a regular file (ENOTDIR) needs no rights at all.
"""

import contextlib
import os
import subprocess

import pytest


def _run(*cmd) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # the tool itself is missing
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


@contextlib.contextmanager
def read_only(folder):
    folder = str(folder)
    done = _run("mount", "--bind", folder, folder)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here to make a read-only folder: {done.stderr.strip() or done.returncode}")
    try:
        done = _run("mount", "-o", "remount,bind,ro", folder)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip() or done.returncode}")
        probe = os.path.join(folder, ".probe")
        try:
            open(probe, "w").close()
        except OSError:
            pass
        else:
            os.unlink(probe)
            pytest.skip("a read-only bind mount is still writable here")
        yield folder
    finally:
        _run("umount", folder)


@contextlib.contextmanager
def immutable(folder):
    folder = str(folder)
    done = _run("chattr", "+i", folder)
    if done.returncode != 0:
        pytest.skip(f"cannot set the immutable attribute here: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        _run("chattr", "-i", folder)
