"""Continuing a finished run: N steps with --save_state, then --resume to 2N, equals 2N straight.

The end of a run writes `<name>-state` with --save_state alone (as sd-scripts does). Its position
must be where the run really stopped: inside an epoch when the last step falls there, so that the
continued run finishes that epoch instead of skipping to the next one. Both cases are checked, with
bucketing, gradient accumulation, caption dropout, caption shuffling and EMA on; the schedule is constant,
the one whose learning rate at a step does not depend on the run's length.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.train import state

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


@pytest.fixture(scope="module")
def ws(tmp_path_factory, training_workspace):
    root = tmp_path_factory.mktemp("continue")
    training_workspace(root, n=5)
    # 5 images in 3 buckets (32x96, 64x64, 96x32), batch 1: 5 batches per epoch; with accumulation 2
    # that is 3 optimizer steps per epoch, the last one closed by the epoch's single last batch
    return root


def _args(ws: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--caption_dropout_rate", "0.3",
            "--shuffle_caption", "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--ema", "--ema_decay", "0.8", "--max_train_steps", str(steps), "--save_state", *extra]


def _unequal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _optimizer_tensors(state_dir: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(state_dir / "optimizer.bin", map_location="cpu", weights_only=True)
    return {f"{p}.{name}": t for p, entry in saved["state"].items() for name, t in entry.items()}


def _position(state_dir: Path) -> dict:
    return json.loads((state_dir / "train_state.json").read_text())["position"]


# (N, where the N-step run stops): 2 steps end after batch 4 of 5 in the first epoch (batches 0-3
# make two steps of two), 3 steps end exactly at the epoch's end
CASES = {"mid-epoch": (2, {"global_step": 2, "epoch": 0, "batch": 4, "micro_steps": 0}),
         "epoch-end": (3, {"global_step": 3, "epoch": 1, "batch": 0, "micro_steps": 0})}


@pytest.fixture(scope="module")
def straight(ws):
    """6 steps in one run. With a constant schedule its step-4 save (model and state) is what a 4-step
    run ends with, so one run serves as the 2N reference of both cases. Without --output_name, so that
    it also shows the default save names."""
    out = ws / "straight"
    args = _args(ws, out, 6, "--save_every_n_steps", "4", "--save_every_n_epochs", "1")
    i = args.index("--output_name")
    del args[i:i + 2]
    assert main(args) == 0
    return {4: (out / "at-step00000004.safetensors", out / "at-step00000004-state"),
            6: (out / "last.safetensors", out / "last-state")}


@pytest.fixture(scope="module")
def first(ws):
    """The N-step runs, with --save_state alone."""
    runs = {}
    for n, _ in CASES.values():
        runs[n] = ws / f"first{n}"
        assert main(_args(ws, runs[n], n)) == 0
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_n_steps_then_continued_to_2n_equals_2n_straight(ws, straight, first, tmp_path, case, capsys):
    n, stopped_at = CASES[case]
    # --save_state alone writes the state at the end, named as sd-scripts names it
    assert sorted(p.name for p in first[n].iterdir() if p.name.endswith("-state")) == ["N-state"]
    assert _position(first[n] / "N-state") == stopped_at
    capsys.readouterr()
    continued = tmp_path / "continued"
    assert main(_args(ws, continued, 2 * n, "--resume", str(first[n] / "N-state"))) == 0
    assert "note: the training length changed" not in capsys.readouterr().out  # constant: nothing to warn about

    model, state_dir = straight[2 * n]
    a, b = load_file(str(model)), load_file(str(continued / "N.safetensors"))
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert unet and not _unequal({k: a[k] for k in unet}, {k: b[k] for k in unet})
    assert not _unequal(a, b)
    ema = model.with_name(model.name.replace(".safetensors", "-ema.safetensors"))
    assert not _unequal(load_file(str(ema)), load_file(str(continued / "N-ema.safetensors")))
    assert _unequal(load_file(str(first[n] / "N.safetensors")), a)  # the second half trained something
    assert not _unequal(_optimizer_tensors(state_dir), _optimizer_tensors(continued / "N-state"))
    assert _position(state_dir) == _position(continued / "N-state")
    summary = json.loads((continued / "N-train_summary.json").read_text())
    assert summary["steps"] == 2 * n  # the step count covers the whole run


def test_the_reference_positions(straight):
    """Hand-derived: step 4 ends after batch 1 of the second epoch, step 6 at the end of the second."""
    assert _position(straight[4][1]) == {"global_step": 4, "epoch": 1, "batch": 2, "micro_steps": 0}
    assert _position(straight[6][1]) == {"global_step": 6, "epoch": 2, "batch": 0, "micro_steps": 0}


def test_continuing_without_steps_left_is_refused(ws, first, tmp_path, capsys):
    capsys.readouterr()
    assert main(_args(ws, tmp_path / "again", 2, "--resume", str(first[2] / "N-state"))) == 2
    err = capsys.readouterr().err
    assert "this state is at step 2 and the run ends at step 2: nothing is left to train" in err
    assert "--max_train_steps 2+N" in err
    assert not (tmp_path / "again" / "N.safetensors").exists()


def _record(**options) -> dict:
    saved = {"max_train_steps": 3, "max_train_epochs": None, "lr_scheduler": "cosine", "lr_warmup_steps": 0.0}
    return {"all_options": {**saved, **options}}


@pytest.mark.parametrize("scheduler, warmup, note", [
    ("constant", 0.0, False), ("constant_with_warmup", 2.0, False),  # the same rate at every step, any length
    ("constant_with_warmup", "10%", True), ("constant_with_warmup", 0.5, True),  # warm-up scales with the length
    ("cosine", 0.0, True), ("linear", 0.0, True), ("polynomial", 0.0, True), ("cosine_with_restarts", 0.0, True),
])
def test_a_length_dependent_schedule_is_noted_when_the_length_changes(scheduler, warmup, note):
    now = {"max_train_steps": 6, "max_train_epochs": None, "lr_scheduler": scheduler, "lr_warmup_steps": warmup}
    line = state.length_change_note(_record(lr_scheduler=scheduler, lr_warmup_steps=warmup), now)
    assert (line is not None) == note
    if note:
        assert "--max_train_steps 3 -> 6" in line and f"the {scheduler} schedule" in line
    # the same length: the schedule continues as it was
    assert state.length_change_note(_record(lr_scheduler=scheduler, lr_warmup_steps=warmup),
                                    {**now, "max_train_steps": 3}) is None


def test_a_longer_cosine_schedule_takes_over_at_the_first_continued_step():
    """A 2-step cosine run ends at learning rate 0; continued over 4 steps, the next step must use the
    4-step schedule's rate at step 2, 1e-3 * (1 + cos(pi * 2 / 4)) / 2 = 5e-4, not the saved 0."""
    from diffusers.optimization import get_scheduler

    def build(total):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=total)

    optimizer, scheduler = build(2)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    longer_optimizer, longer = build(4)
    longer_optimizer.load_state_dict(optimizer.state_dict())
    longer.load_state_dict(scheduler.state_dict())
    state.follow_new_length(longer)
    assert longer_optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    assert longer.get_last_lr() == [longer_optimizer.param_groups[0]["lr"]]


