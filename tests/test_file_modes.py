"""Saved models, metadata and cache entries get the permissions the user's umask gives (not mkstemp's
owner-only 0600), so another account or a web UI running as another user can read them."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

CODE = textwrap.dedent("""
    import os, stat, sys, json
    from pathlib import Path
    os.umask(int(sys.argv[2], 8))
    out = Path(sys.argv[1])
    from sdtune.checkpoint import save_model
    from sdtune.testing import build_tiny_model
    from sdtune.atomic import atomic_write_text, write_bytes
    model = build_tiny_model("sd1")  # built once, saved both ways
    save_model(model, out / "model.safetensors", fmt="safetensors")
    save_model(model, out / "folder", fmt="diffusers")
    atomic_write_text(out / "meta.json", "{}")
    write_bytes(out / "entry.bin", b"x")
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out / "model.safetensors",
             out / "folder", out / "folder" / "unet", out / "meta.json", out / "entry.bin"]}
    print(json.dumps(modes))
""")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    import json

    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path), oct(umask)[2:]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    modes = json.loads(out.stdout.strip().splitlines()[-1])
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert modes == {"model.safetensors": file_mode, "folder": dir_mode, "folder/unet": dir_mode,
                     "meta.json": file_mode, "entry.bin": file_mode}
