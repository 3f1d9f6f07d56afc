"""sd-scripts' --console_log_level / --console_log_file / --console_log_simple act on what sdtune prints:
its own lines, Python logging of the libraries, transformers' and diffusers' loggers, Python warnings."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from sdtune import console
from sdtune.errors import UserError

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def _default_console():
    console.reset()
    yield
    console.reset()


def emit_one_of_each():
    console.note("an information line")
    console.note("note: a note")
    console.note("warning: a warning", stderr=True)
    logging.getLogger("somelib").info("library info")
    logging.getLogger("somelib").warning("library warning")
    import transformers.utils.logging as tlog

    tlog.get_logger("transformers.modeling_utils").error("transformers error")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("python warning", UserWarning, stacklevel=1)


def test_default_output_is_sdtunes_plain_lines(capsys):
    console.setup_console()
    emit_one_of_each()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["an information line", "note: a note"]
    # the libraries' lines are left to Python's defaults (pytest collects them here)
    assert err.splitlines()[0] == "warning: a warning" and "library info" not in out + err
    assert logging.getLogger().level == logging.WARNING


def test_level_hides_lower_lines_everywhere(capsys):
    console.setup_console("WARNING")
    emit_one_of_each()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["note: a note"]  # sdtune's notes are warnings, its information is not
    assert "library warning" in err and "transformers error" in err and "python warning" in err
    console.setup_console("ERROR")
    emit_one_of_each()
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["transformers error"]
    console.setup_console("INFO")
    emit_one_of_each()
    out, err = capsys.readouterr()
    assert "library info" in err and "an information line" in out


def test_simple_puts_the_libraries_lines_on_stdout(capsys):
    console.setup_console(simple=True)
    emit_one_of_each()
    out, err = capsys.readouterr()
    assert "library warning" in out and "python warning" in out and "library info" in out
    assert err == "warning: a warning\n"  # sdtune's own stderr lines keep their stream


def test_log_file_gets_every_line_once_and_appends(tmp_path, capsys):
    log = tmp_path / "logs" / "run.log"  # the folder is created
    log.parent.mkdir()
    log.write_text("an earlier run\n")
    console.setup_console("INFO", log)
    emit_one_of_each()
    console.log_error("error: the end")
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # instead of the terminal, as in sd-scripts
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier run"  # appended, never truncated
    # one stamped line per record (a Python warning carries its source line below it)
    body = [re.sub(rf"^{STAMP} ", "", line) for line in lines[1:] if re.match(STAMP, line)]
    assert [b.split(None, 1)[0] for b in body] == ["INFO", "WARNING", "WARNING", "INFO", "WARNING", "ERROR",
                                                   "WARNING", "ERROR"]
    text = "\n".join(body)
    for what in ("an information line", "note: a note", "warning: a warning", "library info", "library warning",
                 "transformers error", "python warning", "error: the end"):
        assert text.count(what) == 1, what


def test_simple_log_file_holds_the_messages(tmp_path):
    log = tmp_path / "run.log"
    console.setup_console("WARNING", log, simple=True)
    emit_one_of_each()
    lines = log.read_text().splitlines()
    assert lines[:3] == ["note: a note", "warning: a warning", "library warning"]


def test_unwritable_log_file_is_one_line_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError) as err:
        console.setup_console(None, blocker / "run.log")
    assert err.value.where == str(blocker / "run.log") and "cannot write the log file" in err.value.message
    with pytest.raises(UserError):
        console.setup_console(None, tmp_path)  # a folder
    console.note("still printed")  # the previous output is unchanged


def test_reset_restores_the_defaults(capsys):
    root_level = logging.getLogger().level
    console.setup_console("DEBUG", simple=True)
    console.reset()
    assert logging.getLogger().level == root_level
    emit_one_of_each()
    out, _err = capsys.readouterr()
    assert out.splitlines() == ["an information line", "note: a note"]


@pytest.mark.slow
def test_training_run_writes_its_log_file(tmp_path, capsys, tiny_model_file):
    """The real command: --console_log_file gets the run's lines; a late error ends it, in the file too."""
    from sdtune.cli import main
    from sdtune.testing import make_dataset

    tiny_model_file(tmp_path / "model", "sd1", seed=0, fmt="diffusers")
    make_dataset(tmp_path / "data", n=2, seed=0, metadata=tmp_path / "meta.json")
    log = tmp_path / "train.log"
    common = ["train", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--in_json", str(tmp_path / "meta.json"),
              "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--resolution", "64",
              "--max_data_loader_n_workers", "0", "--console_log_file", str(log)]
    assert main([*common, "--max_train_steps", "1"]) == 0
    first = log.read_text()
    assert re.search(rf"^{STAMP} INFO +model: .*Stable Diffusion 1.x", first, re.M)
    assert re.search(rf"^{STAMP} INFO +saved .*last.safetensors$", first, re.M)
    out = capsys.readouterr().out
    assert "saved" not in out
    # the error is found after the model loaded: it is the file's last line, and on stderr
    assert main([*common, "--max_train_steps", "2", "--initial_step", "2", "--console_log_level", "WARNING"]) == 2
    lines = log.read_text()[len(first):].splitlines()
    assert len(lines) == 1 and re.match(rf"{STAMP} ERROR +error: --initial_step: starts at step 2", lines[0]), lines
    assert "error: --initial_step" in capsys.readouterr().err
