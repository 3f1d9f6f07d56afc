"""Secrets (options declared `secret=True`, such as --wandb_api_key) reach no file and no console line:
not the state, the summary, the tracker's config, the ModelSpec, the samples, the console log file nor
--output_config's TOML; a new key on resume is neither refused nor shown. The key still reaches wandb."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.config import public_options, secret_names
from sdtune.testing import make_dataset, write_tiny_model
from sdtune.train import logs, state
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

SECRET = "SECRETVALUE"


def parse(*flags: str) -> TrainOptions:
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args

    return options_from_args(build_parser("train").parse_args(["train", *flags]))


def files_holding(root: Path, needle: str) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


def test_declared_once_on_the_option():
    assert secret_names(TrainOptions) == {"wandb_api_key"}
    opts = parse("--pretrained_model_name_or_path", "m", "--output_dir", "o", "--wandb_api_key", SECRET)
    assert opts.wandb_api_key == SECRET  # it still acts
    assert "wandb_api_key" not in public_options(opts)
    assert SECRET not in repr(opts) and SECRET not in str(opts)


def test_a_tiny_run_and_its_resume_write_and_print_no_secret(tmp_path, capfd):
    from sdtune.cli import main

    write_tiny_model(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    make_dataset(tmp_path / "data", n=2, seed=0, metadata=tmp_path / "meta.json")
    (tmp_path / "prompts.txt").write_text("a red circle --w 64 --h 64 --s 1 --d 3\n")
    out = tmp_path / "out"
    common = ["train", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--in_json", str(tmp_path / "meta.json"),
              "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out), "--output_name", "N",
              "--resolution", "64", "--train_batch_size", "1", "--seed", "1", "--max_data_loader_n_workers", "0",
              "--logging_dir", str(out / "logs"), "--log_with", "tensorboard", "--log_config"]
    assert main([*common, "--max_train_steps", "1", "--wandb_api_key", SECRET, "--save_state",
                 "--save_every_n_steps", "1", "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_at_first",
                 "--console_log_file", str(out / "console.log")]) == 0
    assert (out / "N-state" / state.STATE_FILE).is_file()
    # --log_config: the options reach TensorBoard's text (as indented JSON), the key does not
    events = b"".join(p.read_bytes() for p in (out / "logs").rglob("events.*"))
    assert b'"max_train_steps": 1' in events
    assert (out / "N-train_summary.json").is_file() and any((out / "sample").glob("*.png"))
    # a different key on resume: the state resumes (a key changes nothing in training) and neither key shows
    assert main([*common, "--max_train_steps", "2", "--wandb_api_key", SECRET + "2", "--resume", str(out / "N-state"),
                 "--save_state"]) == 0
    # --output_config writes the other options, not the key
    assert main([*common, "--wandb_api_key", SECRET, "--output_config", "--config_file", str(out / "cfg")]) == 0
    assert "log_config = true" in (out / "cfg.toml").read_text()
    printed = capfd.readouterr()
    assert files_holding(tmp_path, SECRET) == []
    assert SECRET not in printed.out and SECRET not in printed.err
    assert "resum" in printed.out + printed.err + (out / "console.log").read_text()


def test_a_changed_secret_is_no_difference_even_in_a_state_that_holds_one():
    # a state written before secrets were left out still holds the key among its options
    opts = parse("--pretrained_model_name_or_path", "m", "--output_dir", "o", "--wandb_api_key", "new")
    record = {"options": {**state.significant_options(public_options(opts)), "wandb_api_key": "old"}}
    assert state.check_compatible(record, opts.model_dump(mode="json"), False, "s") == []
    changed = parse("--pretrained_model_name_or_path", "m", "--output_dir", "o", "--learning_rate", "1e-3")
    diffs = state.check_compatible(record, public_options(changed), True, "s")
    assert [d.split(":")[0] for d in diffs] == ["learning_rate"]


def test_summary_and_tracker_config_drop_declared_secrets(tmp_path):
    opts = {"learning_rate": 1e-5, "wandb_api_key": SECRET}
    path = logs.write_summary(tmp_path / "s.json", opts, 1, 1.0, 0.1, [])
    assert SECRET not in path.read_text()
    assert logs.sanitize_config(opts) == {"learning_rate": 1e-5}


def test_wandb_run_name_and_api_key_reach_wandb_init(tmp_path):
    """What the run hands to wandb.init (wandb is optional, and a test has no network)."""
    from sdtune.train.build import tracker_init as _tracker_init

    tracker = tmp_path / "t.toml"
    tracker.write_text('[wandb]\nentity = "me"\n')
    opts = parse("--pretrained_model_name_or_path", "m", "--output_dir", "o", "--log_with", "wandb",
                 "--wandb_run_name", "my run", "--wandb_api_key", SECRET, "--log_tracker_config", str(tracker))
    init = _tracker_init(opts, logs)
    args, env = logs.wandb_init_args("finetuning", "20260101", None, {"learning_rate": 1.0}, init["wandb"],
                                     opts.wandb_api_key)
    assert args == {"project": "finetuning", "name": "my run", "entity": "me", "config": {"learning_rate": 1.0}}
    # through the environment of this process, not wandb.login, which stores the key in ~/.netrc
    assert env == {"WANDB_API_KEY": SECRET}
    assert logs.wandb_init_args("p", "r", tmp_path, {}, {}, None) == (
        {"project": "p", "name": "r", "config": {}, "dir": str(tmp_path)}, {})
