"""One atomic writer (sdtune.atomic): unique temporary names, whole versions only, the old file kept
on failure, the umask's permissions, and no other module renaming files into place."""

import ast
import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdtune import atomic

SRC = Path(__file__).resolve().parents[1] / "src" / "sdtune"

# Two processes write the same name many times, each a different whole payload; a reader checks
# that every version it sees is one writer's whole payload. A fixed temporary name (".<name>.tmp")
# makes one writer rename or truncate the other's half-written file.
WRITER = textwrap.dedent("""
    import sys
    from sdtune.atomic import write_bytes
    target, mark = sys.argv[1], sys.argv[2].encode()
    for i in range(int(sys.argv[3])):
        write_bytes(target, mark * (200_000 + i % 7))
""")


def _whole(data: bytes) -> bool:
    return len(data) >= 200_000 and data in (data[:1] * len(data),) and data[:1] in (b"a", b"b")


def test_two_concurrent_writers_of_one_path_never_collide(tmp_path):
    target = tmp_path / "shared.bin"
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), mark, "60"], env=env,
                                stderr=subprocess.PIPE, text=True) for mark in "ab"]
    seen = 0
    while any(w.poll() is None for w in writers):
        if target.exists():
            data = target.read_bytes()
            assert _whole(data), f"a torn version: {len(data)} bytes, starting {data[:4]!r}"
            seen += 1
    for w in writers:
        assert w.wait() == 0, w.stderr.read()[-2000:]
    assert _whole(target.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.bin"]  # no temporary file left
    assert seen > 0


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old version")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise Boom
    assert target.read_bytes() == b"old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_full_disk_during_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "log.json"
    atomic.write_text(target, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic.write_text(target, "new\n")
    assert info.value.errno == errno.ENOSPC  # the caller words it: the error goes on unchanged
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.json"]


def test_a_killed_writers_leftover_is_removed_but_a_live_writers_file_is_kept(tmp_path):
    target = tmp_path / "N.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has ended: its pid names no live process (unless reused)
    leftover = tmp_path / f".N.safetensors.tmp-{dead_pid}-abc123"
    live = tmp_path / f".N.safetensors.tmp-{os.getppid()}-def456"  # our parent runs: a writer at work
    leftover.write_bytes(b"x")
    live.write_bytes(b"y")
    atomic.write_bytes(target, b"new", clean_up=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "N.safetensors"]


UMASK_CODE = textwrap.dedent("""
    import os, stat, sys
    from pathlib import Path
    os.umask(int(sys.argv[2], 8))
    from sdtune import atomic
    out = Path(sys.argv[1])
    atomic.write_text(out / "a.txt", "x")
    with atomic.atomic_path(out / "d", directory=True) as tmp:
        (tmp / "f").write_text("y")
    print(oct(stat.S_IMODE((out / "a.txt").stat().st_mode)), oct(stat.S_IMODE((out / "d").stat().st_mode)))
""")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_mode_follows_the_umask(tmp_path, umask):
    out = subprocess.run([sys.executable, "-c", UMASK_CODE, str(tmp_path), oct(umask)[2:]], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [oct(0o666 & ~umask), oct(0o777 & ~umask)]


def test_a_folder_replaces_the_previous_one_whole(tmp_path):
    final = tmp_path / "model"
    for version in ("1", "2"):
        with atomic.atomic_path(final, directory=True) as tmp:
            (tmp / "weights").write_text(version)
    assert (final / "weights").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _renames_or_temp_names(path: Path) -> list[str]:
    """Calls that rename into place or make a temporary name (os.replace, os.rename, Path.rename/replace,
    tempfile.mkstemp/mkdtemp/NamedTemporaryFile) in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner == "os" and name == "replace") or name in ("rename", "renames", "mkstemp", "mkdtemp",
                                                                   "NamedTemporaryFile"):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {name}")
    return found


def test_only_the_atomic_module_renames_into_place():
    found = [hit for path in sorted(SRC.rglob("*.py")) if path.name != "atomic.py" or path.parent != SRC
             for hit in _renames_or_temp_names(path)]
    assert found == [], "write through sdtune.atomic instead: " + ", ".join(found)
    assert _renames_or_temp_names(SRC / "atomic.py")  # the check sees the calls where they are


def test_mode_bits_are_plain_files(tmp_path):
    path = atomic.write_bytes(tmp_path / "sub" / "x.bin", b"1")  # the folder is made on the way
    assert stat.S_ISREG(path.stat().st_mode) and path.read_bytes() == b"1"
