"""Metadata key resolution, dataset TOML precedence and errors, legacy --in_json mapping."""

import json
from pathlib import Path

import pytest
from PIL import Image

from sdtune.config import add_options, parse_options
from sdtune.data.metadata import load_records
from sdtune.data.options import DatasetOptions
from sdtune.data.toml_config import dataset_specs
from sdtune.errors import UserError


def _img(path: Path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_metadata_keys_absolute_relative_stem_and_subfolder(tmp_path):
    d = tmp_path / "img"
    a = _img(d / "a.png")
    b = _img(d / "sub" / "b.jpg")
    c = _img(d / "c.WEBP")
    other = _img(tmp_path / "elsewhere" / "x.png")
    meta = {str(other): {"caption": "abs"}, "a.png": {"caption": "rel", "image_size": [64, 48]},
            "sub/b": {"tags": "t1, t2"}, "c": {"caption": "stem", "train_resolution": [64, 64]}}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    recs = {r.key: r for r in load_records(tmp_path / "m.json", d)}
    assert recs[str(other)].path == other
    assert recs["a.png"].path == a and recs["a.png"].image_size == (64, 48)
    assert recs["sub/b"].path == b and recs["sub/b"].tags == "t1, t2" and recs["sub/b"].caption is None
    assert recs["c"].path == c


def test_jsonl_metadata(tmp_path):
    _img(tmp_path / "a.png")
    lines = [json.dumps({"image_path": "a.png", "caption": "x", "tags": "y"}), ""]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    (r,) = load_records(tmp_path / "m.jsonl", tmp_path)
    assert (r.caption, r.tags) == ("x", "y")


def test_missing_images_lists_ten_and_counts(tmp_path):
    _img(tmp_path / "ok.png")
    meta = {"ok.png": {}} | {f"gone_{i:02d}": {} for i in range(13)}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        load_records(tmp_path / "m.json", tmp_path)
    msg = err.value.message
    assert "13 of 14 images" in msg and "and 3 more" in msg and "gone_09" in msg and "gone_10" not in msg
    assert str(tmp_path / "m.json") in msg


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"), ("[1, 2]", "top level is a list"), ('{"a": "caption"}', "expected an object"),
    ('{"a.png": {"image_size": [0, 5]}}', "image_size")])
