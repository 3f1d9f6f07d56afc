"""sd-scripts flags that shape a run: --initial_step / --initial_epoch, --save_n_epoch_ratio,
--output_config, the ModelSpec metadata_* flags and --resize_interpolation, each against values
derived here by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from sdtune.cli import build_parser, main
from sdtune.errors import UserError
from sdtune.train.command import options_from_args
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LR = 0.01


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from sdtune.testing import write_training_workspace

    root = tmp_path_factory.mktemp("runflags")
    write_training_workspace(root, n=2)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(root / "thumb.png")
    return root


def base(ws: Path, out: Path) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--learning_rate", str(LR), "--seed", "1", "--max_data_loader_n_workers", "0"]


def options(*argv: str) -> TrainOptions:
    return options_from_args(build_parser("train").parse_args(list(argv)))


def run(ws: Path, out: Path, *extra: str):
    from sdtune.train.trainer import train

    return train(options(*base(ws, out), *extra))


def modelspec(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------ where a run starts counting


def test_initial_position_arithmetic():
    opts = options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--initial_epoch", "3")
    step, epoch, _note = opts.initial_position(steps_per_epoch=4, max_steps=20)
    assert (step, epoch) == (8, 2)  # (3 - 1) epochs of 4 steps; 0-based epoch 2 is the third
    opts = options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--initial_step", "9")
    assert opts.initial_position(steps_per_epoch=4, max_steps=20)[:2] == (9, 2)  # step 9 lies in the third epoch
    with pytest.raises(UserError, match="--initial_step: starts at step 9, but training ends at step 9"):
        opts.initial_position(steps_per_epoch=4, max_steps=9)
    assert options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o").initial_position(4, 9) is None
    with pytest.raises(UserError, match="--initial_epoch: --initial_step and --initial_epoch both"):
        options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--initial_step", "1",
                "--initial_epoch", "2")


def test_initial_step_starts_the_counters_and_a_fresh_schedule(ws, tmp_path, capsys):
    out = tmp_path / "o"
    # 2 images, batch 1: 2 steps per epoch; step 3 lies in epoch 2, which is trained from its first batch
    result = run(ws, out, "--train_batch_size", "1", "--initial_step", "3", "--max_train_steps", "5",
                 "--save_every_n_steps", "1", "--lr_scheduler", "linear", "--logging_dir", str(out / "logs"),
                 "--metadata_usage_hint", "say 'circle'", "--metadata_thumbnail", str(ws / "thumb.png"),
                 "--metadata_trigger_phrase", "tiny", "--metadata_merged_from", "a, b", "--metadata_preprocessor", "none",
                 "--metadata_is_negative_embedding", "False")
    assert "--initial_step: counting from step 3, training epoch 2 from its first batch; 2 steps to go" in \
        capsys.readouterr().out
    assert result.steps == 5 and len(result.losses) == 2  # steps 4 and 5
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["N-step00000004.safetensors", "N.safetensors"]
    assert json.loads(modelspec(out / "N-step00000004.safetensors")["sdtune.training"])["epochs"] == 2
    # sd-scripts' meaning: the schedule is not moved; linear over 5 steps, from its start
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("lr/unet")] == [
        (4, pytest.approx(LR * (1 - 1 / 5), rel=1e-6)), (5, pytest.approx(LR * (1 - 2 / 5), rel=1e-6))]
    # and the ModelSpec metadata_* flags, as sd-scripts writes them (the thumbnail as a data URL)
    meta = modelspec(out / "N.safetensors")
    import base64

    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode((ws / "thumb.png").read_bytes()).decode()
    assert (meta["modelspec.usage_hint"], meta["modelspec.trigger_phrase"], meta["modelspec.merged_from"],
            meta["modelspec.preprocessor"], meta["modelspec.is_negative_embedding"]) == (
        "say 'circle'", "tiny", "a, b", "none", "False")


def test_metadata_thumbnail_must_exist(tmp_path):
    with pytest.raises(UserError, match="--metadata_thumbnail: .* is neither an image file nor a data: URL"):
        options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--metadata_thumbnail",
                str(tmp_path / "missing.png"))


# ------------------------------------------------------------------ save at least N times


def test_save_n_epoch_ratio(ws, tmp_path):
    opts = options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--save_n_epoch_ratio", "3")
    # sd-scripts: save_every_n_epochs = floor(epochs / N) or 1
    assert [opts.save_every_n_epochs_for(e) for e in (1, 2, 3, 7, 10)] == [1, 1, 1, 2, 3]
    with pytest.raises(UserError, match="--save_every_n_epochs would be ignored"):
        options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--save_n_epoch_ratio", "3",
                "--save_every_n_epochs", "2")
    out = tmp_path / "o"
    # 2 images, batch 2: one step per epoch; 4 epochs, at least 2 saves: every 2 epochs (the 4th is the final save)
    run(ws, out, "--train_batch_size", "2", "--max_train_epochs", "4", "--save_n_epoch_ratio", "2")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["N-000002.safetensors", "N.safetensors"]


# ------------------------------------------------------------------ --output_config


def test_output_config_writes_what_a_run_reads_back(tmp_path, capsys):
    flags = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", str(tmp_path / "out"),
             "--learning_rate", "3e-6", "--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
             "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99", "--resolution", "512,768", "--use_8bit_adam",
             "--metadata_title", 'a "quoted" title\twith tab', "--wandb_api_key", "secret", "--initial_epoch", "2",
             "--lr_warmup_steps", "0.1"]
    name = tmp_path / "cfg"
    assert main(["train", *flags, "--output_config", "--config_file", str(name)]) == 0
    path = tmp_path / "cfg.toml"  # sd-scripts' rule: .toml is added
    assert f"wrote {path} (11 options); left out: wandb_api_key (a secret)" in capsys.readouterr().out
    written = tomllib.loads(path.read_text())
    assert written == {
        "pretrained_model_name_or_path": "model.safetensors", "output_dir": str(tmp_path / "out"), "learning_rate": 3e-6,
        "lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1,
        "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"], "resolution": "512,768", "use_8bit_adam": True,
        "metadata_title": 'a "quoted" title\twith tab', "initial_epoch": 2,
        "lr_warmup_steps": 0.1}  # a number, as sd-scripts' own parser would have made it
    # read back by name, as sd-scripts does: the same options as the command line gave
    from_file = options("train", "--config_file", str(name))
    from_line = options("train", *flags)
    assert from_file.model_dump() == {**from_line.model_dump(), "wandb_api_key": None, "lr_warmup_steps": 0.1}
    # never overwritten, and the file to write must be named
    assert main(["train", *flags, "--output_config", "--config_file", str(name)]) == 2
    assert "already exists; nothing was written" in capsys.readouterr().err
    assert tomllib.loads(path.read_text()) == written
    assert main(["train", *flags, "--output_config"]) == 2
    assert "--output_config: needs the file to write" in capsys.readouterr().err


# ------------------------------------------------------------------ --resize_interpolation


def test_resize_interpolation_reaches_the_images(tmp_path):
    from sdtune.data import BucketBatchSampler, build_plan
    from sdtune.data.dataset import make_loader

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"caption": "noise"}}))

    def first_image(*extra):
        opts = options("train", "--pretrained_model_name_or_path", "m", "--output_dir", "o", "--in_json",
                       str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "img"), "--resolution", "64",
                       "--max_data_loader_n_workers", "0", *extra)
        plan = build_plan(opts, seed=0)
        sampler = BucketBatchSampler(plan, seed=0)
        sampler.set_epoch(0)
        return next(iter(make_loader(plan, sampler))).images[0].numpy()

    src = Image.open(tmp_path / "img" / "a.png")
    for name, pil in (("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC)):
        expected = np.asarray(src.resize((64, 64), pil), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
        assert np.allclose(first_image("--resize_interpolation", name), expected, atol=1e-6)
    default = np.asarray(src.resize((64, 64), Image.Resampling.BOX), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.allclose(first_image(), default, atol=1e-6)  # area averaging when shrinking


@pytest.mark.sdscripts  # runs sd-scripts itself: `make test-sdscripts` (see conftest.py)
def test_sd_scripts_reads_the_written_config(tmp_path):
    import os
    import subprocess

    flags = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", "out", "--learning_rate", "3e-6",
             "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99", "--resolution", "512,768", "--use_8bit_adam",
             "--metadata_title", 'a "quoted" title', "--lr_scheduler", "linear", "--lr_warmup_steps", "0.1"]
    assert main(["train", *flags, "--output_config", "--config_file", str(tmp_path / "cfg")]) == 0
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import os; os.chdir(sys.argv[1]); import fine_tune\n"
            "from library import train_util\n"
            "given, sys.argv = sys.argv, ['fine_tune.py', '--config_file', sys.argv[2]]  # as its command line\n"
            "p = fine_tune.setup_parser(); a = p.parse_args()\n"
            "a = train_util.read_config_from_file(a, p)\n"
            "print('JSON' + json.dumps({k: getattr(a, k) for k in given[3:]}))\n")
    keys = ["pretrained_model_name_or_path", "output_dir", "learning_rate", "optimizer_args", "resolution",
            "use_8bit_adam", "metadata_title", "lr_warmup_steps"]
    proc = subprocess.run([os.environ["SDTUNE_SDSCRIPTS_PYTHON"], "-c", code,
                           os.environ.get("SDTUNE_SDSCRIPTS_DIR", "/work/kohya/sd-scripts"), str(tmp_path / "cfg"), *keys],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("JSON"))[4:])
    assert theirs == {"pretrained_model_name_or_path": "model.safetensors", "output_dir": "out", "learning_rate": 3e-6,
                      "optimizer_args": ["weight_decay=0.01", "betas=0.9,0.99"], "resolution": "512,768",
                      "use_8bit_adam": True, "metadata_title": 'a "quoted" title', "lr_warmup_steps": 0.1}


def test_resume_accepts_other_logging_counting_and_metadata_flags():
    """They change neither the weights nor the data order, so a state resumes without them (and the
    schedule flags, which do change the arithmetic, are still compared)."""
    from sdtune.train import state

    common = ["train", "--pretrained_model_name_or_path", "m", "--output_dir", "o"]
    saved = options(*common, "--initial_step", "3", "--console_log_level", "ERROR", "--console_log_file", "x.log",
                    "--console_log_simple", "--save_n_epoch_ratio", "2", "--metadata_usage_hint", "h",
                    "--metadata_trigger_phrase", "t", "--metadata_preprocessor", "p", "--metadata_merged_from", "a",
                    "--metadata_is_negative_embedding", "False")
    record = {"options": state.significant_options(saved.model_dump(mode="json"))}
    assert state.check_compatible(record, options(*common, "--initial_epoch", "2").model_dump(mode="json"),
                                  False, "s") == []
    with pytest.raises(UserError, match="lr_decay_steps: None -> '3'"):
        state.check_compatible(record, options(*common, "--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps",
                                               "3").model_dump(mode="json"), False, "s")
