"""Dataset options that act on the pixels a batch holds and on how batches are made: --color_aug,
--random_crop, the bucket limits and the loader workers, each through the real plan, sampler and loader,
checked against the plain image computed here (no augmentation code reused)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdtune.data.dataset import make_loader
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.data.sampler import BucketBatchSampler

N = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of 96x64 pixels, random noise over saturated colours, so that every window is unique."""
    d = tmp_path_factory.mktemp("augment")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    meta = {}
    for i in range(N):
        base = np.array([[220, 40, 60], [40, 200, 80], [50, 60, 210], [200, 180, 30]][i], dtype=np.int32)
        pixels = np.clip(base + rng.integers(-30, 31, size=(64, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(d / "img" / f"{i}.png")
        meta[f"{i}.png"] = {"caption": f"image {i}"}
    (d / "m.json").write_text(json.dumps(meta))
    return d


def plan_of(folder, **options):
    given = {"in_json": str(folder / "m.json"), "train_data_dir": str(folder / "img"), "resolution": "64",
             "train_batch_size": 1, "max_data_loader_n_workers": 0}
    return build_plan(DatasetOptions(**{**given, **options}), seed=0)


def images(plan, seed: int, epochs: int) -> list[tuple[int, np.ndarray]]:
    """(image number, HxWx3 uint8 pixels) of every sample of `epochs` epochs, in order."""
    sampler = BucketBatchSampler(plan, seed=seed)
    out = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for batch in make_loader(plan, sampler):
            for index, tensor in zip(batch.indices, batch.images):
                pixels = np.rint((tensor.numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
                out.append((int(index), pixels))
    return out


def source(folder, plan, index: int) -> np.ndarray:
    return np.asarray(Image.open(folder / "img" / plan.samples[index].path.split("/")[-1]).convert("RGB"))


def hsv(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels, "RGB").convert("HSV")).astype(int)


def kind_of_change(plain: np.ndarray, got: np.ndarray) -> str:
    """sd-scripts' colour augmentation gives the image unchanged, a gamma in [0.95, 1.05] of it, or its
    hue turned by up to 8/180 of the circle, which keeps each pixel's largest channel (HSV's value)."""
    if np.array_equal(plain, got):
        return "same"
    x, y = plain.astype(np.float64) / 255, got.astype(np.float64) / 255
    inside = (x > 0.05) & (x < 0.95) & (y > 0)
    gamma = float(np.median(np.log(y[inside]) / np.log(x[inside])))
    if 0.949 <= gamma <= 1.051 and np.abs(255 * x ** gamma - got).max() <= 1.01:
        return "gamma"
    value_kept = np.abs(plain.max(axis=2).astype(int) - got.max(axis=2).astype(int)).max() <= 2
    turn = (hsv(got)[..., 0] - hsv(plain)[..., 0] + 128) % 256 - 128
    saturated = hsv(plain)[..., 1] > 100
    if value_kept and np.abs(np.median(turn[saturated])) <= 8 / 180 * 256 + 1.5:
        return "hue"
    return "other"


@pytest.mark.slow
def test_color_aug_changes_colours_reproducibly_by_seed(folder):
    plain = plan_of(folder)
    augmented = plan_of(folder, color_aug=True)
    # centred 64x64 crop of the 96x64 image, which needs no resampling
    expected = {i: source(folder, plain, i)[:, 16:80] for i in range(N)}
    assert all(np.array_equal(expected[i], px) for i, px in images(plain, seed=3, epochs=2))
    got = images(augmented, seed=3, epochs=15)
    kinds = [kind_of_change(expected[i], px) for i, px in got]
    assert "other" not in kinds
    # each sample is changed with probability 1/3, half of them by gamma, half by hue
    assert 0.45 < kinds.count("same") / len(kinds) < 0.85 and kinds.count("gamma") >= 3 and kinds.count("hue") >= 3
    again = images(augmented, seed=3, epochs=15)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, again))  # the same seed, the same colours
    other = images(augmented, seed=4, epochs=15)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(got, other))


def test_random_crop_picks_windows_within_the_resize(folder):
    def offsets(plan, seed):
        found = []
        for i, px in images(plan, seed=seed, epochs=3):
            whole = source(folder, plan, i)  # 96x64 covers the 64x64 bucket as it is: only the crop moves
            found.append([x for x in range(33) if np.array_equal(whole[:, x:x + 64], px)])
        assert all(len(f) == 1 for f in found), "every sample is one window of the image"
        return [f[0] for f in found]

    assert set(offsets(plan_of(folder), seed=1)) == {16}  # centred
    cropped = plan_of(folder, random_crop=True)
    first, second = offsets(cropped, seed=1), offsets(cropped, seed=2)
    assert len(set(first)) >= 4 and first != second
    assert offsets(cropped, seed=1) == first


def test_bucket_limits_and_steps_choose_the_bucket(tmp_path):
    # resolution 64: buckets of at most 64*64 pixels, sides multiples of the step between the limits
    (tmp_path / "img").mkdir()
    Image.new("RGB", (400, 50), (200, 30, 30)).save(tmp_path / "img" / "wide.png")
    Image.new("RGB", (50, 400), (30, 200, 30)).save(tmp_path / "img" / "tall.png")
    (tmp_path / "m.json").write_text(json.dumps({"wide.png": {"caption": "w"}, "tall.png": {"caption": "t"}}))

    def buckets(**options):
        plan = plan_of(tmp_path, **options)
        return {s.path.split("/")[-1]: tuple(s.bucket) for s in plan.samples}

    assert buckets() == {"wide.png": (64, 64), "tall.png": (64, 64)}  # no buckets: the square resolution
    common = {"enable_bucket": True, "bucket_reso_steps": 32}
    # the widest bucket within 128 px and 4096 pixels is 128x32 (aspect 4, nearest to 8)
    assert buckets(**common, min_bucket_reso=32, max_bucket_reso=128) == {"wide.png": (128, 32), "tall.png": (32, 128)}
    # at most 64 px: 64x32 is the widest
    assert buckets(**common, min_bucket_reso=32, max_bucket_reso=64) == {"wide.png": (64, 32), "tall.png": (32, 64)}
    # at least 64 px a side: only 64x64 is left
    assert buckets(**common, min_bucket_reso=64, max_bucket_reso=128) == {"wide.png": (64, 64), "tall.png": (64, 64)}
    # steps of 64: 64x64 is the only bucket within the area whose sides are multiples of 64
    assert buckets(enable_bucket=True, bucket_reso_steps=64, min_bucket_reso=64, max_bucket_reso=128)["wide.png"] == (64, 64)


def test_loader_workers_follow_the_options(folder):
    plan = plan_of(folder, max_data_loader_n_workers=1, persistent_data_loader_workers=True)
    loader = make_loader(plan, BucketBatchSampler(plan, seed=0))
    assert (loader.num_workers, loader.persistent_workers) == (1, True)
    plan = plan_of(folder, max_data_loader_n_workers=0, persistent_data_loader_workers=True)
    loader = make_loader(plan, BucketBatchSampler(plan, seed=0))
    assert (loader.num_workers, loader.persistent_workers) == (0, False)  # no workers to keep


def test_flip_aug_mirrors_some_samples_by_seed(folder):
    plan = plan_of(folder, flip_aug=True)
    centred = {i: source(folder, plan, i)[:, 16:80] for i in range(N)}

    def mirrored(seed):
        out = []
        for i, px in images(plan, seed=seed, epochs=3):
            assert np.array_equal(px, centred[i]) or np.array_equal(px, centred[i][:, ::-1])
            out.append(not np.array_equal(px, centred[i]))
        return out

    first = mirrored(1)
    assert 0 < sum(first) < len(first) and mirrored(1) == first and mirrored(2) != first
