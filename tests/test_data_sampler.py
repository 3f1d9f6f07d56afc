"""Sampler: one bucket per batch, repeats, determinism from (seed, epoch), rank sharding, resume,
the fill check, and the loader with spawned workers."""

import json
from collections import Counter

import pytest
from PIL import Image

from sdtune.data.dataset import make_loader
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.data.sampler import BucketBatchSampler
from sdtune.errors import UserError

# 23 images in three aspect ratios -> three buckets of 10, 8 and 5 images
SIZES = [(64, 64)] * 10 + [(96, 48)] * 8 + [(48, 96)] * 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    (d / "img").mkdir()
    meta = {}
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (i * 10 % 256, 0, 0)).save(d / "img" / f"{i:02d}.png")
        meta[f"{i:02d}.png"] = {"caption": f"image {i}", "tags": f"tag{i}", "image_size": list(size)}
    (d / "m.json").write_text(json.dumps(meta))
    return d


def _plan(folder, **kw):
    base = dict(in_json=str(folder / "m.json"), train_data_dir=str(folder / "img"), resolution="64",
                enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, train_batch_size=3)
    base.update(kw)
    return build_plan(DatasetOptions(**base), seed=7)


def test_batches_are_single_bucket_and_cover_every_repeat(folder):
    plan = _plan(folder, dataset_repeats=2)
    batches = BucketBatchSampler(plan).epoch_batches(0)
    seen = Counter()
    for b in batches:
        assert len(b.indices) <= 3
        assert {plan.samples[i].bucket for i in b.indices} == {b.bucket}
        seen.update(b.indices)
    assert seen == Counter({i: 2 for i in range(len(SIZES))})
    # independent count: ceil(2n/3) per bucket of n images
    assert len(batches) == sum(-(-2 * n // 3) for n in (10, 8, 5)) == plan.total_batches()


def test_deterministic_per_seed_and_epoch(folder):
    plan = _plan(folder, flip_aug=True)
    a, b = BucketBatchSampler(plan, seed=1), BucketBatchSampler(plan, seed=1)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(3) != a.epoch_batches(4)
    assert a.epoch_batches(3) != BucketBatchSampler(plan, seed=2).epoch_batches(3)
    flips = [f for x in a.epoch_batches(0) for f in x.flips]
    assert 0 < sum(flips) < len(flips)


def test_rank_sharding_is_disjoint_and_even(folder):
    plan = _plan(folder)
    total = plan.total_batches()  # 4 + 3 + 2 = 9
    ranks = [BucketBatchSampler(plan, rank=r, world_size=2).epoch_batches(5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == total // 2 == plan.batches_per_epoch(2)
    numbers = [b.number for r in ranks for b in r]
    assert len(set(numbers)) == len(numbers)
    full = BucketBatchSampler(plan, world_size=1).epoch_batches(5)
    by_number = {b.number: b.indices for b in full}
    for r in ranks:  # each rank's batch is the single-process batch with that number
        for b in r:
            assert b.indices == by_number[b.number]


def test_resume_position(folder):
    plan = _plan(folder)
    s = BucketBatchSampler(plan)
    s.set_epoch(2)
    everything = list(s)
    s.set_epoch(2, start_batch=4)
    assert list(s) == everything[4:] and len(s) == len(everything) - 4
    assert [b.position for b in everything] == list(range(len(everything)))


def test_fill_check(folder):
    plan = _plan(folder, train_batch_size=8)
    plan.check_fill(num_processes=1, gradient_accumulation_steps=2)
    with pytest.raises(UserError, match="23 samples per epoch.*= 24"):
        plan.check_fill(num_processes=3, gradient_accumulation_steps=1)
    assert plan.steps_per_epoch(1, 2) == -(-(2 + 1 + 1) // 2)


@pytest.mark.slow
def test_loader_with_spawned_workers(folder):
    plan = _plan(folder, flip_aug=True)
    sampler = BucketBatchSampler(plan, seed=3)
    sampler.set_epoch(1)
    expected = sampler.epoch_batches(1)
    loader = make_loader(plan, sampler, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == len(expected)
    for spec, batch in zip(expected, got):
        w, h = spec.bucket
        assert batch.images.shape == (len(spec.indices), 3, h, w) and batch.bucket == (w, h)
        assert batch.indices == list(spec.indices) and batch.flipped == list(spec.flips)
        assert batch.captions == [f"image {i}" for i in spec.indices]
        assert batch.tags == [f"tag{i}" for i in spec.indices]
        assert batch.caption_options[0]["caption_separator"] == ","
        for row, i in enumerate(spec.indices):  # the red channel encodes the image number
            red = (i * 10 % 256) / 127.5 - 1
            assert abs(batch.images[row, 0].mean().item() - red) < 1e-5
