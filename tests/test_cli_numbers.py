"""Negative numbers given to numeric flags reach validation and get its range message."""

import subprocess
import sys

import pytest

from sdtune.cli import attach_negative_numbers


@pytest.mark.parametrize("value", ["-1e-5", "-1E-5", "-0.5", "-.5", "-3", "-2e+3"])
def test_negative_values_are_attached(value):
    assert attach_negative_numbers(["train", "--learning_rate", value, "--seed", "1"]) == \
        ["train", f"--learning_rate={value}", "--seed", "1"]


def test_flags_and_attached_values_are_left_alone():
    argv = ["train", "--dry_run", "--learning_rate=-1", "--v2", "--seed", "-x", "--clip_skip", "2"]
    assert attach_negative_numbers(argv) == argv


@pytest.mark.parametrize("flag,value,expected", [
    ("--learning_rate", "-1e-5", "greater than 0"),
    ("--max_train_steps", "-3", "greater than or equal to 1"),
    ("--noise_offset", "-0.05", "greater than or equal to 0"),
])
@pytest.mark.slow
def test_negative_value_gets_the_range_message(tmp_path, flag, value, expected):
    code = ("import sys; from sdtune.cli import main; "
            f"sys.exit(main(['train', '--pretrained_model_name_or_path', 'm.safetensors', '--dry_run', {flag!r}, {value!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {flag}:") and expected in lines[0], lines[0]
    assert "expected one argument" not in out.stderr
