"""A corpus of awkward images, each handled as specified: read, converted, or skipped with a reason."""

import json

import numpy as np
import pytest
from PIL import Image

from sdtune.data.images import BadImage, load_image, prepare, read_size
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.errors import UserError


def _exif_rotated(path):
    # Stored 60x20, EXIF orientation 6 (rotate 90 clockwise to display): shown as 20x60.
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # red band on the stored left edge -> top edge when displayed
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=100)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(d / "good.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray(np.full((48, 64), 65535 // 2, np.uint16)).save(d / "gray16.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 32, 64))
    pal.save(d / "palette.png", transparency=0)  # left half green, right half transparent
    Image.new("LA", (64, 64), (80, 0)).save(d / "la.png")  # fully transparent gray
    _exif_rotated(d / "rotated.jpg")
    Image.new("RGB", (640, 64), (1, 2, 3)).save(d / "wide.png")
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    buf = d / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf)
    (d / "truncated.png").write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    return d


def test_sizes_from_headers(corpus):
    assert read_size(corpus / "rotated.jpg") == (20, 60)
    assert read_size(corpus / "cmyk.jpg") == (64, 48)
    assert read_size(corpus / "gray16.png") == (64, 48)
    with pytest.raises(BadImage, match="0 bytes"):
        read_size(corpus / "zero.png")
    with pytest.raises(BadImage, match="not an image"):
        read_size(corpus / "text.jpg")


def test_conversions_to_rgb(corpus):
    img, alpha = load_image(corpus / "cmyk.jpg")
    assert img.mode == "RGB" and alpha is None
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    img, _ = load_image(corpus / "gray16.png")
    assert img.mode == "RGB" and abs(int(np.asarray(img)[0, 0, 0]) - 128) <= 1  # 32767/65535*255
    img, alpha = load_image(corpus / "palette.png")
    arr = np.asarray(img)
    assert tuple(arr[10, 5]) == (0, 255, 0) and tuple(arr[10, 50]) == (255, 255, 255)  # composited on white
    assert alpha[10, 5] == 255 and alpha[10, 50] == 0
    img, alpha = load_image(corpus / "la.png")
    assert tuple(np.asarray(img)[0, 0]) == (255, 255, 255) and alpha.max() == 0
    img, _ = load_image(corpus / "rotated.jpg")
    arr = np.asarray(img).astype(int)
    assert img.size == (20, 60)
    assert arr[:8, :, 0].mean() > 200 and arr[-8:, :, 0].mean() < 50  # the red band is now on top
    with pytest.raises(BadImage, match="cannot be decoded"):
        load_image(corpus / "truncated.png")


def test_prepare_returns_vae_input_range(corpus):
    x = prepare(corpus / "good.png", (64, 64), (64, 64), (64, 64))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], np.array([200, 100, 50]) / 127.5 - 1)


def _opts(corpus, **kw):
    meta = {p.name: {"caption": p.stem} for p in sorted(corpus.iterdir())}
    (corpus.parent / "m.json").write_text(json.dumps(meta))
    return DatasetOptions(in_json=str(corpus.parent / "m.json"), train_data_dir=str(corpus), resolution="64",
                          enable_bucket=True, min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=32, **kw)


def test_plan_skips_bad_files_with_reasons_and_strict_fails(corpus):
    warnings = []
    plan = build_plan(_opts(corpus), seed=0, warn=warnings.append)
    skipped = {p.split("/")[-1]: r for p, r in plan.skipped}
    assert set(skipped) == {"zero.png", "text.jpg"}  # a truncated file has a valid header: found at decode
    assert len(warnings) == 2 and "skipped" in warnings[0]
    by_name = {s.path.split("/")[-1]: s for s in plan.samples}
    assert by_name["rotated.jpg"].size == (20, 60) and by_name["rotated.jpg"].bucket[1] > by_name["rotated.jpg"].bucket[0]
    assert by_name["wide.png"].bucket == (128, 32)  # 10:1 goes to the widest bucket
    assert "2 images skipped" in plan.summary() and "1 image loses more than 25%" in plan.summary()
    with pytest.raises(UserError, match="bad image"):
        build_plan(_opts(corpus, strict=True), seed=0, warn=warnings.append)


def test_too_small_for_no_upscale_is_skipped(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (20, 20)).save(d / "tiny.png")
    Image.new("RGB", (64, 64)).save(d / "ok.png")
    (tmp_path / "m.json").write_text(json.dumps({"tiny.png": {}, "ok.png": {}}))
    opts = DatasetOptions(in_json=str(tmp_path / "m.json"), train_data_dir=str(d), resolution="64", enable_bucket=True,
                          bucket_no_upscale=True, bucket_reso_steps=32, min_bucket_reso=32)
    plan = build_plan(opts, seed=0, warn=lambda m: None)
    assert [s.path.endswith("ok.png") for s in plan.samples] == [True]
    assert "too small" in plan.skipped[0][1]
