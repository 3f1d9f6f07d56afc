"""Training under DeepSpeed ZeRO, two gloo processes on the CPU through the real `accelerate launch`.

One plain data-parallel run is the reference. ZeRO-2 ends with its weights (float tolerance: the
reductions add in another order), and a ZeRO-2 run resumed from its step-2 state ends where the
uninterrupted one did. ZeRO-3 with the optimizer offloaded to the CPU ends with the reference's
weights too, validates (the fixed-noise validation loss falls), samples and saves a Diffusers model
that diffusers loads, laid out file for file and key for key as the reference's; ZeRO-3 without
offload resumes from its step-3 state. The tiny U-Net is twice as wide here, so that ZeRO-3 splits
some of its tensors (DeepSpeed keeps those of up to 100,000 weights whole on every process). Every run
validates, samples and saves on the main process while the weights are sharded, so a hang there fails
the run's timeout. Five launches on a quiet machine: ~20-35 s each for data parallel and ZeRO-2, ~55 s
for a ZeRO-3 run (DeepSpeed's set-up, and its first step after recording the module order, take
longest; docs/benchmarks.md). DeepSpeed compiles no op for them (an empty extensions folder of their
own stays without its shared-memory op). The launches that must be refused are started without a
launcher.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sdtune.testing import make_dataset, write_tiny_model

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="gloo launch is tested on Linux")]

REPO = Path(__file__).resolve().parents[1]
UNET = Path("last") / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    # the U-Net twice as wide: its largest tensors (up to 295,000 weights) pass DeepSpeed's threshold of
    # 100,000, under which ZeRO-3 keeps a tensor whole on every process (all of the usual tiny U-Net's
    # tensors are under it, so ZeRO-3 would split nothing); the runs take no longer
    write_tiny_model(root / "model", "sd1", seed=0, fmt="diffusers", unet={"block_out_channels": [32, 64, 128, 128]})
    make_dataset(root / "data", n=5, seed=0, metadata=root / "meta.json")
    (root / "prompts.txt").write_text("a red cube --w 64 --h 64 --s 2 --d 5\n")
    return root


def _env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src"), **extra}
    env.pop("ACCELERATE_USE_CPU", None)  # sdtune sets both kinds of run up on the CPU itself
    return env


def _flags(root: Path, out: str, *extra: str, save_every: int = 2) -> list[str]:
    return [str(REPO / "fine_tune.py"), f"--pretrained_model_name_or_path={root / 'model'}", "--in_json",
            str(root / "meta.json"), f"--train_data_dir={root / 'data'}", f"--output_dir={root / out}",
            "--resolution=64", "--train_batch_size=1", "--learning_rate=1e-3", "--lr_scheduler=cosine",
            "--max_data_loader_n_workers=0", "--max_train_steps=4", "--seed=3", "--save_model_as=diffusers",
            "--use_safetensors", f"--save_every_n_steps={save_every}", "--save_state", "--validation_split=0.2",
            "--validate_every_n_steps=2", f"--sample_prompts={root / 'prompts.txt'}", "--sample_every_n_steps=2",
            *extra]


def _launch(run_in_session, root: Path, port: int, out: str, *extra: str, save_every: int = 2) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "--num_cpu_threads_per_process", "1", *_flags(root, out, *extra, save_every=save_every)]
    # an extensions folder of the test's own shows any op DeepSpeed compiles
    env = _env(TORCH_EXTENSIONS_DIR=str(root / "torch_extensions"))
    proc = run_in_session(cmd, timeout=400, env=env, cwd=root)  # a hang ends with the test, not the suite
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # no Python warning reaches the user (torch's deprecation of the collectives DeepSpeed calls came
    # back dozens of times in every ZeRO-3 run)
    warned = set(re.findall(r"\w+Warning: .*", proc.stderr))
    assert not warned, warned
    return proc.stdout


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape and value.dtype == b[key].dtype, key
        assert (value - b[key]).abs().max().item() <= atol, key


@pytest.fixture(scope="module")
def reference(workspace):
    """Plain data parallel: the weights ZeRO must reproduce."""
    from conftest import _run_in_session  # the fixture itself is per test; this reference is per module

    out = _launch(_run_in_session, workspace, 29661, "ddp")
    assert "MULTI_CPU" in out
    return load_file(str(workspace / "ddp" / UNET))


def test_zero2_trains_like_data_parallel_and_resumes(workspace, run_in_session, reference):
    out = _launch(run_in_session, workspace, 29662, "z2", "--deepspeed", "--zero_stage=2")
    assert out.count(": DEEPSPEED, backend gloo") == 2, out  # both processes, one world, DeepSpeed running
    z2 = load_file(str(workspace / "z2" / UNET))
    _close(z2, reference, atol=1e-6)
    from diffusers import UNet2DConditionModel

    before = UNet2DConditionModel.from_pretrained(str(workspace / "model"), subfolder="unet").state_dict()
    assert max((z2[k] - before[k]).abs().max().item() for k in z2) > 1e-3  # it trained
    state = workspace / "z2" / "at-step00000002-state"
    assert (state / "pytorch_model").is_dir() and (state / "train_state.json").is_file()

    out = _launch(run_in_session, workspace, 29663, "z2r", "--deepspeed", "--zero_stage=2", f"--resume={state}")
    assert "resumed from" in out and "step 2" in out
    _close(load_file(str(workspace / "z2r" / UNET)), z2, atol=1e-6)
    # training never uses DeepSpeed's shared-memory op (its inference all-reduce): it is not compiled
    assert not list((workspace / "torch_extensions").rglob("*shm*")), list((workspace / "torch_extensions").rglob("*"))


def test_zero3_offloaded_trains_validates_samples_saves_and_resumes(workspace, run_in_session, reference):
    import torch
    from diffusers import UNet2DConditionModel

    # sd-scripts' ZeRO-3 command lines carry --zero3_save_16bit_model (it cannot save without): accepted
    # its state is saved at step 3, so that the resumed run below takes one step: ZeRO-3's first step
    # after the step that records the module order spends ~10 CPU-s per process finding which
    # gathered weights to release (a pass over the rest of the order for each module)
    out = _launch(run_in_session, workspace, 29664, "z3", "--deepspeed", "--zero_stage=3",
                  "--offload_optimizer_device=cpu", "--zero3_save_16bit_model", save_every=3)
    assert out.count(": DEEPSPEED, backend gloo") == 2, out
    # the weights really are split: those of the tensors over DeepSpeed's threshold, counted here
    unet = UNet2DConditionModel.from_pretrained(str(workspace / "model"), subfolder="unet")
    sizes = [p.numel() for p in unet.parameters()]
    big = [n for n in sizes if n > 100_000]
    assert big, sizes
    split = (f"ZeRO-3: {len(big)} of {len(sizes)} trained weight tensors ({sum(big) / sum(sizes):.2%} of "
             f"{sum(sizes):,} weights) split over 2 processes; the other {len(sizes) - len(big)}, of up to 100,000 "
             f"weights each")
    assert split in out, out
    z3 = workspace / "z3"
    # Adam divides by the gradients' own size, so the last bits of tiny gradients, summed in another
    # order by ZeRO-3's partitioned reduction, move a few weights by up to ~1 % of a step
    _close(load_file(str(z3 / UNET)), reference, atol=1e-4)
    # the saved model is an ordinary Diffusers folder, laid out as the data-parallel run's
    assert sorted(p.relative_to(z3 / "last").as_posix() for p in (z3 / "last").rglob("*")) == \
        sorted(p.relative_to(workspace / "ddp" / "last").as_posix() for p in (workspace / "ddp" / "last").rglob("*"))
    unet = UNet2DConditionModel.from_pretrained(str(z3 / "last"), subfolder="unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    losses = {int(s): float(v) for s, v in re.findall(r"validation loss at step (\d+): ([\d.]+)", out)}
    assert sorted(losses) == [2, 4] and losses[4] < losses[2], losses  # the fixed-noise loss falls
    assert sorted(p.name for p in (z3 / "sample").glob("*.png") if "grid" not in p.name) == \
        ["last_000002_00_5.png", "last_000004_00_5.png"]

    # without offload, resumed from the offloaded run's state: the same weights at the end
    out = _launch(run_in_session, workspace, 29665, "z3r", "--deepspeed", "--zero_stage=3",
                  f"--resume={z3 / 'at-step00000003-state'}", "--resume_allow_changes", save_every=3)  # the offload
    assert "resumed from" in out and "step 3" in out
    _close(load_file(str(workspace / "z3r" / UNET)), load_file(str(z3 / UNET)), atol=1e-6)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_CPU": "1"}, "--deepspeed: ACCELERATE_USE_CPU (or accelerate launch --cpu) makes accelerate drop "
                                  "DeepSpeed without a word"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "the launch asks for DeepSpeed"),
])
def test_a_deepspeed_that_would_not_run_is_refused(workspace, env, message):
    flags = _flags(workspace, "refused", *([] if "ACCELERATE_USE_DEEPSPEED" in env else ["--deepspeed"]))
    proc = subprocess.run([sys.executable, *flags], capture_output=True, text=True, timeout=120,
                          env={**_env(), **env}, cwd=workspace)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (workspace / "refused").exists()
