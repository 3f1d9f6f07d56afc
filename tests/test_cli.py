"""The command line: fast help, one-line errors for user mistakes, tracebacks only with --debug."""

import subprocess
import sys

import pytest

from sdtune.cli import main


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse exits for usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_help_imports_no_torch():
    """Every command's --help prints (all its flags) without importing the heavy libraries."""
    code = ("import contextlib, io, sys\n"
            "from sdtune.cli import COMMANDS, main\n"
            "for cmd in COMMANDS:\n"
            "    out = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(out):\n"
            "            main([cmd, '--help'])\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (cmd, exc.code)\n"
            "    assert '--debug' in out.getvalue(), cmd\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_option_suggests(capsys):
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "x", "--learning_rat", "1")
    assert code == 2
    assert err.count("\n") == 1 and "--learning_rat" in err and "did you mean --learning_rate" in err


def test_bad_value_names_the_flag(capsys):
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--in_json", "j", "--learning_rate", "fast")
    assert code == 2 and err.count("\n") == 1 and "--learning_rate" in err


def test_out_of_range_value(capsys):
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--in_json", "j", "--max_train_steps", "0")
    assert code == 2 and err.startswith("error: --max_train_steps") and "Traceback" not in err


def test_known_but_unsupported_sdscripts_flag_is_refused(capsys):
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--in_json", "j", "--lowram")
    assert code == 2 and "--lowram: --lowram is not supported" in err


def test_unsupported_sdscripts_key_in_a_config_file_gets_its_reason(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("[training]\nfp8_base = true\n")
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--in_json", "j", "--config_file", str(tmp_path / "c.toml"))
    assert code == 2 and "c.toml: fp8_base: fp8 base weights are not supported" in err


def test_missing_model_file(capsys, tmp_path):
    from sdtune.testing import make_dataset

    make_dataset(tmp_path / "d", n=2, metadata=tmp_path / "m.json")
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", str(tmp_path / "nope.safetensors"),
                           "--in_json", str(tmp_path / "m.json"), "--train_data_dir", str(tmp_path / "d"),
                           "--output_dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "nope.safetensors" in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGUSR1 is POSIX")
def test_sigusr1_prints_where_each_thread_is_and_the_process_goes_on(capfd, tmp_path):
    import faulthandler
    import os
    import signal

    main(["train", "--pretrained_model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    capfd.readouterr()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # as `kill -USR1 <pid>` from a shell
    finally:
        faulthandler.unregister(signal.SIGUSR1)
    err = capfd.readouterr().err
    assert "Current thread" in err and "test_sigusr1_prints_where_each_thread_is" in err, err


def test_missing_metadata(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--in_json", str(tmp_path / "missing.json"), "--train_data_dir", str(tmp_path))
    assert code == 2 and "missing.json" in err and err.count("\n") == 1


def test_config_file_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nlearning_rte = 1e-5\n')
    code, _, err = run_cli(capsys, "train", "--config_file", str(cfg), "--pretrained_model_name_or_path", "m")
    assert code == 2 and str(cfg) in err and "learning_rte" in err and "learning_rate" in err


def test_config_file_values_and_command_line_precedence(tmp_path):
    import argparse

    from sdtune.train.command import add_arguments, options_from_args

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npretrained_model_name_or_path = "m"\n[training]\nlearning_rate = 3e-5\n'
                   'max_train_steps = 7\n[saving]\noutput_dir = "o"\n[data]\nin_json = "j"\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from_args(parser.parse_args(["--config_file", str(cfg), "--max_train_steps", "9"]))
    assert (opts.learning_rate, opts.max_train_steps, opts.output_dir) == (3e-5, 9, "o")


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdtune", "train", "--debug", "--pretrained_model_name_or_path", "m",
                             "--output_dir", "o", "--in_json", str(tmp_path / "missing.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_windows_path_in_double_quotes_gets_a_hint(capsys, tmp_path):
    (tmp_path / "ds.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\data\\img"\n')
    code, _, err = run_cli(capsys, "train", "--pretrained_model_name_or_path", "m", "--output_dir", "o",
                           "--dataset_config", str(tmp_path / "ds.toml"))
    assert code == 2 and "ds.toml: not valid TOML" in err and "single quotes ('C:\\data\\img')" in err
    # the hint's spelling is valid TOML and reads as the path
    import tomllib

    assert tomllib.loads("image_dir = 'C:\\data\\img'")["image_dir"] == "C:\\data\\img"


_EXIT_PROBE = """
import atexit, sys, threading, time
from pathlib import Path
import sdtune.cli

out = Path(sys.argv[1])

class Torn:  # its __del__ runs when Python tears this module down at exit
    def __del__(self):
        (out / "torn-down").write_text("")

kept = Torn()
atexit.register(lambda: (out / "exit-handler").write_text(""))

def main(argv, prog):
    print("printed, never flushed", end="")  # a pipe: block-buffered
    if argv == ["thread"]:
        threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text(""))).start()
    return 3

sdtune.cli.main = main
sdtune.cli.run_and_exit(sys.argv[2:])
"""


@pytest.mark.parametrize("args", [[], ["thread"]])
def test_the_commands_exit_with_mains_code_after_the_exit_handlers_without_the_teardown(tmp_path, args):
    """`run_and_exit` (the `sdtune` command and the scripts): main's exit code, buffered output and
    the exit handlers' work arrive; the module teardown is skipped; a running thread is waited for,
    through the ordinary exit."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(tmp_path), *args], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "printed, never flushed"), proc.stderr
    assert (tmp_path / "exit-handler").is_file()
    if args:
        assert (tmp_path / "thread").is_file() and (tmp_path / "torn-down").is_file()
    else:
        assert not (tmp_path / "torn-down").exists()
