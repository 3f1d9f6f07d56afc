"""Two "machines" of one process each, over the loopback address, train exactly as two processes on
one machine: `accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1`
(one launcher per machine, started together) writes the same weights, bit for bit, as
`accelerate launch --num_processes 2` on one machine (~40 s: three launchers of two gloo ranks' work)."""

from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdtune.testing import make_dataset, write_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")]

REPO = Path(__file__).resolve().parents[1]


def _launch(tmp_path: Path, out: str, port: int, machines: int, machine_rank: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", str(REPO / "fine_tune.py"),
            f"--pretrained_model_name_or_path={tmp_path / 'model'}", "--in_json", str(tmp_path / "meta.json"),
            f"--train_data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / out}", "--resolution=64",
            "--train_batch_size=1", "--learning_rate=1e-3", "--max_data_loader_n_workers=0", "--max_train_steps=2",
            "--seed=3"]


def test_two_machines_over_loopback_train_like_two_processes_on_one(tmp_path, run_in_session):
    write_tiny_model(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    make_dataset(tmp_path / "data", n=4, seed=0, metadata=tmp_path / "meta.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}

    one = run_in_session(_launch(tmp_path, "one", 29571, machines=1, machine_rank=0), timeout=240, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    with ThreadPoolExecutor(2) as pool:  # both machines must be up for the rendezvous
        runs = [pool.submit(run_in_session, _launch(tmp_path, "two", 29572, machines=2, machine_rank=r), timeout=240,
                            env=env, cwd=tmp_path) for r in (0, 1)]
        two = [r.result() for r in runs]
    for proc in two:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 processes" in two[0].stdout  # one world of two, not two worlds of one

    saved_one = load_file(str(tmp_path / "one" / "last.safetensors"))
    saved_two = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert saved_one.keys() == saved_two.keys()
    for key, value in saved_one.items():
        assert value.equal(saved_two[key]), key
    # each machine's process drew the batches of the same rank on one machine
    firsts_one = dict(re.findall(r"^process (\d)/2: first batch (.+)$", one.stdout, re.M))
    firsts_two = dict(re.findall(r"^process (\d)/2: first batch (.+)$", two[0].stdout + two[1].stdout, re.M))
    assert firsts_one == firsts_two and len(firsts_one) == 2 and firsts_one["1"] != firsts_one["2"], firsts_two
    for out in ("one", "two"):
        summary = json.loads((tmp_path / out / "last-train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["trained"]["num_processes"] == 2
