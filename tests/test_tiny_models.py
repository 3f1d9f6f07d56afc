"""sdtune.testing builds real-architecture tiny models, deterministically."""

import json

import pytest
import torch

from sdtune.families import FAMILIES
from sdtune.testing import build_tiny_model, make_dataset


def _state(model):
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(model, name).state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_tiny_model_has_the_real_layout(family):
    before = torch.random.get_rng_state()
    model = build_tiny_model(family, seed=3)
    assert torch.equal(before, torch.random.get_rng_state()), "building a model must not touch the global RNG"
    real_unet = json.loads((FAMILIES[family].asset_dir / "unet" / "config.json").read_text())
    # The same 4-level block structure as the real config, only narrower.
    assert list(model.unet.config.down_block_types) == real_unet["down_block_types"]
    assert list(model.unet.config.up_block_types) == real_unet["up_block_types"]
    assert model.unet.config.use_linear_projection == real_unet["use_linear_projection"]
    # SD1's original U-Net has 686 tensors (sd-scripts' own saved file has the same set).
    assert len(model.unet.state_dict()) == 686
    # The VAE downsamples 8x like SD's.
    with torch.no_grad():
        latent = model.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert latent.shape == (1, 4, 8, 6)
    assert model.text_encoder.config.hidden_act == ("gelu" if FAMILIES[family].v2 else "quick_gelu")
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert model.family.prediction_type == FAMILIES[family].prediction_type


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (_state(build_tiny_model("sd1", seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_tiny_unet_runs_with_tiny_text_encoder(tiny_sd1):
    ids = tiny_sd1.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = tiny_sd1.text_encoder(ids).last_hidden_state
        out = tiny_sd1.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_synthetic_dataset(tmp_path):
    from PIL import Image

    meta = make_dataset(tmp_path / "d", n=8, seed=1, metadata=tmp_path / "meta.json")
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    sizes, formats = set(), set()
    for stem, entry in meta.items():
        (image,) = (tmp_path / "d").glob(stem + ".*[!tn]")  # not .caption / .txt
        with Image.open(image) as im:
            assert list(im.size) == entry["image_size"]
            sizes.add(im.size[0] / im.size[1])
            formats.add(im.format)
        assert (tmp_path / "d" / f"{stem}.caption").read_text().strip() == entry["caption"]
        assert (tmp_path / "d" / f"{stem}.txt").read_text().strip() == entry["tags"]
    assert len(sizes) >= 5 and {"PNG", "JPEG", "WEBP"} <= formats
    assert make_dataset(tmp_path / "e", n=8, seed=1) == meta
