"""Bucket lists, assignment, no-upscale sizes and crop geometry, against expectations computed here."""

import math

import numpy as np
import pytest
from PIL import Image

from sdtune.data.buckets import BucketRule, cover_size, crop_box, make_buckets, no_upscale_bucket, select_bucket
from sdtune.data.images import transform_image


def _expected_buckets(res, lo=256, hi=1024, step=64):
    # Brute force: every step-multiple pair within the limits and the area, keep per width the
    # tallest height, per height the widest width, plus the largest square.
    area = res * res
    sides = range(lo, hi + 1, step)
    out = set()
    for w in sides:
        hs = [h for h in sides if w * h <= area]
        if hs:
            out.add((w, max(hs)))
            out.add((max(hs), w))
    s = max(x for x in range(step, hi + 1, step) if x * x <= area)
    out.add((s, s))
    return sorted(out)


@pytest.mark.parametrize("res", [512, 768])
def test_bucket_lists_default_limits(res):
    buckets = make_buckets((res, res), 256, 1024, 64)
    assert buckets == _expected_buckets(res)
    assert all(w * h <= res * res and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_512_list_matches_the_reference_table():
    # The 17 buckets sd-scripts' `make_bucket_resolutions(512x512, 256, 1024, 64)` lists (computed by
    # hand from its rules, independently of make_buckets).
    spec = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
            (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
            (1024, 256)]
    assert make_buckets((512, 512)) == spec


def test_select_uses_log_aspect_and_is_symmetric():
    buckets = make_buckets((512, 512))
    # 1920x1080 (1.78): 640x384 (1.67) is closer in log space than 704x320 (2.2)
    assert select_bucket((1920, 1080), buckets) == (640, 384)
    for size in [(1000, 400), (700, 333), (1234, 567), (300, 900)]:
        wide = select_bucket(size, buckets)
        tall = select_bucket((size[1], size[0]), buckets)
        assert tall == (wide[1], wide[0])
    # aspect 2.299 lies between 704x320 (2.2) and 768x320 (2.4): raw differences pick 2.2 (sd-scripts),
    # log differences pick 2.4 (2.299 is above the geometric mean 2.2978).
    ar = 2.299
    raw = min(buckets, key=lambda b: abs(b[0] / b[1] - ar))
    log = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(ar)))
    assert raw == (704, 320) and log == (768, 320)
    assert select_bucket((2299, 1000), buckets) == (768, 320)


def test_exact_size_match_wins():
    assert select_bucket((576, 448), make_buckets((512, 512))) == (576, 448)


@pytest.mark.parametrize("size", [(5000, 200), (200, 5000), (4096, 256), (64, 64 * 20)])
def test_extreme_aspect_goes_to_the_most_extreme_bucket(size):
    buckets = make_buckets((512, 512))
    b = select_bucket(size, buckets)
    assert b in ((1024, 256), (256, 1024))
    r = cover_size(size, b)
    assert r[0] >= b[0] and r[1] >= b[1] and (r[0] == b[0] or r[1] == b[1])


@pytest.mark.parametrize("size,bucket,resized", [
    ((1920, 1080), (640, 384), (683, 384)), ((300, 200), (640, 384), (640, 427)),
    ((800, 1200), (384, 640), (427, 640)), ((512, 2048), (256, 1024), (256, 1024))])
def test_cover_sizes_of_the_spec_table(size, bucket, resized):
    rule = BucketRule((512, 512), enable_bucket=True)
    assert rule.assign(size) == (bucket, resized)


@pytest.mark.parametrize("size,bucket,resized", [
    ((1920, 1080), (640, 384), (683, 384)), ((300, 200), (256, 192), (300, 200)),
    ((800, 1200), (384, 576), (384, 576)), ((512, 2048), (256, 1024), (256, 1024))])
def test_no_upscale_sizes_of_the_spec_table(size, bucket, resized):
    assert no_upscale_bucket(size, 512 * 512, 64) == (bucket, resized)
    b, r = no_upscale_bucket(size, 512 * 512, 64)
    assert r[0] * r[1] <= max(512 * 512 * 1.01, size[0] * size[1]) and r[0] <= max(size[0], r[0])