def test_bad_metadata_files(tmp_path, content, needle):
    _img(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(UserError, match=needle):
        load_records(tmp_path / "m.json", tmp_path)


def _setup(tmp_path, toml: str, **cli):
    _img(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "m.json").write_text(json.dumps({"a.png": {"caption": "c"}}))
    cfg = tmp_path / "data.toml"
    cfg.write_text(toml.replace("IMG", str(tmp_path / "img")))
    return DatasetOptions(dataset_config=str(cfg), **cli), cfg


def test_precedence_subset_dataset_general_cli_default(tmp_path):
    toml = """
[general]
shuffle_caption = true
keep_tokens = 1
flip_aug = true
resolution = 640
[[datasets]]
keep_tokens = 2
batch_size = 3
enable_bucket = true
  [[datasets.subsets]]
  image_dir = "IMG"
  metadata_file = "IMG/m.json"
  keep_tokens = 3
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = "IMG"
  metadata_file = "IMG/m2.json"
[[datasets]]
resolution = [512, 768]
  [[datasets.subsets]]
  metadata_file = "IMG/m.json"
  image_dir = "IMG"
  flip_aug = false
"""
    opts, _ = _setup(tmp_path, toml, train_batch_size=7, caption_separator=";", dataset_repeats=2, resolution="256")
    (tmp_path / "img" / "m2.json").write_text("{}")
    d0, d1 = dataset_specs(opts)
    s0, s1 = d0.subsets
    assert s0.caption_options["keep_tokens"] == 3          # subset
    assert s1.caption_options["keep_tokens"] == 2          # dataset
    assert d1.subsets[0].caption_options["keep_tokens"] == 1  # general
    assert s0.caption_options["caption_separator"] == ";"  # command line
    assert s0.caption_options["caption_dropout_rate"] == 0.0  # default
    assert s0.num_repeats == 5 and s1.num_repeats == 2    # subset, then --dataset_repeats
    assert d0.batch_size == 3 and d1.batch_size == 7      # dataset, then --train_batch_size
    assert d0.resolution == (640, 640) and d1.resolution == (512, 768)  # general beats --resolution
    assert s0.flip_aug and not d1.subsets[0].flip_aug
    assert d0.enable_bucket and not d1.enable_bucket
    assert [s.index for s in (s0, s1, d1.subsets[0])] == [0, 1, 2]


@pytest.mark.parametrize("toml,needle", [
    ('[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n  flip_agu = true\n',
     "datasets[0].subsets[0]: unknown key 'flip_agu' (did you mean 'flip_aug'?)"),
    ('[general]\nbatch_sise = 2\n[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "[general]: unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    ('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n  batch_size = 2\n',
     "batch_size belongs in [[datasets]]"),
    ('[[datasets]]\nimage_dir = "x"\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "image_dir belongs in a [[datasets.subsets]]"),
    ('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n  caption_extension = ".txt"\n',
     "DreamBooth key"),
    ('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "IMG"\n', "need metadata_file"),
    ('[[datasets]]\nbatch_size = "4"\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "datasets[0].batch_size: batch_size = '4' has the wrong type"),
    ('[[datasets]]\nresolution = 500\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "not a multiple of 8"),
    ('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n  alpha_mask = 1\n',
     "alpha_mask = 1 has the wrong type"),
    ('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n  face_crop_aug_range = [2.0, 4.0]\n',
     "not supported"),
    ('[[datasets]]\nenable_bucket = true\nresolution = 2048\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "outside the bucket sides"),
    ('[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 32\n  [[datasets.subsets]]\n  metadata_file = "IMG/m.json"\n',
     "min_bucket_reso = 32 is below bucket_reso_steps = 64"),
    ('[[dataset]]\n', "did you mean 'datasets'"),
    ('[[datasets]]\nresolution = 512\n', "no [[datasets.subsets]]"),
])
def test_config_errors_name_file_table_and_key(tmp_path, toml, needle):
    opts, cfg = _setup(tmp_path, toml, resolution="512")
    with pytest.raises(UserError) as err:
        dataset_specs(opts)
    assert needle in err.value.message
    assert str(cfg) in err.value.message


def test_legacy_flags_make_one_subset(tmp_path):
    _img(tmp_path / "img" / "a.png")
    (tmp_path / "m.json").write_text("{}")
    opts = DatasetOptions(in_json=str(tmp_path / "m.json"), train_data_dir=str(tmp_path / "img"), resolution="512,768",
                          train_batch_size=4, enable_bucket=True, flip_aug=True, dataset_repeats=3)
    (d,) = dataset_specs(opts)
    (s,) = d.subsets
    assert s.metadata_file == tmp_path / "m.json" and s.image_dir == tmp_path / "img"
    assert (d.resolution, d.batch_size, d.enable_bucket, s.flip_aug, s.num_repeats) == ((512, 768), 4, True, True, 3)


def test_no_resolution_and_no_dataset_are_errors(tmp_path):
    with pytest.raises(UserError, match="no dataset given"):
        dataset_specs(DatasetOptions())
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(UserError, match="no training resolution"):
        dataset_specs(DatasetOptions(in_json=str(tmp_path / "m.json")))
    (d,) = dataset_specs(DatasetOptions(in_json=str(tmp_path / "m.json")), default_resolution=768)
    assert d.resolution == (768, 768)


def test_options_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser, DatasetOptions)
    ns = parser.parse_args(["--in_json", "m.json", "--resolution", "512,768", "--flip_aug", "--train_batch_size", "2"])
    opts = parse_options(DatasetOptions, ns)
    assert (opts.resolution, opts.flip_aug, opts.train_batch_size, opts.bucket_reso_steps) == ("512,768", True, 2, 64)
    with pytest.raises(UserError, match="face crop"):
        parse_options(DatasetOptions, {"face_crop_aug_range": "2.0,4.0"})
    with pytest.raises(UserError, match="cannot be combined"):
        parse_options(DatasetOptions, {"dataset_config": "d.toml", "in_json": "m.json"})
    with pytest.raises(UserError, match="--resolution"):
        parse_options(DatasetOptions, {"resolution": "abc"})
