"""Learning-rate schedules beyond diffusers' six: sd-scripts' inverse_sqrt, cosine_with_min_lr,
warmup_stable_decay, piecewise_constant and --lr_scheduler_type classes, against closed forms
written out here, in optimizer steps on one and on two processes; and two real training runs whose
logged learning rates follow them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sdtune.errors import UserError
from sdtune.train.schedules import build_lr_scheduler

LR = 0.5


def curve(name, *, total=12, processes=1, **kw):
    """The learning rate before each of `total` optimizer steps and after the last, stepping the
    schedule `processes` times per optimizer step, as accelerate's prepared scheduler does."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=LR)
    sched = build_lr_scheduler(name, opt, total_steps=total, num_processes=processes, note=None, **kw)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        for _ in range(processes):
            sched.step()
    return out


def warm(k, W):
    return k / max(1, W)


def inverse_sqrt(k, W, T):
    return warm(k, W) if k < W else 1 / math.sqrt((k + T - W) / T)


def cosine_min(k, W, N, ratio, cycles=1):
    if k < W:
        return warm(k, W)
    p = (k - W) / max(1, N - W)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (cycles / 2) * 2 * p)) * (1 - ratio) + ratio)


def wsd(k, W, D, N, ratio=0.0, cycles=1, warmup="linear", decay="cosine"):
    S = N - W - D
    if k < W:
        p = k / max(1, W)
        f = {"linear": p, "cosine": 0.5 * (1 - math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(1 - p)}[warmup]
        return max(0.0, f * (1 - ratio) + ratio)
    if k < W + S:
        return 1.0
    if k < N:
        p = (k - W - S) / max(1, D)
        f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * (cycles / 2) * 2 * p)), "1-sqrt": 1 - math.sqrt(p)}[decay]
        return max(0.0, f * (1 - ratio) + ratio)
    return ratio