def test_no_upscale_never_enlarges_and_refuses_tiny_images():
    rule = BucketRule((512, 512), enable_bucket=True, no_upscale=True)
    for size in [(100, 70), (640, 480), (65, 1000)]:
        bucket, resized = rule.assign(size)
        assert resized[0] <= size[0] and resized[1] <= size[1]
        assert bucket[0] <= resized[0] < bucket[0] + 64 and bucket[1] <= resized[1] < bucket[1] + 64
    assert rule.assign((40, 500)) is None


def test_non_bucketed_mode_is_one_bucket():
    rule = BucketRule((512, 768), enable_bucket=False)
    assert rule.assign((1000, 1000)) == ((512, 768), (768, 768))


def test_crop_boxes():
    assert crop_box((683, 384), (640, 384)) == (21, 0, 661, 384)
    assert crop_box((256, 300), (256, 256)) == (0, 22, 256, 278)
    assert crop_box((683, 384), (640, 384), (43, 0)) == (43, 0, 683, 384)
    with pytest.raises(ValueError):
        crop_box((100, 100), (128, 64))


def test_transform_crops_the_centre_and_flips():
    # 128x64 into 64x64 needs no resize: the result must be columns 32..95 exactly.
    arr = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = np.asarray(transform_image(img, (128, 64), (64, 64)))
    assert np.array_equal(out, arr[:, 32:96])
    flipped = np.asarray(transform_image(img, (128, 64), (64, 64), flip=True))
    assert np.array_equal(flipped, arr[:, 32:96][:, ::-1])
    shifted = np.asarray(transform_image(img, (128, 64), (64, 64), crop_offset=(5, 0)))
    assert np.array_equal(shifted, arr[:, 5:69])


def test_transform_resize_matches_resize_then_crop():
    # Downscale by exactly 2 with area averaging: independent numpy 2x2 mean, then the centre crop.
    arr = np.random.default_rng(1).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    out = np.asarray(transform_image(Image.fromarray(arr), (128, 64), (64, 64))).astype(int)
    mean = arr.reshape(64, 2, 128, 2, 3).mean(axis=(1, 3))
    expected = np.floor(mean[:, 32:96] + 0.5)
    assert np.abs(out - expected).max() <= 1


# sd-scripts covers a bucket with `scale = bucket side / image side` (a float) and
# `int(other side * scale + 0.5)`. Expected sizes below are that expression worked by hand:
# 1366 * (576 / 768) = 1366 * 0.75 = 1024.5 -> 1025 (round() would give 1024, halves to even);
# 1025 * (512 / 1024) = 512.5 -> 513 (round(): 512).
@pytest.mark.parametrize("resolution,size,bucket,resized", [
    (768, (1366, 768), (1024, 576), (1025, 576)),
    (768, (768, 1366), (576, 1024), (576, 1025)),
    (768, (2732, 1536), (1024, 576), (1025, 576)),
])
def test_cover_rounds_halves_up_like_sd_scripts(resolution, size, bucket, resized):
    rule = BucketRule((resolution, resolution), enable_bucket=True, max_size=1024)
    assert rule.assign(size) == (bucket, resized)
    # the crop then keeps columns 0..1023 (1 spare pixel, floor(1/2) = 0 on the left), as sd-scripts' trim
    assert crop_box(resized, bucket) == (0, 0, bucket[0], bucket[1])


@pytest.mark.parametrize("size,resized", [((1025, 1024), (513, 512)), ((1024, 1025), (512, 513)),
                                          ((1366, 768), (911, 512))])
def test_non_bucketed_cover_rounds_halves_up(size, resized):
    assert BucketRule((512, 512), enable_bucket=False).assign(size) == ((512, 512), resized)


def test_cover_uses_the_float_scale_as_sd_scripts():
    # 1357 * 832 / 2944 is exactly 383.5, but sd-scripts multiplies by the float 832 / 2944, which is
    # just below 0.28261 (the nearest double is smaller than the fraction), giving 383.49999999999994
    # and so 383. Exact arithmetic (or round()) would give 384; the crop would then differ by a column.
    assert cover_size((1357, 2944), (320, 832)) == (383, 832)
    assert cover_size((2944, 1357), (832, 320)) == (832, 383)
