"""Latent cache: what is re-encoded when something changes, resume after an interruption, entries."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.latent_cache import ensure_latent_cache, load_entry, sample_latents
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.testing import build_tiny_model, make_dataset


@pytest.fixture(scope="module")
def vae():
    return build_tiny_model("sd1", seed=0).vae


class Counter:
    """Counts VAE encoder calls and images through a forward hook (no mocking)."""

    def __init__(self, vae, fail_after=None):
        self.calls = self.images = 0
        self.fail_after = fail_after
        self.handle = vae.encoder.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        self.images += inputs[0].shape[0]
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _opts(tmp_path, **kw):
    base = dict(in_json=str(tmp_path / "m.json"), train_data_dir=str(tmp_path / "img"), resolution="64",
                enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                cache_latents_to_disk=True, vae_batch_size=3, max_data_loader_n_workers=0)
    base.update(kw)
    return DatasetOptions(**base)


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "img", n=6, seed=3, metadata=tmp_path / "m.json")
    return tmp_path


def _run(vae, opts, **kw):
    with Counter(vae) as c:
        cache = ensure_latent_cache(build_plan(opts, seed=0), vae, log=lambda m: None, progress=False, **kw)
    return cache, c.images


@pytest.mark.slow
def test_invalidation_matrix(data, vae):
    opts = _opts(data)
    cache, n = _run(vae, opts)
    assert (cache.encoded, cache.reused, n) == (6, 0, 6)
    cache, n = _run(vae, opts)  # nothing changed: no VAE call at all
    assert (cache.encoded, cache.reused, n) == (0, 6, 0)

    # touch without change: mtime differs, bytes do not -> reused (content addressed)
    img = data / "img" / "img_000.png"
    os.utime(img, ns=(1, 1))
    cache, n = _run(vae, opts)
    assert n == 0

    # change one image's pixels -> exactly that one
    Image.new("RGB", Image.open(img).size, (1, 2, 3)).save(img)
    cache, n = _run(vae, opts)
    assert (cache.encoded, n, dict(cache.reasons)) == (1, 1, {"image changed": 1})

    # a different VAE
    other = build_tiny_model("sd1", seed=1).vae
    with Counter(other) as c:
        cache = ensure_latent_cache(build_plan(opts, seed=0), other, log=lambda m: None, progress=False)
    assert c.images == 6 and dict(cache.reasons) == {"VAE changed": 6}

    # a different resolution changes buckets for every image
    cache, n = _run(vae, _opts(data, resolution="96", max_bucket_reso=160))
    assert n == 6 and set(cache.reasons) <= {"bucket changed", "resize changed"}

    # flip_aug adds only the mirrored variants
    cache, n = _run(vae, opts)  # back to resolution 64: re-encoded (superseded entries were removed)
    assert n == 6
    cache, n = _run(vae, _opts(data, flip_aug=True))
    assert (cache.reused, cache.encoded, n) == (6, 6, 6)
    files = list((data / "img" / ".sdtune-cache").glob("*.safetensors"))
    assert len(files) == 12  # no stale entries left behind


def test_entry_holds_the_vae_posterior_of_the_transformed_image(data, vae):
    cache, _ = _run(vae, _opts(data, flip_aug=True))
    plan = cache.plan
    s = next(x for x in plan.samples if x.size[0] > x.size[1])
    # independent: PIL resize of the whole image, numpy centre crop, flip, VAE posterior
    img = Image.open(s.path).convert("RGB").resize(s.resized, Image.Resampling.LANCZOS
                                                    if s.resized[0] > s.size[0] else Image.Resampling.BOX)
    arr = np.asarray(img, np.float32) / 127.5 - 1
    left, top = (s.resized[0] - s.bucket[0]) // 2, (s.resized[1] - s.bucket[1]) // 2
    arr = arr[top:top + s.bucket[1], left:left + s.bucket[0]]
    for flip in (False, True):
        a = arr[:, ::-1] if flip else arr
        x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        mean, logvar = load_entry(cache.paths[(s.index, flip)], s.bucket)
        assert mean.dtype == torch.float16 and mean.shape == (4, s.bucket[1] // 8, s.bucket[0] // 8)
        assert torch.allclose(mean.float(), dist.mean[0], atol=0.03)
        assert torch.allclose(logvar.float(), dist.logvar[0], atol=0.05)


def test_interrupted_run_resumes(data, vae):
    opts = _opts(data, vae_batch_size=1, max_data_loader_n_workers=0)
    with Counter(vae, fail_after=2), pytest.raises(KeyboardInterrupt):
        ensure_latent_cache(build_plan(opts, seed=0), vae, log=lambda m: None, progress=False)
    assert len(list((data / "img" / ".sdtune-cache").glob("*.safetensors"))) == 2
    assert not list((data / "img" / ".sdtune-cache").glob("*.tmp"))
    cache, n = _run(vae, opts)
    assert (cache.reused, cache.encoded, n) == (2, 4, 4)


def test_corrupt_entry_is_reencoded_and_skip_cache_check_trusts(data, vae):
    cache, _ = _run(vae, _opts(data))
    path = sorted(cache.paths.values())[0]
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 10)
    cache, n = _run(vae, _opts(data))
    assert n == 1 and dict(cache.reasons) == {"corrupt entry": 1}
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 10)
    cache, n = _run(vae, _opts(data, skip_cache_check=True))
    assert n == 0


def test_undecodable_image_is_left_out(data, vae):
    img = data / "img" / "img_001.jpg"
    img.write_bytes(img.read_bytes()[:200])
    logs = []
    cache = ensure_latent_cache(build_plan(_opts(data), seed=0), vae, log=logs.append, progress=False)
    assert cache.encoded == 5 and len(cache.plan.active) == 5 and len(cache.plan.skipped) == 1
    assert any("img_001.jpg" in m and "skipped" in m for m in logs)


def test_in_memory_cache_writes_nothing(data, vae):
    cache, n = _run(vae, _opts(data, cache_latents_to_disk=False, cache_latents=True))
    assert n == 6 and len(cache.memory) == 6 and not (data / "img" / ".sdtune-cache").exists()


def test_cache_dir_option(data, vae, tmp_path):
    cache, _ = _run(vae, _opts(data, cache_dir=str(tmp_path / "cache")))
    assert all(str(tmp_path / "cache") in p for p in cache.paths.values())
    assert not (data / "img" / ".sdtune-cache").exists()


def test_sample_latents_draws_from_the_posterior():
    mean = torch.full((4, 32, 32), 2.0, dtype=torch.float16)
    logvar = torch.full((4, 32, 32), float(np.log(0.25)), dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_latents(mean, logvar, g) for _ in range(50)])
    assert abs(draws.mean().item() - 2.0) < 0.01 and abs(draws.std().item() - 0.5) < 0.01
    again = sample_latents(mean, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])


def test_ranks_encode_their_shares_and_the_merge_is_the_whole_cache(data, vae, tmp_path):
    """Two processes on shared storage: each encodes only its half, and the whole cache is put together
    from what they found, without either process checking the other's entries. A third, single
    process over the same folder then finds every entry up to date, at the same paths."""
    from sdtune.data.latent_cache import LatentCache

    bad = data / "img" / "img_003.png"
    bad.write_bytes(bad.read_bytes()[:100])  # undecodable: left out by whichever rank owns it
    plan = build_plan(_opts(data), seed=0)
    shares, images = [], []
    for rank in (0, 1):
        with Counter(vae) as c:
            shares.append(ensure_latent_cache(plan, vae, rank=rank, world_size=2, log=lambda m: None, progress=False))
        images.append(c.images)
    assert images == [3, 2]  # 6 images sorted by bucket, every second one each, one of rank 1's undecodable
    assert not set(shares[0].paths) & set(shares[1].paths)
    merged = LatentCache.from_shares(plan, [s.share() for s in shares], shares[0].dtype)

    single, encoded = _run(vae, _opts(data))
    assert encoded == 0 and single.reused == 5  # the two shares are the whole cache
    assert merged.paths == single.paths
    assert (merged.encoded, merged.reused) == (5, 0)
    assert [s.path for s in merged.plan.active] == [s.path for s in single.plan.active]
    assert [p for p, _ in merged.plan.skipped] == [str(bad)] == [p for p, _ in single.plan.skipped]

    # machine-local copies: an entry another process wrote is not here, so this process cannot use the merge
    assert LatentCache.shares_visible([s.share() for s in shares])
    os.remove(next(iter(shares[1].paths.values())))
    assert not LatentCache.shares_visible([s.share() for s in shares])
