"""A damaged training state given to --resume is refused with one line naming the file.

Before, a truncated optimizer.bin or model.safetensors ended in a raw PytorchStreamReader or
SafetensorError traceback, after the model had loaded. Truncation is seen from the files' own
structure (safetensors header against the size, the zip's end record) before anything loads; damage
that only reading shows is caught at load and traced to its file.
"""

import io
import shutil
import zipfile
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.testing import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("corrupt_state")
    tiny_model_file(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    assert main(_train(root, root / "run", "--save_state")) == 0
    assert (root / "run" / "N-state" / "optimizer.bin").is_file()
    return root


def _train(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model.safetensors"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", *extra]


def _damaged_copy(ws: Path, tmp_path: Path) -> Path:
    state = tmp_path / "N-state"
    shutil.copytree(ws / "run" / "N-state", state)
    return state


def _refused(ws: Path, state: Path, tmp_path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(_train(ws, tmp_path / "out", "--max_train_steps", "3", "--resume", str(state))) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    assert not (tmp_path / "out" / "N.safetensors").exists()
    return errors[0]


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "scheduler.bin", "random_states_0.pkl"])
def test_a_truncated_state_file_is_named(ws, tmp_path, capsys, name):
    state = _damaged_copy(ws, tmp_path)
    data = (state / name).read_bytes()
    (state / name).write_bytes(data[:len(data) * 2 // 3])
    line = _refused(ws, state, tmp_path, capsys)
    assert f"{name} is truncated" in line and str(state) in line and "--resume" in line


def test_a_missing_state_file_is_named(ws, tmp_path, capsys):
    state = _damaged_copy(ws, tmp_path)
    (state / "optimizer.bin").unlink()
    line = _refused(ws, state, tmp_path, capsys)
    assert "optimizer.bin is missing" in line


def test_damage_that_only_reading_shows_is_traced_to_its_file(ws, tmp_path, capsys):
    """A whole zip archive whose pickled record is garbage: its structure passes the cheap checks, and
    loading fails inside torch, which does not say which file it was reading."""
    state = _damaged_copy(ws, tmp_path)
    path = state / "optimizer.bin"
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    rewritten = io.BytesIO()
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_STORED) as archive:
        for info, data in members:
            archive.writestr(info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data)
    path.write_bytes(rewritten.getvalue())
    assert zipfile.ZipFile(path).testzip() is None  # a sound archive
    line = _refused(ws, state, tmp_path, capsys)
    assert "damaged training state: optimizer.bin cannot be read" in line and str(state) in line

