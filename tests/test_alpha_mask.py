"""--alpha_mask / alpha_mask = true: the loss weighted by each image's alpha channel, cached or not.

The expected masks and losses are computed here independently: the alpha of images whose size is
the bucket (no resize) averaged per 8x8 block, and sd-scripts' formula (the per-element loss times
the mask, area-interpolated to the latent size with torch, then the mean) in plain torch.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sdtune.data.dataset import BatchDataset
from sdtune.data.latent_cache import ensure_latent_cache
from sdtune.data.options import DatasetOptions
from sdtune.data.plan import build_plan
from sdtune.data.sampler import BatchSpec
from sdtune.data.toml_config import dataset_specs
from sdtune.train.noise import DiffusionObjective
from sdtune.testing import build_tiny_model

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


def _rgba(path, alpha: np.ndarray, colour=(200, 30, 30)):
    h, w = alpha.shape
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = colour
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("sd1", seed=0)


@pytest.fixture
def data(tmp_path):
    """Three 64x64 images (bucket size: no resize): random alpha, a transparent left half, and no alpha."""
    img = tmp_path / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    alphas = {"a": rng.integers(0, 256, (64, 64), dtype=np.uint8), "b": np.zeros((64, 64), np.uint8)}
    alphas["b"][:, 32:] = 255
    for name, alpha in alphas.items():
        _rgba(img / f"{name}.png", alpha)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(img / "c.png")
    (tmp_path / "m.json").write_text('{"a": {"caption": "a"}, "b": {"caption": "b"}, "c": {"caption": "c"}}')
    return tmp_path, alphas


def _opts(tmp_path, **kw):
    base = dict(in_json=str(tmp_path / "m.json"), train_data_dir=str(tmp_path / "img"), resolution="64",
                max_data_loader_n_workers=0, alpha_mask=True)
    base.update(kw)
    return DatasetOptions(**base)


def _blocks(alpha: np.ndarray) -> torch.Tensor:
    """Independent: alpha / 255 averaged over 8x8 blocks with torch's area interpolation."""
    a = torch.from_numpy(alpha.astype(np.float32) / 255.0)[None, None]
    return F.interpolate(a, size=(alpha.shape[0] // 8, alpha.shape[1] // 8), mode="area")[0, 0]


def _batch(plan, cache=None, flips=(False, False, False)):
    by_name = {s.path.rsplit("/", 1)[-1]: s.index for s in plan.samples}
    indices = [by_name["a.png"], by_name["b.png"], by_name["c.png"]]
    spec = BatchSpec(epoch=0, position=0, number=0, dataset=0, bucket=(64, 64), indices=indices, flips=list(flips),
                     crop_seeds=[None] * 3, color_seeds=[None] * 3)
    return BatchDataset(plan, cache)[spec]


def test_masks_from_alpha_cached_and_uncached_agree(data, tiny):
    tmp_path, alphas = data
    plan = build_plan(_opts(tmp_path, cache_latents_to_disk=True, flip_aug=True), seed=0)
    uncached = _batch(plan, flips=(False, True, False))
    mask = uncached.loss_mask
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.float32
    torch.testing.assert_close(mask[0, 0], _blocks(alphas["a"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mask[1, 0], _blocks(alphas["b"][:, ::-1].copy()), rtol=0, atol=0)  # flipped with the image
    assert torch.equal(mask[2, 0], torch.ones(8, 8))  # no alpha channel: every pixel counts
    vae = tiny.vae
    cache = ensure_latent_cache(plan, vae, log=lambda m: None, progress=False)
    cached = _batch(cache.plan, cache, flips=(False, True, False))
    assert torch.equal(cached.loss_mask, mask)
    memory = ensure_latent_cache(plan, vae, to_disk=False, log=lambda m: None, progress=False)
    assert torch.equal(_batch(memory.plan, memory, flips=(False, True, False)).loss_mask, mask)


def test_cache_is_keyed_on_the_mask(data, tiny):
    tmp_path, _alphas = data
    vae = tiny.vae
    plain = ensure_latent_cache(build_plan(_opts(tmp_path, alpha_mask=False, cache_latents_to_disk=True), seed=0), vae,
                                log=lambda m: None, progress=False)
    assert plain.encoded == 3 and all("mask" not in load_file(p) for p in plain.paths.values())
    masked = ensure_latent_cache(build_plan(_opts(tmp_path, cache_latents_to_disk=True), seed=0), vae,
                                 log=lambda m: None, progress=False)
    assert masked.reused == 0 and masked.encoded == 3 and masked.reasons == {"alpha mask changed": 3}
    assert all(load_file(p)["mask"].shape == (8, 8) for p in masked.paths.values())
    again = ensure_latent_cache(build_plan(_opts(tmp_path, cache_latents_to_disk=True), seed=0), vae,
                                log=lambda m: None, progress=False)
    assert again.reused == 3 and again.encoded == 0


def test_masked_loss_equals_sd_scripts_formula(tiny):
    gen = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    alpha = torch.randint(0, 256, (2, 64, 64), generator=gen).to(torch.uint8).numpy()
    full = torch.from_numpy(alpha.astype(np.float32) / 255.0)  # the image-size mask sd-scripts batches
    timesteps = torch.tensor([10, 900])
    sched = tiny.scheduler_config
    for loss_type in ("l2", "l1"):
        objective = DiffusionObjective.from_options(SimpleNamespace(loss_type=loss_type), sched, "epsilon")
        elementwise = (pred - tgt) ** 2 if loss_type == "l2" else (pred - tgt).abs()
        want = (elementwise * F.interpolate(full[:, None], size=(8, 8), mode="area")).mean(dim=(1, 2, 3)).mean()
        latent = torch.stack([_blocks(a) for a in alpha])
        torch.testing.assert_close(objective.loss(pred, tgt, timesteps, latent[:, None]), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(objective.loss(pred, tgt, timesteps, full), want, rtol=1e-6, atol=0)
        unmasked = objective.loss(pred, tgt, timesteps)
        torch.testing.assert_close(unmasked, elementwise.mean(), rtol=1e-6, atol=0)


def test_transparent_half_gets_no_gradient(data, tiny):
    tmp_path, _alphas = data
    mask = _batch(build_plan(_opts(tmp_path), seed=0)).loss_mask[1:2]  # b.png: left half transparent
    assert torch.equal(mask[0, 0, :, :4], torch.zeros(8, 4)) and torch.equal(mask[0, 0, :, 4:], torch.ones(8, 4))
    objective = DiffusionObjective.from_options(SimpleNamespace(), tiny.scheduler_config, "epsilon")
    pred = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tgt = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    objective.loss(pred, tgt, torch.tensor([500]), mask).backward()
    assert torch.equal(pred.grad[..., :4], torch.zeros(1, 4, 8, 4))
    # the opaque half gets the unmasked gradient: d/dp mean((p - t)^2) = 2 (p - t) / numel
    torch.testing.assert_close(pred.grad[..., 4:], 2 * (pred - tgt).detach()[..., 4:] / pred.numel())


def test_subset_key_and_flag_precedence(data, tmp_path):
    root, _alphas = data
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\nalpha_mask = true\n[[datasets]]\n'
                    f'  [[datasets.subsets]]\n  metadata_file = "{root / "m.json"}"\n  image_dir = "{root / "img"}"\n'
                    f'  [[datasets.subsets]]\n  metadata_file = "{root / "m2.json"}"\n  image_dir = "{root / "img"}"\n'
                    f'  alpha_mask = false\n')
    (root / "m2.json").write_text('{"b": {"caption": "b"}}')
    (d,) = dataset_specs(DatasetOptions(dataset_config=str(toml)))
    assert [s.alpha_mask for s in d.subsets] == [True, False]
    (d,) = dataset_specs(DatasetOptions(dataset_config=str(toml), alpha_mask=False))
    assert [s.alpha_mask for s in d.subsets] == [True, False]  # [general] wins over the command line
    plan = build_plan(DatasetOptions(dataset_config=str(toml), max_data_loader_n_workers=0), seed=0)
    second = next(s for s in plan.samples if s.subset == 1)
    spec = BatchSpec(epoch=0, position=0, number=0, dataset=0, bucket=(64, 64), indices=[second.index], flips=[False],
                     crop_seeds=[None], color_seeds=[None])
    assert torch.equal(BatchDataset(plan)[spec].loss_mask, torch.ones(1, 1, 8, 8))  # its subset has no mask
    no_key = _opts(root, alpha_mask=True)
    assert [s.alpha_mask for s in dataset_specs(no_key)[0].subsets] == [True]  # the flag alone


def test_transparent_images_train_nothing_end_to_end(tmp_path):
    """The real training command: with --alpha_mask, fully transparent images give a zero loss, no update
    (plain SGD: no weight decay) and a zero validation loss; the flag reaches the loop and the validator."""
    from sdtune.cli import build_parser
    from sdtune.testing import write_tiny_model
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    model = write_tiny_model(tmp_path / "m.safetensors", "sd1", seed=0)
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        _rgba(tmp_path / "img" / f"{name}.png", np.zeros((64, 64), np.uint8))
    (tmp_path / "m.json").write_text('{"a": {"caption": "a"}, "b": {"caption": "b"}, "c": {"caption": "c"}}')
    args = build_parser("train").parse_args([
        "train", "--pretrained_model_name_or_path", str(model), "--in_json", str(tmp_path / "m.json"),
        "--train_data_dir", str(tmp_path / "img"), "--output_dir", str(tmp_path / "out"), "--resolution", "64",
        "--train_batch_size", "2", "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--alpha_mask",
        "--cache_latents", "--optimizer_type", "torch.optim.SGD", "--learning_rate", "1.0", "--validation_split", "0.34"])
    result = train(options_from_args(args))
    assert result.losses == [0.0] and [v for _s, v in result.validation_losses] == [0.0]
    before, after = load_file(str(model)), load_file(str(tmp_path / "out" / "last.safetensors"))
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(before[k], after[k]) for k in unet)


def test_prepare_buckets_latents_alpha_mask_caches_the_masks(data, capsys):
    """sd-scripts' `prepare_buckets_latents.py ... --alpha_mask`: the entries hold the masks, and the
    training line it prints asks for them."""
    from sdtune.cli import main
    from sdtune.testing import write_tiny_model

    tmp_path, alphas = data
    model = write_tiny_model(tmp_path / "model.safetensors", "sd1", seed=0)
    code = main(["prepare_buckets_latents", str(tmp_path / "img"), str(tmp_path / "m.json"), str(tmp_path / "lat.json"),
                 str(model), "--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                 "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", "--alpha_mask"])
    assert code == 0
    # the record makes training use the masks (and so find these entries) without a flag
    import json

    from sdtune.data.options import DatasetOptions
    from sdtune.data.prepared import apply_prepared

    lat = json.loads((tmp_path / "lat.json").read_text())
    assert all(v["sdtune_latents"]["alpha_mask"] is True for v in lat.values())
    opts, notes = apply_prepared(DatasetOptions(in_json=str(tmp_path / "lat.json"), train_data_dir=str(tmp_path / "img")),
                                 default_resolution=512)
    assert opts.alpha_mask and opts.cache_latents_to_disk
    assert "alpha_mask on" in notes[0]
    cache = tmp_path / "img" / ".sdtune-cache"
    entries = {p.name.split(".png.")[0]: load_file(str(p)) for p in cache.glob("*.safetensors")}
    assert sorted(entries) == ["a", "b", "c"]
    torch.testing.assert_close(entries["a"]["mask"], _blocks(alphas["a"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(entries["b"]["mask"], _blocks(alphas["b"]), rtol=0, atol=0)
    assert torch.equal(entries["c"]["mask"], torch.ones(8, 8))
