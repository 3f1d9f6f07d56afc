"""An unwritable output stops a training run before any model loads, with one line.

Before, such a run trained every step and failed only at its first save, with a traceback, and could
not save its state either. Each place the run writes is made unwritable in the ways a user meets:
a path below a regular file (the folder cannot be created), a read-only mount, an immutable folder.
"""

import time
from pathlib import Path

import pytest
from _unwritable import immutable, read_only

from sdtune.cli import main
from sdtune.testing import make_dataset


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("preflight")
    tiny_model_file(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    (root / "prompts.txt").write_text("a red square\n")
    (root / "a_file").write_text("not a folder\n")
    return root


def _train(ws: Path, out, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model.safetensors"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "1", "--learning_rate", "1e-3",
            "--max_data_loader_n_workers", "0", *extra]


def _refused(args: list[str], capsys) -> str:
    capsys.readouterr()
    started = time.time()
    assert main(args) == 2
    seconds = time.time() - started
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    assert "steps" not in captured.err and seconds < 60  # no training step ran
    return lines[0]


# (option under test, its value below a regular file, how the line names it)
BELOW_A_FILE = {
    "output_dir": (lambda ws, tmp: _train(ws, ws / "a_file" / "out"), "a_file/out", "--output_dir"),
    "logging_dir": (lambda ws, tmp: _train(ws, tmp / "out", "--logging_dir", str(ws / "a_file" / "logs")),
                    "a_file/logs", "--logging_dir"),
    "console_log_file": (lambda ws, tmp: _train(ws, tmp / "out", "--console_log_file", str(ws / "a_file" / "run.log")),
                         "a_file", "--console_log_file"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BELOW_A_FILE))
def test_an_uncreatable_output_folder_stops_the_run_at_once(ws, tmp_path, capsys, case):
    make_args, where, option = BELOW_A_FILE[case]
    line = _refused(make_args(ws, tmp_path), capsys)
    assert where in line and ("Not a directory" in line or "a file, not a folder" in line) and option in line
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind


def test_an_unwritable_samples_folder_stops_the_run_at_once(ws, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sample").write_text("a file where the samples would go\n")
    line = _refused(_train(ws, tmp_path / "out", "--sample_prompts", str(ws / "prompts.txt"),
                           "--sample_every_n_steps", "1"), capsys)
    assert "sample images" in line and str(tmp_path / "out" / "sample") in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sample"]


def test_an_uncreatable_cache_dir_stops_the_run_before_the_model_loads(ws, tmp_path, capsys):
    line = _refused(_train(ws, tmp_path / "out", "--cache_latents_to_disk", "--cache_dir", str(ws / "a_file" / "c")),
                    capsys)
    assert "cannot write the latent cache" in line and "--cache_dir" in line and "a_file/c" in line


def test_a_read_only_output_folder_stops_the_run_at_once(ws, tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        line = _refused(_train(ws, tmp_path / "ro" / "out"), capsys)
    assert "Read-only file system" in line and "--output_dir" in line


def test_an_immutable_output_folder_stops_the_run_at_once(ws, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with immutable(tmp_path / "out"):
        line = _refused(_train(ws, tmp_path / "out"), capsys)
    assert str(tmp_path / "out") in line and "Operation not permitted" in line and "--output_dir" in line


def test_a_refused_run_removes_the_folders_it_made_for_the_check(ws, tmp_path, capsys):
    _refused(_train(ws, tmp_path / "new" / "out", "--logging_dir", str(ws / "a_file" / "logs")), capsys)
    assert not (tmp_path / "new").exists()