def approx(values):
    return pytest.approx([LR * v for v in values], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("processes", [1, 2])
def test_inverse_sqrt(processes):
    assert curve("inverse_sqrt", warmup=3, processes=processes) == approx([inverse_sqrt(k, 3, 3) for k in range(13)])
    assert curve("inverse_sqrt", warmup=3, timescale=5, processes=processes) == approx(
        [inverse_sqrt(k, 3, 5) for k in range(13)])
    # without warm-up, transformers' default timescale is 10000 steps (optimizer steps here)
    assert curve("inverse_sqrt", processes=processes) == approx([inverse_sqrt(k, 0, 10_000) for k in range(13)])


@pytest.mark.parametrize("processes", [1, 2])
def test_cosine_with_min_lr(processes):
    assert curve("cosine_with_min_lr", warmup=2, min_lr_ratio=0.1, processes=processes) == approx(
        [cosine_min(k, 2, 12, 0.1) for k in range(13)])
    # --lr_scheduler_num_cycles counts half-waves (sd-scripts passes num_cycles / 2): 2 = down and up again
    assert curve("cosine_with_min_lr", min_lr_ratio=0.25, num_cycles=2, processes=processes) == approx(
        [cosine_min(k, 0, 12, 0.25, cycles=2) for k in range(13)])
    # an absolute floor through --lr_scheduler_args, as a ratio of --learning_rate
    assert curve("cosine_with_min_lr", scheduler_args=["min_lr=0.05"], processes=processes) == approx(
        [cosine_min(k, 0, 12, 0.1) for k in range(13)])


@pytest.mark.parametrize("processes", [1, 2])
def test_warmup_stable_decay(processes):
    assert curve("warmup_stable_decay", warmup=2, decay=4, processes=processes) == approx(
        [wsd(k, 2, 4, 12) for k in range(13)])
    # decay as a fraction of the steps, a floor, and the shapes of transformers' get_wsd_schedule
    assert curve("warmup_stable_decay", warmup="25%", decay=0.5, min_lr_ratio=0.2, processes=processes,
                 scheduler_args=["warmup_type=cosine", "decay_type=linear"]) == approx(
        [wsd(k, 3, 6, 12, 0.2, warmup="cosine", decay="linear") for k in range(13)])
    assert curve("warmup_stable_decay", decay=5, num_cycles=2, processes=processes) == approx(
        [wsd(k, 0, 5, 12, cycles=2) for k in range(13)])


@pytest.mark.parametrize("processes", [1, 2])
def test_piecewise_constant(processes):
    rules = ["step_rules=1:3,0.5:7,0.1"]
    ref = [1.0 if k < 3 else 0.5 if k < 7 else 0.1 for k in range(13)]
    assert curve("piecewise_constant", scheduler_args=rules, processes=processes) == approx(ref)


@pytest.mark.parametrize("processes", [1, 2])
def test_lr_scheduler_type_counts_optimizer_steps(processes):
    assert curve("constant", scheduler_type="StepLR", scheduler_args=["step_size=3", "gamma=0.5"],
                 processes=processes) == approx([0.5 ** (k // 3) for k in range(13)])
    assert curve("constant", scheduler_type="torch.optim.lr_scheduler.ExponentialLR", scheduler_args=["gamma=0.9"],
                 processes=processes) == approx([0.9 ** k for k in range(13)])


def test_lr_scheduler_type_state_resumes_on_another_process_count():
    def make(processes):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([param], lr=LR)
        return opt, build_lr_scheduler("constant", opt, total_steps=10, num_processes=processes, note=None,
                                       scheduler_type="StepLR", scheduler_args=["step_size=2", "gamma=0.5"])

    opt, sched = make(2)
    for _ in range(3):  # three optimizer steps on two processes
        opt.step()
        sched.step()
        sched.step()
    opt1, sched1 = make(1)
    opt1.load_state_dict(opt.state_dict())  # what a resume restores: optimizer and schedule
    sched1.load_state_dict(sched.state_dict())
    opt1.step()
    sched1.step()  # the fourth optimizer step, on one process
    assert sched1.get_last_lr()[0] == pytest.approx(LR * 0.5 ** (4 // 2))


@pytest.mark.parametrize("kw, where, words", [
    (dict(name="cosine", decay=3), "--lr_decay_steps", "only acts with --lr_scheduler warmup_stable_decay"),
    (dict(name="cosine", timescale=3), "--lr_scheduler_timescale", "only acts with"),
    (dict(name="linear", min_lr_ratio=0.1), "--lr_scheduler_min_lr_ratio", "only acts with"),
    (dict(name="cosine_with_min_lr"), "--lr_scheduler", "needs the lowest learning rate"),
    (dict(name="cosine_with_min_lr", min_lr_ratio=0.1, scheduler_args=["min_lr=0.1"]), "--lr_scheduler_args", "both"),
    (dict(name="piecewise_constant"), "--lr_scheduler", "needs its rules"),
    (dict(name="piecewise_constant", scheduler_args=["step_rules=1:x,0.1"]), "--lr_scheduler_args", "factor:step"),
    (dict(name="piecewise_constant", warmup=2, scheduler_args=["step_rules=0.1"]), "--lr_warmup_steps", "no warm-up"),
    (dict(name="warmup_stable_decay", warmup=6, decay=7), "--lr_decay_steps", "exceed the 12 training steps"),
    (dict(name="cosine", scheduler_args=["num_training_steps=5"]), "--lr_scheduler_args", "--max_train_steps"),
    (dict(name="inverse_sqrt", scheduler_args=["timescale=5"]), "--lr_scheduler_args", "--lr_scheduler_timescale"),
    (dict(name="cosine", scheduler_args=["nonsense=1"]), "--lr_scheduler_args", "accepts: num_cycles"),
    (dict(name="cosine", scheduler_type="StepLR", scheduler_args=["step_size=2"]), "--lr_scheduler", "ignored"),
    (dict(name="constant", warmup=2, scheduler_type="StepLR", scheduler_args=["step_size=2"]), "--lr_warmup_steps",
     "ignored"),
    (dict(name="constant", scheduler_type="ReduceLROnPlateau"), "--lr_scheduler_type", "metric"),
    (dict(name="constant", scheduler_type="torch.optim.SGD"), "--lr_scheduler_type", "not a torch learning-rate"),
    (dict(name="constant", scheduler_type="StepLr"), "--lr_scheduler_type", "did you mean 'StepLR'"),
    (dict(name="constant", scheduler_type="StepLR"), "--lr_scheduler_args", "step_size"),
    (dict(name="constant", scheduler_type="StepLR", scheduler_args=["step_size=2", "last_epoch=3"]),
     "--lr_scheduler_args", "set by sdtune"),
    (dict(name="adafactor"), "--lr_scheduler", "needs --optimizer_type Adafactor"),
])
def test_refusals(kw, where, words):
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=LR)
    kw = dict(kw)
    name = kw.pop("name")
    with pytest.raises(UserError) as err:
        build_lr_scheduler(name, opt, total_steps=12, note=None, **kw)
    assert err.value.where == where and words in err.value.message, err.value.message


def test_adafactor_name_is_adafactors_own_schedule():
    from sdtune.train.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(4, 4))
    opt = build_optimizer("Adafactor", [{"params": [param], "lr": 1e-3}], 1e-3, note=None)
    sched = build_lr_scheduler("adafactor", opt, total_steps=5, note=None)
    assert type(sched).__name__ == "AdafactorSchedule"


def test_options_refuse_before_anything_loads():
    """The same checks run on the options (no torch, and --dry_run sees them)."""
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args

    def opts(*extra):
        base = ["train", "--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "o"]
        return options_from_args(build_parser("train").parse_args([*base, *extra]))

    assert opts("--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "0.2").lr_decay_steps is not None
    with pytest.raises(UserError, match="--lr_scheduler_power: only acts with --lr_scheduler polynomial"):
        opts("--lr_scheduler", "cosine", "--lr_scheduler_power", "2")
    with pytest.raises(UserError, match="--lr_scheduler_args: expected key=value"):
        opts("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size")
    with pytest.raises(UserError, match="cosine_with_min_lr needs the lowest learning rate"):
        opts("--lr_scheduler", "cosine_with_min_lr")


# ------------------------------------------------------------------ in a real training run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from sdtune.testing import write_training_workspace

    root = tmp_path_factory.mktemp("sched")
    write_training_workspace(root, n=4)
    return root


def train_run(ws: Path, out: Path, *extra: str):
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    args = ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "1", "--learning_rate", str(LR), "--seed", "1", "--max_data_loader_n_workers", "0",
            "--optimizer_type", "SGDNesterov", "--logging_dir", str(out / "logs"), *extra]
    return train(options_from_args(build_parser("train").parse_args(args)))


def logged(logging_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(logging_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]


@pytest.mark.slow
def test_schedules_act_in_training(ws, tmp_path):
    # the rate logged after optimizer step k is the schedule's value at k
    # (TensorBoard stores float32)
    train_run(ws, tmp_path / "w", "--max_train_steps", "4", "--lr_scheduler", "warmup_stable_decay",
              "--lr_warmup_steps", "1", "--lr_decay_steps", "2", "--lr_scheduler_min_lr_ratio", "0.1")
    assert logged(tmp_path / "w" / "logs", "lr/unet") == pytest.approx([LR * wsd(k, 1, 2, 4, 0.1) for k in range(1, 5)],
                                                                        rel=1e-6)
    train_run(ws, tmp_path / "s", "--max_train_steps", "3", "--lr_scheduler_type", "StepLR",
              "--lr_scheduler_args", "step_size=2", "gamma=0.1")
    assert logged(tmp_path / "s" / "logs", "lr/unet") == pytest.approx([LR * 0.1 ** (k // 2) for k in range(1, 4)],
                                                                        rel=1e-6)


# ------------------------------------------------------------------ against sd-scripts itself

KOHYA_CURVES = r"""
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from library import train_util
out = []
for c in json.loads(sys.argv[2]):
    ns = argparse.Namespace(optimizer_type="AdamW", lr_scheduler=c["name"], max_train_steps=c["total"],
        lr_warmup_steps=c.get("warmup", 0), lr_decay_steps=c.get("decay", 0), lr_scheduler_num_cycles=c.get("cycles", 1),
        lr_scheduler_power=1.0, lr_scheduler_timescale=c.get("timescale"), lr_scheduler_min_lr_ratio=c.get("ratio"),
        lr_scheduler_args=c.get("args"), lr_scheduler_type=c.get("type", ""))
    p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.SGD([p], lr=0.5)
    s = train_util.get_scheduler_fix(ns, opt, 1)
    vals = []
    for _ in range(c["total"] + 1):
        vals.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
    out.append(vals)
print("JSON" + json.dumps(out))
"""
KOHYA_CASES = [
    {"name": "inverse_sqrt", "total": 12, "warmup": 3},
    {"name": "inverse_sqrt", "total": 12, "warmup": 3, "timescale": 5},
    {"name": "cosine_with_min_lr", "total": 12, "warmup": 2, "ratio": 0.1},
    {"name": "cosine_with_min_lr", "total": 12, "ratio": 0.25, "cycles": 2},
    {"name": "warmup_stable_decay", "total": 12, "warmup": 2, "decay": 4},
    {"name": "warmup_stable_decay", "total": 12, "warmup": 3, "decay": 0.5, "ratio": 0.2,
     "args": ["warmup_type='cosine'", "decay_type='linear'"]},
    {"name": "warmup_stable_decay", "total": 12, "decay": 5, "cycles": 2},
    {"name": "piecewise_constant", "total": 12, "args": ["step_rules='1:3,0.5:7,0.1'"]},
    {"name": "constant", "total": 12, "type": "StepLR", "args": ["step_size=3", "gamma=0.5"]},
]


@pytest.mark.sdscripts  # runs sd-scripts itself: `make test-sdscripts` (see conftest.py)
def test_same_curves_as_sd_scripts(tmp_path):
    """sd-scripts' get_scheduler_fix on the same flags (one process), run in its own environment."""
    import json
    import os
    import subprocess

    script = tmp_path / "kohya_curves.py"
    script.write_text(KOHYA_CURVES)
    proc = subprocess.run([os.environ["SDTUNE_SDSCRIPTS_PYTHON"], str(script),
                           os.environ.get("SDTUNE_SDSCRIPTS_DIR", "/work/kohya/sd-scripts"), json.dumps(KOHYA_CASES)],
                          capture_output=True, text=True, timeout=600, check=True)
    theirs = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("JSON"))[4:])
    for case, ref in zip(KOHYA_CASES, theirs):
        ours = curve(case["name"], total=case["total"], warmup=case.get("warmup", 0), decay=case.get("decay"),
                     num_cycles=case.get("cycles"), timescale=case.get("timescale"), min_lr_ratio=case.get("ratio"),
                     scheduler_type=case.get("type"), scheduler_args=[a.replace("'", "") for a in case.get("args") or []])
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15), case
