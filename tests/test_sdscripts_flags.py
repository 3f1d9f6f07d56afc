"""Every flag of sd-scripts' fine_tune.py is implemented or refused with its reason, never "unrecognized".

The flags are src/sdtune/train/sdscripts_fine_tune_flags.txt, generated from sd-scripts' own parser
by scripts/sdscripts_fine_tune_flags.py. With SDTUNE_SDSCRIPTS_PYTHON set to a Python in which
sd-scripts imports (and SDTUNE_SDSCRIPTS_DIR to its folder), the list is regenerated and compared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.cli import build_parser
from sdtune.config import flatten_config_file
from sdtune.errors import UserError
from sdtune.train import sdscripts_flags
from sdtune.train.command import options_from_args
from sdtune.train.options import TrainOptions

REPO = Path(__file__).resolve().parents[1]
FLAGS_FILE = REPO / "src" / "sdtune" / "train" / "sdscripts_fine_tune_flags.txt"
REQUIRED = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", "out"]
COMMAND_ONLY = {"config_file", "output_config", "help"}  # parser arguments that are not training options


def read_flags() -> list[tuple[str, str, str]]:
    rows = []
    for line in FLAGS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            flag, arity, dest = line.split()
            rows.append((flag, arity, dest))
    return rows


FLAGS = read_flags()


def train_parser() -> argparse.ArgumentParser:
    root = build_parser("train")
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_the_list_is_sd_scripts_parser():
    header = FLAGS_FILE.read_text().splitlines()[:5]
    assert any("commit 48d368fa" in line for line in header) and any("scripts/sdscripts_fine_tune_flags.py" in line
                                                                      for line in header)
    flags = {f for f, _a, _d in FLAGS}
    assert len(flags) == len(FLAGS) > 150
    # flags the issue saw rejected as unrecognized, a list flag, a switch, and argparse's own alias pair
    assert {"--console_log_level", "--console_log_file", "--console_log_simple", "--lr_scheduler_args",
            "--use_8bit_adam", "-h", "--help"} <= flags
    assert ("--lr_scheduler_args", "*", "lr_scheduler_args") in FLAGS and ("--use_8bit_adam", "0", "use_8bit_adam") in FLAGS


def _sample_values(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        value = str(list(action.choices)[0])
    elif action.type is int:
        value = "1"
    elif action.type is float:
        value = "0.5"
    else:
        value = "k=1" if action.nargs in ("*", "+") else "x"
    return [value]


@pytest.mark.parametrize("flag, arity, dest", [row for row in FLAGS if row[0] not in ("-h", "--help")],
                         ids=[row[0] for row in FLAGS if row[0] not in ("-h", "--help")])
@pytest.mark.slow
def test_flag_is_implemented_or_refused_with_its_reason(flag, arity, dest):
    parser = train_parser()
    action = parser._option_string_actions.get(flag)
    assert action is not None, f"{flag} would be unrecognized"
    refused = action.dest.startswith("_unsupported_")
    if refused:
        values = [] if arity == "0" else ["1"]
    else:
        # the same number of values as sd-scripts takes, so a command line keeps its meaning
        assert {"0": [0], "1": [None, "?"], "*": ["*", "+"]}[arity].count(action.nargs) == 1, (flag, action.nargs)
        values = _sample_values(action)
    # the flag is followed by another one: a wrong arity would swallow it or leave a value over
    args = build_parser("train").parse_args(["train", *REQUIRED, flag, *values, "--seed", "7"])
    assert args.seed == 7
    if refused:
        name = action.dest.removeprefix("_unsupported_")
        with pytest.raises(UserError) as err:
            options_from_args(args)
        reason = sdscripts_flags.NOT_SUPPORTED.get(name) or sdscripts_flags.PLANNED[name]
        assert err.value.message.startswith(f"--{name}: {reason}")
    else:
        assert action.dest == dest and (dest in TrainOptions.model_fields or dest in COMMAND_ONLY)
        assert action.help != argparse.SUPPRESS, f"{flag} is implemented but hidden from --help"


@pytest.mark.parametrize("dest", sorted({d for _f, _a, d in FLAGS} - COMMAND_ONLY))
def test_config_file_key_is_an_option_or_refused(dest, tmp_path):
    """sd-scripts' --config_file holds the same names: each is an option or refused with its reason."""
    if dest in TrainOptions.model_fields:
        return
    problems = sdscripts_flags.refused_keys(flatten_config_file({dest: True}), "c.toml")
    assert problems and problems[0].startswith(f"c.toml: {dest}: ")


def test_refused_lists_name_only_sd_scripts_flags_or_their_keys():
    """A refusal for a flag that sd-scripts' fine_tune.py does not have would be dead text."""
    known = {d for _f, _a, d in FLAGS}
    # sd-scripts' other trainers define it; sdtune explains it for users coming from there
    other_trainers = {"skip_until_initial_step"}
    assert set(sdscripts_flags.NOT_SUPPORTED) | set(sdscripts_flags.PLANNED) <= known | other_trainers


def test_issue_flags_are_options_not_refusals():
    for name in ("console_log_level", "console_log_file", "console_log_simple", "initial_epoch", "initial_step",
                 "lr_scheduler_type", "lr_scheduler_args", "lr_decay_steps", "lr_scheduler_timescale",
                 "lr_scheduler_min_lr_ratio", "save_n_epoch_ratio"):
        assert name in TrainOptions.model_fields
        assert name not in sdscripts_flags.NOT_SUPPORTED and name not in sdscripts_flags.PLANNED


@pytest.mark.sdscripts  # runs sd-scripts itself: `make test-sdscripts` (see conftest.py)
def test_list_matches_a_fresh_generation():
    out = subprocess.run([os.environ["SDTUNE_SDSCRIPTS_PYTHON"], str(REPO / "scripts" / "sdscripts_fine_tune_flags.py"),
                          "--sd-scripts", os.environ.get("SDTUNE_SDSCRIPTS_DIR", "/work/kohya/sd-scripts"),
                          "--commit", "x"], capture_output=True, text=True, check=True, timeout=600).stdout
    fresh = [tuple(line.split()) for line in out.splitlines() if line and not line.startswith("#")]
    assert fresh == FLAGS


@pytest.mark.slow
def test_fine_tune_py_accepts_the_logging_flags(tmp_path):
    """sd-scripts' entry point itself: once "unrecognized arguments", now parsed and validated."""
    proc = subprocess.run([sys.executable, str(REPO / "fine_tune.py"), "--pretrained_model_name_or_path",
                           str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "o"), "--dry_run",
                           "--console_log_level", "WARNING", "--console_log_simple", "--console_log_file",
                           str(tmp_path / "log.txt"), "--initial_step", "3"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert "unrecognized" not in proc.stderr
    # past the parser and the option checks: the first problem is the missing dataset
    assert proc.returncode == 2 and proc.stderr.startswith("error: --dataset_config: no dataset given"), proc.stderr
