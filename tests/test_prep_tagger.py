"""WD14 / DeepDanbooru tagging with tiny ONNX models built here (onnx.helper) and real onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.errors import UserError
from sdtune.prep import deepdanbooru, wd14
from sdtune.prep.tagger import load_tagger, tag_images
from sdtune.prep.tags import TagOptions

# Labels of the tiny tagger, in output order: 4 ratings, general, character (as in real CSVs).
LABELS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("long_hair", 0), ("smile", 0), ("solo", 0), ("^_^", 0), ("(o)_(o)", 0),
    ("hatsune_miku", 4), ("ganyu_(genshin_impact)", 4),
]
# Each output is bias + weights . (B, G, R) / 255 of the image mean, in the model's BGR input order.
# Chosen so the tag set reveals the channel order: blue -> long_hair, red -> smile, green -> miku.
BIAS = np.array([0.5, 0, 0, 0, 0, 0, 0.9, 0.1, 0.6, 0, 0.4], dtype=np.float32)
WEIGHTS = np.zeros((3, len(LABELS)), dtype=np.float32)
WEIGHTS[0, 4] = 1.0   # blue  -> long_hair
WEIGHTS[2, 5] = 1.0   # red   -> smile
WEIGHTS[1, 9] = 1.0   # green -> hatsune_miku
WEIGHTS[2, 1] = 1.0   # red   -> sensitive
WEIGHTS[0, 3] = 1.0   # blue  -> explicit


def build_onnx(path: Path, size: int, batch: int | str = "N", scale: float = 1 / 255, labels: int = len(LABELS)):
    """A real ONNX graph: mean over H and W of NHWC input, times `scale`, a linear layer, clipped to 0..1."""
    from sdtune.testing import write_onnx_tagger

    folder = write_onnx_tagger(path.parent / (path.stem + "_build"), LABELS[:labels], WEIGHTS, BIAS, size=size,
                               batch=batch, scale=scale)
    (folder / "model.onnx").replace(path)


def make_wd14(folder: Path, size: int = 16, batch: int | str = "N") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_onnx(folder / "model.onnx", size, batch)
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c) in enumerate(LABELS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def solid(path: Path, rgb, size=(20, 20)):
    Image.new("RGB", size, rgb).save(path)


# ---------------------------------------------------------------------------------------------
# preprocessing, pixel by pixel


def _expected_wd14_unresized(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Independent: float alpha blend onto white, then centred white padding, then BGR."""
    rgb = rgb.astype(np.float64)
    if alpha is not None:
        a = alpha.astype(np.float64)[..., None] / 255.0
        rgb = rgb * a + 255.0 * (1 - a)
    h, w, _ = rgb.shape
    side = max(h, w)
    out = np.full((side, side, 3), 255.0)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out[:, :, ::-1]


def test_wd14_preprocess_rgba_wide_pixel_exact():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
    alpha = rng.choice(np.array([0, 255, 128, 40], dtype=np.uint8), (4, 7))
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    got = wd14.preprocess(img, 7, 7)
    want = _expected_wd14_unresized(rgb, alpha)
    assert got.shape == (7, 7, 3) and got.dtype == np.float32
    # PIL composites in integers: allow 1 level of rounding where alpha is partial, exact elsewhere.
    assert np.abs(got - want).max() <= 1.0
    opaque_or_clear = np.zeros((7, 7), bool)
    opaque_or_clear[1:5, :] = np.isin(alpha, [0, 255])  # 7 - 4 = 3 rows of padding: 1 on top, 2 below
    np.testing.assert_array_equal(got[opaque_or_clear], np.rint(want[opaque_or_clear]))
    assert (got[0] == 255).all() and (got[5:] == 255).all()


def test_wd14_preprocess_palette_with_transparency_tall():
    pal = Image.new("P", (3, 5))
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9))
    idx = np.array([[0, 1, 2], [2, 2, 0], [1, 0, 1], [2, 1, 0], [0, 0, 0]], dtype=np.uint8)
    pal.putdata(idx.flatten().tolist())
    pal.info["transparency"] = 2
    got = wd14.preprocess(pal, 5, 5)
    colours = np.array([[10, 20, 30], [200, 100, 50], [255, 255, 255]], dtype=np.float64)  # index 2 is clear
    want = _expected_wd14_unresized(colours[idx], None)
    np.testing.assert_array_equal(got, want)
    assert got[0, 1].tolist() == [30, 20, 10]  # source pixel (0, 0), BGR, one column in from the left pad


