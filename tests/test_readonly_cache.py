"""Disk caches on read-only storage: a complete cache is read without writing; one that must be
written and cannot be is refused with one line that names the fix (--cache_dir), never a traceback.

Before, a read-only image folder, a read-only --cache_dir or `sdtune cache` over read-only images
ended in `OSError: [Errno 30] Read-only file system`, even when every entry was already there.
"""

import json
import shutil
from pathlib import Path

import pytest
from _unwritable import read_only

from sdtune.cli import main
from sdtune.testing import make_dataset

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("rocache")
    tiny_model_file(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=3, seed=0, metadata=root / "meta.json")
    meta = json.loads((root / "meta.json").read_text())
    (root / "two.json").write_text(json.dumps(dict(list(meta.items())[:2])))
    return root


def _data(ws: Path, images: Path, meta: str = "meta.json") -> list[str]:
    return ["--pretrained_model_name_or_path", str(ws / "model.safetensors"), "--in_json", str(ws / meta),
            "--train_data_dir", str(images), "--resolution", "64", "--max_data_loader_n_workers", "0"]


def _train(ws: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *_data(ws, images), "--output_dir", str(out), "--train_batch_size", "1", "--max_train_steps", "1",
            "--learning_rate", "1e-3", "--cache_latents_to_disk", *extra]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below `folder` with its size and modification time: what a write would change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    return errors[0]


def test_a_complete_cache_on_read_only_storage_is_read_without_writing(ws, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ws / "data", images)
    assert main(_train(ws, images, tmp_path / "first")) == 0  # fills the latent and text caches beside the images
    cache = images / ".sdtune-cache"
    # without its index every image is hashed again and the index would be rewritten: reading must not need it
    for index in cache.glob("index*.json"):
        index.unlink()
    before = _files(images)
    with read_only(images):
        capsys.readouterr()
        assert main(_train(ws, images, tmp_path / "second")) == 0
        out = capsys.readouterr()
        assert "all 3 entries up to date" in out.out + out.err
        assert main(["cache", *_data(ws, images)]) == 0
        assert "3 reused, 0 encoded" in capsys.readouterr().out
    assert _files(images) == before
    assert (tmp_path / "second" / "last.safetensors").is_file()


def test_sdtune_cache_over_read_only_images_names_the_fix(ws, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ws / "data", images)
    with read_only(images):
        capsys.readouterr()
        assert main(["cache", *_data(ws, images)]) == 2
        line = _one_line(capsys)
    assert str(images / ".sdtune-cache") in line and "Read-only file system" in line and "--cache_dir" in line
    # the fix works: the cache goes elsewhere
    with read_only(images):
        assert main(["cache", *_data(ws, images), "--cache_dir", str(tmp_path / "cache")]) == 0
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3


def test_training_over_read_only_images_without_a_cache_names_the_fix(ws, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ws / "data", images)
    with read_only(images):
        capsys.readouterr()
        assert main(_train(ws, images, tmp_path / "out")) == 2
        line = _one_line(capsys)
    assert "cannot write the latent cache" in line and "--cache_dir" in line
    assert not (tmp_path / "out").exists()


def test_a_read_only_cache_dir_is_refused_with_one_line(ws, tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    with read_only(tmp_path / "cache"):
        capsys.readouterr()
        assert main(_train(ws, ws / "data", tmp_path / "out", "--cache_dir", str(tmp_path / "cache"))) == 2
        line = _one_line(capsys)
    assert str(tmp_path / "cache") in line and "Read-only file system" in line and "--cache_dir" in line


def test_an_incomplete_read_only_cache_is_refused_before_encoding(ws, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ws / "data", images)
    assert main(["cache", *_data(ws, images, "two.json")]) == 0  # two of the three images
    with read_only(images):
        capsys.readouterr()
        assert main(["cache", *_data(ws, images)]) == 2
        line = _one_line(capsys)
    assert "1 entry must be encoded" in line and "--cache_dir" in line and str(images / ".sdtune-cache") in line
    assert len(list((images / ".sdtune-cache").glob("*.safetensors"))) == 2
