"""What prepare_buckets_latents.py records decides the run: each image's bucket, and the cache options
that find its latents; a conflicting flag is told, once, that the record wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtune.config import parse_options
from sdtune.data.plan import build_plan
from sdtune.data.prepared import apply_prepared
from sdtune.testing import make_dataset
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_file) -> Path:
    from sdtune.cli import main

    root = tmp_path_factory.mktemp("prepared")
    model = tiny_model_file(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "img", n=4, seed=1, metadata=root / "meta.json")  # 96x64, 64x96, 80x80, 128x64
    assert main(["prepare_buckets_latents", str(root / "img"), str(root / "meta.json"), str(root / "meta_lat.json"),
                 str(model), "--max_resolution", "64,64", "--min_bucket_reso", "32", "--bucket_reso_steps", "32",
                 "--mixed_precision", "no", "--max_data_loader_n_workers", "0"]) == 0
    return root


def _opts(root: Path, meta: str = "meta_lat.json", **given) -> TrainOptions:
    return parse_options(TrainOptions, {"pretrained_model_name_or_path": str(root / "model.safetensors"),
                                        "in_json": str(root / meta), "train_data_dir": str(root / "img"),
                                        "output_dir": str(root / "out"), **given})


def _rewrite(root: Path, name: str, change) -> str:
    meta = json.loads((root / "meta_lat.json").read_text())
    for key, record in meta.items():
        change(key, record)
    (root / name).write_text(json.dumps(meta))
    return name


def test_recorded_precision_becomes_the_runs_vae_precision(prepared):
    opts, notes = apply_prepared(_opts(prepared), default_resolution=512)
    # --mixed_precision no at prepare: a float32 VAE. On a GPU the cache would otherwise encode in
    # float16 (a different cache key); the record turns --no_half_vae on, so the entries are found.
    assert (opts.no_half_vae, opts.cache_latents_to_disk, opts.flip_aug) == (True, True, False)
    assert len(notes) == 1 and "4 images train in the" in notes[0] and "float32 VAE" in notes[0]

    f16 = _rewrite(prepared, "f16.json", lambda k, r: r["sdtune_latents"].update(dtype="float16"))
    opts, notes = apply_prepared(_opts(prepared, f16, no_half_vae=True), default_resolution=512)
    assert opts.no_half_vae is False
    assert any(n.startswith("--no_half_vae: not used") and "float16" in n for n in notes)


def test_bucket_flags_give_way_to_the_record(prepared):
    given = _opts(prepared, resolution="512", enable_bucket=True, bucket_no_upscale=True)
    opts, notes = apply_prepared(given, default_resolution=512)
    (line,) = [n for n in notes if "not used for the prepared images" in n]
    assert line.startswith("--bucket_no_upscale, --enable_bucket, --resolution: not used")
    recorded = {r["train_resolution"][0] * 1000 + r["train_resolution"][1]
                for r in json.loads((prepared / "meta_lat.json").read_text()).values()}
    plan = build_plan(opts, seed=0, default_resolution=512)
    assert {s.bucket[0] * 1000 + s.bucket[1] for s in plan.samples} == recorded
    assert "buckets recorded in the metadata" in plan.summary()


def test_a_recorded_bucket_is_used_as_it_stands(prepared):
    # a bucket no bucketing option would choose for a 96x64 image: it is trained there all the same,
    # resized to cover it (96x64 -> 192x128, then centre-cropped to 160x128)
    def edit(key, record):
        if record["image_size"] == [96, 64]:
            record["train_resolution"] = [160, 128]
    name = _rewrite(prepared, "edited.json", edit)
    opts, _notes = apply_prepared(_opts(prepared, name), default_resolution=512)
    sample = next(s for s in build_plan(opts, seed=0, default_resolution=512).samples if s.size == (96, 64))
    assert (sample.bucket, sample.resized) == ((160, 128), (192, 128))


def test_mirrored_latents_turn_flip_aug_on(prepared):
    flipped = _rewrite(prepared, "flip.json", lambda k, r: r["sdtune_latents"].update(flip=True))
    opts, notes = apply_prepared(_opts(prepared, flipped), default_resolution=512)
    assert opts.flip_aug is True and "flip_aug on" in notes[0]


def test_what_cannot_be_used_is_said(prepared):
    # color_aug changes the pixels: the buckets hold, the latents are not used
    opts, notes = apply_prepared(_opts(prepared, color_aug=True), default_resolution=512)
    assert not opts.caches_latents and any("color_aug" in n and "not used" in n for n in notes)
    # one image without train_resolution: nothing recorded is used, and the note says why
    def drop_one(key, record, seen=[]):
        if not seen:
            seen.append(record.pop("train_resolution"))
    partial = _rewrite(prepared, "partial.json", drop_one)
    opts, notes = apply_prepared(_opts(prepared, partial, resolution="64"), default_resolution=512)
    assert notes == [n for n in notes if "recorded for only 3 of 4 images" in n] and len(notes) == 1
    assert not opts.caches_latents
    plan = build_plan(opts, seed=0)
    assert "buckets recorded" not in plan.summary()


def test_dry_run_shows_the_prepared_run(prepared, capsys):
    from sdtune.cli import main

    assert main(["train", "--pretrained_model_name_or_path", str(prepared / "model.safetensors"), "--in_json",
                 str(prepared / "meta_lat.json"), "--train_data_dir", str(prepared / "img"), "--output_dir",
                 str(prepared / "out"), "--resolution", "64", "--dry_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: prepared data: 4 images train in the")
    assert out[1].startswith("note: --resolution: not used for the prepared images")
    assert any("buckets recorded in the metadata" in line for line in out)
    assert any(line.startswith("latent cache: on disk") and "4 entry files present" in line for line in out)