def test_wd14_preprocess_odd_padding_goes_bottom_and_right():
    rgb = np.arange(6 * 3 * 3, dtype=np.uint8).reshape(3, 6, 3)  # wide: 3 rows of padding, 1 top, 2 bottom
    got = wd14.preprocess(Image.fromarray(rgb, "RGB"), 6, 6)
    np.testing.assert_array_equal(got[1:4], rgb[:, :, ::-1].astype(np.float32))
    assert (got[0] == 255).all() and (got[4:] == 255).all()
    tall = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(5, 2, 3)  # tall: 3 columns, 1 left, 2 right
    got = wd14.preprocess(Image.fromarray(tall, "RGB"), 5, 5)
    np.testing.assert_array_equal(got[:, 1:3], tall[:, :, ::-1].astype(np.float32))
    assert (got[:, 0] == 255).all() and (got[:, 3:] == 255).all()


def test_wd14_preprocess_resizes_the_padded_square_with_bicubic():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    got = wd14.preprocess(Image.fromarray(rgb, "RGB"), 8, 8)
    square = np.full((20, 20, 3), 255, np.uint8)
    square[5:15] = rgb
    want = np.asarray(Image.fromarray(square).resize((8, 8), Image.Resampling.BICUBIC), np.float32)[:, :, ::-1]
    np.testing.assert_array_equal(got, want)


def test_wd14_preprocess_16bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    got = wd14.preprocess(img, 2, 2)
    want = np.rint(arr.astype(np.float64) * 255 / 65535)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], want)


