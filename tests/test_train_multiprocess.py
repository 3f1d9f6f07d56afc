"""Two data-parallel processes on the CPU through the real `accelerate launch` (gloo).

The plain run (both processes train on different images and end with identical weights, which only
the main process writes) is checked in test_multinode.py, whose two-machine run it is compared with.
Here: a save that fails on the main process stops both processes at once; and every image of one
process's batch fails to load, and both processes skip that batch together.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from sdtune.testing import make_dataset

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]


def _two_processes(tmp_path: Path, tiny_model_file, port: int, *train_flags: str) -> tuple[list[str], dict]:
    """`accelerate launch` of fine_tune.py with 2 gloo processes on a tiny model and 4 images."""
    tiny_model_file(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    make_dataset(tmp_path / "data", n=4, seed=0, metadata=tmp_path / "meta.json")
    # ACCELERATE_USE_CPU makes accelerate pick MULTI_CPU (gloo) instead of silently running
    # two independent single processes (both then save the same state: a race)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "--num_cpu_threads_per_process", "1", str(REPO / "fine_tune.py"),
           f"--pretrained_model_name_or_path={tmp_path / 'model'}", "--in_json", str(tmp_path / "meta.json"),
           f"--train_data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}", "--resolution=64",
           "--train_batch_size=1", "--learning_rate=1e-3", "--max_data_loader_n_workers=0", *train_flags]
    return cmd, env


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_a_save_that_fails_on_the_main_process_stops_both(tmp_path, run_in_session, tiny_model_file):
    """The disk fills while the main process saves: both processes stop at once with the message,
    instead of the other one waiting for the main one at the next barrier."""
    cmd, env = _two_processes(tmp_path, tiny_model_file, 29548, "--max_train_steps=2", "--save_every_n_steps=1")
    # every process of the run (the launcher too) imports this first: fsync reports a full disk
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import errno, os\n"
        "def _full(*args):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.fsync = _full\n")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")])
    proc = run_in_session(cmd, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert "cannot write at-step00000001.safetensors: the disk is full" in proc.stderr, proc.stderr[-3000:]
    assert "another process failed (its message is above)" in proc.stderr  # the other rank, told at once
    # nothing is left: no model, no temporary file (the folder itself goes when the run made it empty)
    out = tmp_path / "out"
    assert not out.exists() or not [p.name for p in out.iterdir() if p.suffix == ".safetensors" or ".tmp-" in p.name]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_a_batch_that_fails_on_one_process_is_skipped_by_both(tmp_path, run_in_session, tiny_model_file):
    """Batch size 1, 4 images, 2 processes, 1 epoch: each image is in one process's batch only. When
    that image cannot be decoded, the process that drew it would skip the step while the other ran
    backward: their gradient all-reduces went out of step and the run hung. Both skip it now."""
    cmd, env = _two_processes(tmp_path, tiny_model_file, 29549, "--max_train_epochs=1", "--seed=1")
    bad = tmp_path / "data" / "img_002.webp"  # its size is in the metadata: found only when loaded
    bad.write_bytes(bad.read_bytes()[:60])
    proc = run_in_session(cmd, timeout=150, env=env, cwd=tmp_path)  # a hang fails here, not in the suite
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]

    warned = [line for line in (out + err).splitlines() if "img_002.webp" in line and "skipped" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), out + err  # reported once, by one process
    # 2 batches per process; the one position where a process had nothing is skipped by both
    summary = json.loads((tmp_path / "out" / "last-train_summary.json").read_text())
    assert summary["steps"] == 1
    assert [Path(s["path"]).name for s in summary["skipped_images"]] == ["img_002.webp"]
    sums = re.search(r"U-Net weight checksum per process: (\S+), (\S+) \((\w+)", out)
    assert sums and sums.group(1) == sums.group(2) and sums.group(3) == "identical", out


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_gradient_accumulation_across_processes(tmp_path, run_in_session, tiny_model_file):
    """Batch 1, 2 accumulated micro-batches, 2 processes, 4 images: each process draws 2 images and both
    go into one optimizer step of 4 images. The gradients are reduced across processes only when the
    step closes (DDP's no_sync for the first micro-batch): were the closing reduction skipped, the two
    replicas would step on different gradients and end apart."""
    cmd, env = _two_processes(tmp_path, tiny_model_file, 29547, "--max_train_epochs=1", "--seed=2",
                              "--gradient_accumulation_steps=2")
    proc = run_in_session(cmd, timeout=150, env=env, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 processes and 2 accumulation steps: 2 batches and 1 optimizer step per epoch" in out, out
    summary = json.loads((tmp_path / "out" / "last-train_summary.json").read_text())
    assert summary["steps"] == 1
    assert (summary["trained"]["num_processes"], summary["trained"]["total_batch_size"]) == (2, 4)
    sums = re.search(r"U-Net weight checksum per process: (\S+), (\S+) \((\w+)", out)
    assert sums and sums.group(1) == sums.group(2) and sums.group(3) == "identical", out
    # the step changed the weights (a step that never ran would also leave the replicas alike)
    import torch

    weights = torch.load(tmp_path / "model" / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    start = sum(v.double().sum().item() for v in weights.values())
    assert abs(float(sums.group(1)) - start) > 1e-3
