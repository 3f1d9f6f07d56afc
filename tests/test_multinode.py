"""Two data-parallel processes on the CPU through the real `accelerate launch` (gloo), on one machine
and on two "machines" over the loopback address.

The one-machine run: both processes train (each names its first batch), on different images, an
epoch takes half the steps of a single process, both end with identical weights, and only the main
process writes the model, whose weights match the checksum both processes report.

Two machines of one process each (`accelerate launch --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1`, one launcher per machine, started together) then write the same
weights, bit for bit, as that one-machine run (~40 s: three launchers of two gloo ranks' work; the
one-machine run serves both checks, as each launch costs three Python processes)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdtune.testing import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")]

REPO = Path(__file__).resolve().parents[1]


def _launch(root: Path, data: str, out: str, port: int, machines: int, machine_rank: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", str(REPO / "fine_tune.py"),
            f"--pretrained_model_name_or_path={root / 'model'}", "--in_json", str(root / "meta.json"),
            f"--train_data_dir={root / data}", f"--output_dir={root / out}", "--resolution=64",
            "--train_batch_size=1", "--learning_rate=1e-3", "--max_data_loader_n_workers=0", "--max_train_epochs=1",
            "--cache_latents_to_disk", "--seed=3"]


def _check_one_machine(root: Path, proc) -> None:
    out = proc.stdout
    # the two ranks' shares together cover every image, once (each rank encodes its share)
    entries = [p for p in (root / "data" / ".sdtune-cache").glob("*.safetensors")]
    assert len(entries) == 4, sorted(p.name for p in entries)
    firsts = dict(re.findall(r"^process (\d)/2: first batch (.+)$", out, re.M))
    assert sorted(firsts) == ["1", "2"], out
    assert firsts["1"] != firsts["2"]  # each process draws its own share of the images

    # 4 images, batch 1, 2 processes: 2 optimizer steps per epoch (a single process takes 4)
    assert "with 2 processes" in out and "2 optimizer steps per epoch" in out
    summary = json.loads((root / "one" / "last-train_summary.json").read_text())
    assert summary["steps"] == 2
    # each optimizer step saw batch 1 x 2 processes = 2 images, and the run records that
    assert (summary["trained"]["num_processes"], summary["trained"]["total_batch_size"]) == (2, 2)

    sums = re.search(r"U-Net weight checksum per process: (\S+), (\S+) \((\w+)", out)
    assert sums, out
    assert sums.group(1) == sums.group(2) and sums.group(3) == "identical"
    saved = [p for p in (root / "one").iterdir() if p.suffix == ".safetensors"]
    assert [p.name for p in saved] == ["last.safetensors"]  # written once, by the main process
    unet = {k: v for k, v in load_file(str(saved[0])).items() if k.startswith("model.diffusion_model.")}
    total = sum(v.double().sum().item() for v in unet.values())
    assert total == pytest.approx(float(sums.group(1)), rel=1e-9)


def test_two_cpu_processes_train_one_model_and_two_machines_train_alike(tmp_path, run_in_session, tiny_model_file,
                                                                       stacks_on_sigusr1):
    tiny_model_file(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    for data in ("data", "data2"):  # each launch encodes (and caches) its own images
        make_dataset(tmp_path / data, n=4, seed=0, metadata=tmp_path / "meta.json")
    # ACCELERATE_USE_CPU makes accelerate pick MULTI_CPU (gloo) instead of silently running
    # two independent single processes (both then save the same state: a race)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}

    # a hung rendezvous ends with both ranks
    one = run_in_session(_launch(tmp_path, "data", "one", 29571, machines=1, machine_rank=0), timeout=240, env=env,
                         cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    _check_one_machine(tmp_path, one)

    # this launch once hung after both machines' ranks had ended: should it again, every process of it,
    # the launchers too, shows where it waits
    env = stacks_on_sigusr1(env, tmp_path / "stacks")
    with ThreadPoolExecutor(2) as pool:  # both machines must be up for the rendezvous
        runs = [pool.submit(run_in_session, _launch(tmp_path, "data2", "two", 29572, machines=2, machine_rank=r),
                            timeout=240, env=env, cwd=tmp_path) for r in (0, 1)]
        concurrent.futures.wait(runs)
    failed = [f"machine {r}: {run.exception()}" for r, run in enumerate(runs) if run.exception() is not None]
    if failed:  # both machines' output: the one that waited and the one it waited for
        pytest.fail("\n\n".join(failed), pytrace=False)
    two = [run.result() for run in runs]
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