def test_deepdanbooru_preprocess_keeps_aspect_and_pads_with_edges():
    src = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)  # 4 wide, 2 high
    img = Image.fromarray(np.dstack([src, np.zeros((2, 4), np.uint8)]), "RGBA")  # alpha is dropped, as DD does
    got = deepdanbooru.preprocess(img, 8, 8)
    # Independent: scale 2 (fits the width) -> 8x4 by pixel replication, 2 rows of edge padding each side.
    want = np.empty((8, 8, 3))
    for y in range(8):
        for x in range(8):
            want[y, x] = src[min(max((y - 2) // 2, 0), 1), x // 2] / 255.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert got.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# tag selection (pure function; expected lists written from the rules)

def _labels(options):
    from sdtune.prep.tags import prepare_labels

    return prepare_labels(LABELS, options)


def _probs(**named):
    p = np.zeros(len(LABELS))
    for name, value in named.items():
        p[[n for n, _ in LABELS].index(name)] = value
    return p


def test_thresholds_per_category_and_defaults():
    from sdtune.prep.tags import select_tags

    p = _probs(long_hair=0.5, smile=0.3, solo=0.95, hatsune_miku=0.6, general=0.9)
    opts = TagOptions(general_threshold=0.4, character_threshold=0.7)
    labels, _ = _labels(opts)
    assert select_tags(p, labels, opts) == ["long_hair", "solo"]
    opts = TagOptions(general_threshold=0.4, character_threshold=0.6)  # >= threshold is kept
    assert select_tags(p, _labels(opts)[0], opts) == ["long_hair", "solo", "hatsune_miku"]
    opts = TagOptions(general_threshold=1.5, character_threshold=0.1)  # above 1 turns a category off
    assert select_tags(p, _labels(opts)[0], opts) == ["hatsune_miku"]


def test_mcut_picks_the_largest_gap():
    from sdtune.prep.tags import mcut_threshold, select_tags

    # general probs 0.9, 0.8 | 0.3, 0.2, 0.1 -> gap 0.8..0.3, threshold 0.55
    p = _probs(solo=0.9, long_hair=0.8, smile=0.3, **{"(o)_(o)": 0.2, "^_^": 0.1})
    assert mcut_threshold(np.array([0.9, 0.8, 0.3, 0.2, 0.1])) == pytest.approx(0.55)
    opts = TagOptions(general_mcut=True, general_threshold=0.99, character_threshold=0.99)
    assert select_tags(p, _labels(opts)[0], opts) == ["long_hair", "solo"]
    # characters: mcut of (0.1, 0.05) would be 0.075, but never below 0.15
    p[9], p[10] = 0.1, 0.05
    opts = TagOptions(character_mcut=True, general_threshold=2)
    assert select_tags(p, _labels(opts)[0], opts) == []
    p[9] = 0.2
    assert select_tags(p, _labels(opts)[0], opts) == ["hatsune_miku"]


def test_ordering_options():
    from sdtune.prep.tags import select_tags

    p = _probs(long_hair=0.5, smile=0.9, solo=0.7, hatsune_miku=0.8, general=0.2, sensitive=0.7)
    p[10] = 0.95  # ganyu
    base = dict(general_threshold=0.4, character_threshold=0.4)
    opts = TagOptions(**base)
    assert select_tags(p, _labels(opts)[0], opts) == ["long_hair", "smile", "solo", "hatsune_miku",
                                                      "ganyu_(genshin_impact)"]
    opts = TagOptions(**base, order="probability", character_tags_first=True, rating="first")
    assert select_tags(p, _labels(opts)[0], opts) == ["sensitive", "ganyu_(genshin_impact)", "hatsune_miku",
                                                      "smile", "solo", "long_hair"]
    opts = TagOptions(**base, rating="last", always_first_tags=("solo", "absent", "hatsune_miku"),
                      undesired_tags=("smile",))
    assert select_tags(p, _labels(opts)[0], opts) == ["solo", "hatsune_miku", "long_hair",
                                                      "ganyu_(genshin_impact)", "sensitive"]


def test_underscore_rules_and_character_expand():
    from sdtune.prep.tags import select_tags

    p = np.full(len(LABELS), 0.9)
    opts = TagOptions(remove_underscore=True, character_tag_expand=True)
    assert select_tags(p, _labels(opts)[0], opts) == ["long hair", "smile", "solo", "^_^", "(o)_(o)",
                                                      "hatsune miku", "ganyu", "genshin impact"]


def test_tag_replacement_works_and_warns_on_unknown_sources():
    from sdtune.prep.tags import parse_tag_replacement, select_tags

    pairs = parse_tag_replacement(r"long_hair,very long hair;smile,grin\, wide;nope,x")
    assert pairs == (("long_hair", "very long hair"), ("smile", "grin, wide"), ("nope", "x"))
    opts = TagOptions(remove_underscore=True, tag_replacement=pairs, general_threshold=0.5, character_threshold=2)
    labels, unmatched = _labels(opts)
    assert unmatched == ["nope"]
    p = _probs(long_hair=0.9, smile=0.9, solo=0.1)
    assert select_tags(p, labels, opts) == ["very long hair", "grin, wide"]
    with pytest.raises(UserError, match="tag_replacement"):
        parse_tag_replacement("a,b,c")


# ---------------------------------------------------------------------------------------------
# end to end through onnxruntime


def _expected_for(rgb, threshold=0.35):
    """Tags of a solid image of colour rgb, computed from the model weights above (no sdtune code)."""
    bgr = np.array(rgb[::-1], dtype=np.float64) / 255
    p = np.clip(bgr @ WEIGHTS + BIAS, 0, 1)
    general = [n for (n, c), v in zip(LABELS, p) if c == 0 and v >= threshold]
    character = [n for (n, c), v in zip(LABELS, p) if c == 4 and v >= threshold]
    return general + character


@pytest.mark.parametrize("batch", ["N", 2])
def test_wd14_end_to_end_dynamic_and_fixed_batch(tmp_path, batch):
    model = make_wd14(tmp_path / "model", batch=batch)
    data = tmp_path / "data"
    data.mkdir()
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        solid(data / f"{name}.png", rgb, size=(16, 16) if name != "blue" else (33, 33))
    (data / "broken.jpg").write_bytes(b"not an image")
    (data / "note.txt.bak").write_text("ignored")
    tagger = load_tagger(str(model))
    assert (tagger.height, tagger.width, tagger.model.batch) == (16, 16, None if batch == "N" else 2)
    result = tag_images(data, tagger, batch_size=1 if batch == 2 else 2, progress=False)
    assert [p.name for p in result.unreadable] == ["broken.jpg"]
    for name, rgb in colours.items():
        assert (data / f"{name}.txt").read_text() == ", ".join(_expected_for(rgb)) + "\n"
    assert "long_hair" in (data / "blue.txt").read_text() and "smile" in (data / "red.txt").read_text()
    assert result.frequencies["solo"] == 3
    # A second run skips what is done; --overwrite redoes it.
    again = tag_images(data, tagger, progress=False)
    assert len(again.skipped_existing) == 3 and not again.written
    assert len(tag_images(data, tagger, overwrite=True, progress=False).written) == 3


def test_wd14_output_path_json_and_append(tmp_path):
    model = make_wd14(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    solid(data / "a.png", (255, 0, 0), (16, 8))
    (data / "a.txt").write_text("smile, mine\n")
    opts = TagOptions()
    tagger = load_tagger(str(model), options=opts)
    tag_images(data, tagger, options=opts, append_tags=True, progress=False)
    text = (data / "a.txt").read_text()
    assert text.startswith("smile, mine, ") and text.count("smile") == 1
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({str(data / "a.png"): {"caption": "a red thing"}}))
    tag_images(data, tagger, output_path=out, num_workers=2, progress=False)
    meta = json.loads(out.read_text())
    record = meta[str(data / "a.png")]
    assert record["caption"] == "a red thing" and record["image_size"] == [16, 8]
    # red padded with white rows: the mean changes, so compute the expectation from the padded square
    padded = np.full((16, 16, 3), 255.0)
    padded[4:12] = [255, 0, 0]
    bgr = padded[:, :, ::-1].mean(axis=(0, 1)) / 255
    p = np.clip(bgr @ WEIGHTS + BIAS, 0, 1)
    want = [n for (n, c), v in zip(LABELS, p) if c == 0 and v >= 0.35] + \
           [n for (n, c), v in zip(LABELS, p) if c == 4 and v >= 0.35]
    assert record["tags"] == ", ".join(want)
    assert (tmp_path / "meta.json.bak").exists()


def test_deepdanbooru_folder(tmp_path):
    folder = tmp_path / "dd"
    folder.mkdir()
    # Same graph with scale 1 (DeepDanbooru feeds 0..1 RGB); labels without WD14's categories.
    build_onnx(folder / "model-resnet_custom_v3.onnx", 12, scale=1.0)
    names = ["rating:safe", "rating:questionable", "rating:explicit", "rating:x",
             "long_hair", "smile", "solo", "^_^", "(o)_(o)", "hatsune_miku", "ganyu_(genshin_impact)"]
    (folder / "tags.txt").write_text("\n".join(names) + "\n")
    (folder / "tags-character.txt").write_text("hatsune_miku\nganyu_(genshin_impact)\n")
    data = tmp_path / "data"
    data.mkdir()
    solid(data / "r.png", (0, 0, 255), (12, 12))  # blue, RGB order: channel 2 of the input
    opts = TagOptions(rating="last", remove_underscore=True)
    tagger = load_tagger(str(folder), options=opts)
    assert tagger.kind == "deepdanbooru" and (tagger.height, tagger.width) == (12, 12)
    tag_images(data, tagger, options=opts, progress=False)
    # RGB input (0, 0, 1): weight row 2 -> smile and sensitive (index 1 = rating:questionable)
    assert (data / "r.txt").read_text() == "smile, solo, (o)_(o), ganyu (genshin impact), rating:questionable\n"


def test_bad_inputs_are_user_errors(tmp_path):
    model = make_wd14(tmp_path / "model")
    (model / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n")
    with pytest.raises(UserError, match=r"label file lists 1 tag\. "):
        load_tagger(str(model))
    with pytest.raises(UserError, match="hub"):
        load_tagger("SmilingWolf/wd-swinv2-tagger-v3", model_dir=str(tmp_path / "dl"))
    make_wd14(tmp_path / "ok")
    with pytest.raises(UserError, match="no images"):
        tag_images(tmp_path / "model", load_tagger(str(tmp_path / "ok")), progress=False)
