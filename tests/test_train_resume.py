"""Exact resume: a run continued from a saved state ends bit-identical to an uninterrupted one.

Each case trains once without interruption, saving states along the way, then resumes from several
of them; every tensor of the resumed final model must equal the uninterrupted one's.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


@pytest.fixture(scope="module")
def ws(tmp_path_factory, training_workspace):
    root = tmp_path_factory.mktemp("resume")
    training_workspace(root, n=5)
    # 5 images: with batch 1 an epoch has an odd number of batches, so gradient accumulation 2 leaves a
    # half step at every epoch's end
    return root


def _args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0", *extra]


BUCKETS = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32"]
CASES = {
    # bucketing, accumulation 2 over 5 batches per epoch (3 steps: the last one has a single batch),
    # cosine schedule (the scheduler state matters), an epoch-end state and two mid-epoch ones
    "buckets+accumulation": [*BUCKETS, "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                             "--max_train_steps", "5", "--lr_scheduler", "cosine", "--save_every_n_steps", "2",
                             "--save_every_n_epochs", "1", "--save_state"],
    # cached latents (the posterior sample comes from the batch generator), EMA in the state
    "cached-latents+ema": ["--cache_latents", "--train_batch_size", "2", "--max_train_steps", "5",
                           "--save_every_n_steps", "2", "--save_state", "--ema", "--ema_decay", "0.8"],
}
RESUME_FROM = {"buckets+accumulation": ["N-step00000002-state", "N-000001-state", "N-step00000004-state"],
               "cached-latents+ema": ["N-step00000002-state", "N-step00000004-state"]}


def _assert_identical(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    unequal = [k for k in x if not torch.equal(x[k], y[k])]
    assert not unequal, f"{len(unequal)} of {len(x)} tensors differ, e.g. {unequal[:3]}"


@pytest.fixture(scope="module")
def full_runs(ws):
    runs = {}
    for case, extra in CASES.items():
        out = ws / f"full-{case}"
        assert main(_args(ws, out, *extra)) == 0
        runs[case] = out
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_exact(ws, full_runs, case, tmp_path):
    full = full_runs[case]
    base = load_file(str(full / "N-step00000002.safetensors"))
    final = load_file(str(full / "N.safetensors"))
    assert any(not torch.equal(base[k], final[k]) for k in base)  # training went on after step 2
    for state in RESUME_FROM[case]:
        record = json.loads((full / state / "train_state.json").read_text())
        assert 0 < record["position"]["global_step"] < 5
        out = tmp_path / state
        assert main(_args(ws, out, *CASES[case], "--resume", str(full / state))) == 0
        _assert_identical(full / "N.safetensors", out / "N.safetensors")
        if "--ema" in CASES[case]:
            _assert_identical(full / "N-ema.safetensors", out / "N-ema.safetensors")


def test_epoch_state_sits_at_a_step_boundary(full_runs):
    """5 batches with accumulation 2: the epoch's last (single) batch closes step 3."""
    record = json.loads((full_runs["buckets+accumulation"] / "N-000001-state" / "train_state.json").read_text())
    assert record["position"] == {"global_step": 3, "epoch": 1, "batch": 0, "micro_steps": 0}


def test_changed_options_are_refused_then_allowed(ws, full_runs, tmp_path, capsys):
    state = full_runs["buckets+accumulation"] / "N-step00000002-state"
    changed = [a if a != "1e-3" else "2e-3" for a in _args(ws, tmp_path / "o", *CASES["buckets+accumulation"])]
    changed[changed.index("--seed") + 1] = "4"
    capsys.readouterr()
    assert main(changed + ["--resume", str(state)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.001 -> 0.002" in err and "seed: 3 -> 4" in err and "--resume_allow_changes" in err
    assert not (tmp_path / "o").exists()  # refused before any work
    # where the output goes and how long to train may change without the flag
    assert main(_args(ws, tmp_path / "p", *CASES["buckets+accumulation"], "--max_train_steps", "3",
                      "--resume", str(state))) == 0
    assert (tmp_path / "p" / "N.safetensors").is_file()
    assert main(changed + ["--resume", str(state), "--resume_allow_changes"]) == 0
    assert (tmp_path / "o" / "N.safetensors").is_file()


def test_resume_from_a_missing_or_foreign_folder_is_a_user_error(ws, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_args(ws, tmp_path / "o", "--max_train_steps", "1", "--resume", str(tmp_path / "empty"))) == 2
    assert "not a training state folder" in capsys.readouterr().err


def test_a_changed_dataset_is_refused_then_allowed_and_a_moved_one_resumes(ws, full_runs, tmp_path, capsys):
    import shutil

    state = full_runs["buckets+accumulation"] / "N-step00000002-state"
    meta = json.loads((ws / "meta.json").read_text())
    fewer = dict(list(meta.items())[:-1])
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    args = _args(ws, tmp_path / "o", *CASES["buckets+accumulation"], "--resume", str(state),
                 "--in_json", str(tmp_path / "fewer.json"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the dataset differs from the run that saved this state (5 -> 4 images" in err and \
        "--resume_allow_changes" in err
    assert not (tmp_path / "o" / "N.safetensors").exists()
    assert main(args + ["--resume_allow_changes"]) == 0
    assert "the dataset changed since the state was saved" in capsys.readouterr().out
    # the same images in another folder: the epoch continues exactly
    shutil.copytree(ws / "data", tmp_path / "moved")
    moved = tmp_path / "m"
    assert main(_args(ws, moved, *CASES["buckets+accumulation"], "--resume", str(state),
                      "--train_data_dir", str(tmp_path / "moved"))) == 0
    _assert_identical(full_runs["buckets+accumulation"] / "N.safetensors", moved / "N.safetensors")