def test_a_cosine_run_continued_trains_at_once(ws, tmp_path, capsys):
    """End to end: with the saved rate (0) the continued step would leave the weights unchanged."""
    first, continued = tmp_path / "first", tmp_path / "continued"
    assert main(_args(ws, first, 2, "--lr_scheduler", "cosine")) == 0
    capsys.readouterr()
    assert main(_args(ws, continued, 3, "--lr_scheduler", "cosine", "--resume", str(first / "N-state"))) == 0
    assert "note: the training length changed (--max_train_steps 2 -> 3)" in capsys.readouterr().out
    a, b = load_file(str(first / "N.safetensors")), load_file(str(continued / "N.safetensors"))
    assert [k for k in _unequal(a, b) if k.startswith("model.diffusion_model.")]


def test_without_output_name_the_saves_have_sd_scripts_names(straight):
    out = straight[6][0].parent
    # sd-scripts' train_util: "{}-{:06d}" with "epoch", "{}-step{:08d}" with "at", "{}-state" with "last";
    # epoch 1 ends at step 3, epoch 2 (the last) and step 6 are the final save
    saves = [p.name for p in out.iterdir() if p.name.endswith(("-state", ".safetensors")) and "-ema" not in p.name]
    assert sorted(saves) == [
        "at-step00000004-state", "at-step00000004.safetensors", "epoch-000001-state", "epoch-000001.safetensors",
        "last-state", "last.safetensors"]
