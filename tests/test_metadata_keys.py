"""Metadata keys as the preparation steps write them, found again by training.

`--full_path` (merge, prepare) and `sdtune tag --output_path` write the image path as it was globbed:
relative to the working directory when the folder was given relatively (`train_data/img_000.png`),
absolute otherwise. The dataset reader first takes a key as a path from the working directory (as
sd-scripts' fine-tuning dataset did when its documented workflow was written), then relative to the
image folder, then as a stem with the image extensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.data.metadata import load_records, resolve_key
from sdtune.errors import UserError


def _images(folder: Path, names=("img_000.png", "img_001.jpg", "img_002.webp")) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (16 + 8 * i, 16), (40 * i, 0, 0)).save(folder / name)
        (folder / name).with_suffix(".caption").write_text(f"caption {i}\n")
    return [folder / n for n in names]


@pytest.mark.parametrize("image_dir", ["train_data", None])
def test_full_path_keys_from_a_relative_folder(tmp_path, monkeypatch, image_dir):
    """--train_data_dir train_data (legacy form), or a dataset config without image_dir (what
    sd-scripts' config documents allow for --full_path metadata)."""
    monkeypatch.chdir(tmp_path)
    files = _images(tmp_path / "train_data")
    assert main(["merge", "--only", "captions", "--full_path", "train_data", "meta.json"]) == 0
    keys = list(json.loads(Path("meta.json").read_text()))
    assert keys == ["train_data/img_000.png", "train_data/img_001.jpg", "train_data/img_002.webp"]
    records = load_records("meta.json", image_dir)
    assert [r.path.resolve() for r in records] == files
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 2"]


@pytest.mark.parametrize("image_dir", [True, False])
def test_full_path_keys_from_an_absolute_folder(tmp_path, monkeypatch, image_dir):
    monkeypatch.chdir(tmp_path / "..")  # anywhere: the keys are absolute
    folder = tmp_path / "train_data"
    files = _images(folder)
    assert main(["merge", "--only", "captions", "--full_path", str(folder), str(tmp_path / "meta.json")]) == 0
    assert list(json.loads((tmp_path / "meta.json").read_text())) == [str(f) for f in files]
    assert [r.path for r in load_records(tmp_path / "meta.json", folder if image_dir else None)] == files


@pytest.mark.slow
def test_tag_output_path_keys_from_a_relative_folder(tmp_path, monkeypatch):
    from sdtune.testing import write_colour_tagger

    monkeypatch.chdir(tmp_path)
    files = _images(tmp_path / "train_data", ("a.png", "b.png"))
    tagger = write_colour_tagger(tmp_path / "tagger")
    assert main(["tag", "train_data", "--model_dir", str(tagger), "--output_path", "tags.json"]) == 0
    meta = json.loads(Path("tags.json").read_text())
    assert sorted(meta) == ["train_data/a.png", "train_data/b.png"]
    assert [r.path.resolve() for r in load_records("tags.json", "train_data")] == files


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "images"
    in_folder = _images(folder, ("a.png", "b.png"))
    here = _images(tmp_path, ("a.png", "b.png"))
    # a key that names a file from the working directory is that file (sd-scripts' original order) ...
    assert resolve_key("a.png", folder).resolve() == here[0]
    # ... else it is relative to the image folder
    (tmp_path / "a.png").unlink()
    assert resolve_key("a.png", folder) == in_folder[0]
    # a stem is looked for in the image folder first, then from the working directory
    assert resolve_key("b", folder) == in_folder[1]
    assert resolve_key("b", None).resolve() == here[1]
    # an absolute key is itself, whatever the folder
    assert resolve_key(str(in_folder[1]), tmp_path / "elsewhere") == in_folder[1]
    assert resolve_key("nothing", folder) is None


def test_keys_not_found_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "train_data")
    (tmp_path / "meta.json").write_text(json.dumps({"elsewhere/img_000.png": {}, "train_data/img_001.jpg": {}}))
    with pytest.raises(UserError) as err:
        load_records("meta.json", "train_data")
    assert "1 of 2 images" in err.value.message and "elsewhere/img_000.png" in err.value.message
    assert str(tmp_path) in err.value.message  # the working directory the keys were tried from
