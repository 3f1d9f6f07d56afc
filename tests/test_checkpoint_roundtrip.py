"""Conversion is exact: original -> diffusers -> original, and diffusers' own loader agrees with ours."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import checkpoint as ck
from sdtune.errors import UserError
from sdtune.testing import build_tiny_model

FAMILIES = ("sd1", "sd2", "sd2-v")


@pytest.fixture(scope="module")
def tiny():
    return {fam: build_tiny_model(fam, seed=i) for i, fam in enumerate(FAMILIES)}


def _original_source(model, tmp: Path, suffix: str) -> dict[str, torch.Tensor]:
    """A realistic original-layout file: mixed dtypes, EMA copies, LDM buffers, CLIP position_ids.

    Written with safetensors' / torch's own writers (not ours); returns the tensors expected back
    (everything but the EMA copies, which outputs deliberately drop).
    """
    ck.save_model(model, tmp / "base.safetensors", fmt="safetensors", progress=False)
    sd = load_file(tmp / "base.safetensors")
    for k in list(sd):
        if k.startswith("first_stage_model."):
            sd[k] = sd[k].half()  # a fp16 VAE next to a fp32 U-Net
        elif k.startswith("model.diffusion_model.output_blocks.2."):
            sd[k] = sd[k].bfloat16()
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    if model.family.text_encoder_layout == "clip":
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    expected = dict(sd)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")][:50]:
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] + 1
    sd["model_ema.decay"] = torch.tensor(0.9999)
    if suffix == ".safetensors":
        save_file(sd, tmp / "src.safetensors", metadata={"modelspec.prediction_type": "v" if model.family.v_parameterization
                                                         else "epsilon"})
    else:
        torch.save({"state_dict": sd, "epoch": 3, "global_step": 1200}, tmp / "src.ckpt")
    return expected


def _read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_original_to_diffusers_to_original_is_bit_exact(tiny, tmp_path, fam, suffix):
    expected = _original_source(tiny[fam], tmp_path, suffix)
    first = ck.load_model(tmp_path / f"src{suffix}", verbose=False)
    assert first.family.name == fam
    ck.save_model(first, tmp_path / "dif", fmt="diffusers_safetensors" if suffix == ".ckpt" else "diffusers", progress=False)
    second = ck.load_model(tmp_path / "dif", verbose=False)
    assert second.family.name == fam
    out = ck.save_model(second, tmp_path / f"out{suffix}", fmt=suffix[1:], progress=False)
    got = _read(out)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def _config_dir(model, root: Path) -> Path:
    """A Diffusers-format folder of the tiny model's configs, for diffusers' from_single_file."""
    model.unet.save_config(root / "unet")
    model.vae.save_config(root / "vae")
    model.text_encoder.config.save_pretrained(root / "text_encoder")
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(model.family.asset_dir / name, root / name)
    shutil.copy(model.family.asset_dir / "model_index.json", root / "model_index.json")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fam", ["sd1", "sd2-v"])
def test_diffusers_from_single_file_reads_our_file_bit_identically(tiny, tmp_path, fam):
    from diffusers import StableDiffusionPipeline

    model = tiny[fam]
    path = ck.save_model(model, tmp_path / "m.safetensors", fmt="safetensors", progress=False)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(_config_dir(model, tmp_path / "cfg")),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    for comp in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(model, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert ours.keys() == theirs.keys(), comp
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (comp, k)


@pytest.mark.slow
def test_sd2_without_source_gets_a_complete_openclip_tower(tiny, tmp_path):
    model = tiny["sd2"]
    n = model.text_encoder.config.num_hidden_layers
    sd = load_file(ck.save_model(model, tmp_path / "m.safetensors", fmt="safetensors", progress=False))
    p = "cond_stage_model.model."
    last = f"{p}transformer.resblocks.{n}."
    assert not torch.any(sd[last + "attn.out_proj.weight"]) and not torch.any(sd[last + "mlp.c_proj.bias"])
    assert torch.equal(sd[p + "text_projection"], torch.eye(model.text_encoder.config.hidden_size))
    # fused q/k/v equals the separate diffusers projections stacked in q, k, v order
    attn = model.text_encoder.state_dict()
    q, k, v = (attn[f"encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(sd[f"{p}transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    # loading puts the fabricated layer in passthrough, not in the model
    again = ck.load_model(tmp_path / "m.safetensors", verbose=False)
    assert again.text_encoder.config.num_hidden_layers == n and f"{last}ln_1.weight" in again.passthrough


@pytest.mark.slow
def test_old_sd1_files_without_text_model_prefix_load(tiny, tmp_path):
    model = tiny["sd1"]
    sd = load_file(ck.save_model(model, tmp_path / "m.safetensors", fmt="safetensors", progress=False))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
    save_file(old, tmp_path / "old.safetensors")
    loaded = ck.load_model(tmp_path / "old.safetensors", verbose=False)
    ref = model.text_encoder.state_dict()
    assert all(torch.equal(loaded.text_encoder.state_dict()[k], ref[k]) for k in ref)
    assert not loaded.passthrough


@pytest.mark.slow
def test_use_ema_weights_takes_the_ema_unet_and_outputs_drop_ema(tiny, tmp_path):
    expected = _original_source(tiny["sd1"], tmp_path, ".safetensors")
    sd = load_file(tmp_path / "src.safetensors")
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # complete the EMA copy
        sd.setdefault("model_ema." + k[len("model."):].replace(".", ""), sd[k] * 2)
    save_file(sd, tmp_path / "ema.safetensors")
    model = ck.load_model(tmp_path / "ema.safetensors", use_ema_weights=True, verbose=False)
    out = load_file(ck.save_model(model, tmp_path / "o.safetensors", fmt="safetensors", progress=False))
    assert not any(k.startswith("model_ema.") for k in out)
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(out[k], expected[k] * 2)
    with pytest.raises(UserError, match="EMA"):
        ck.load_model(tmp_path / "src.safetensors", use_ema_weights=True, verbose=False)  # only 50 EMA tensors


@pytest.mark.slow
def test_ckpt_and_diffusers_folder_keep_configs_so_tiny_models_compute_the_same(tiny, tmp_path):
    model = tiny["sd2"]
    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.text_encoder(ids).last_hidden_state
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ref_u = model.unet(lat, 10, ref).sample
    for name, fmt in (("m.ckpt", "ckpt"), ("d", "diffusers")):
        again = ck.load_model(ck.save_model(model, tmp_path / name, fmt=fmt, progress=False), verbose=False)
        with torch.no_grad():
            assert torch.equal(again.text_encoder(ids).last_hidden_state, ref)
            assert torch.equal(again.unet(lat, 10, ref).sample, ref_u)


def test_safetensors_output_header_is_valid_for_the_reference_reader(tiny, tmp_path):
    path = ck.save_model(tiny["sd2-v"], tmp_path / "m.safetensors", fmt="safetensors", progress=False,
                         metadata={"modelspec.author": "me"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert "v_pred" in f.keys()
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.title"] == "m" and meta["modelspec.author"] == "me" and meta["modelspec.sai_model_spec"] == "1.0.1"
