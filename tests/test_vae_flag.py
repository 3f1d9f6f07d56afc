"""--vae: a separate VAE encodes the latents (cached or not) and the samples, and is saved in the model.

Independent checks: a VAE file in the original layout is compared by tensor name with the output's
`first_stage_model.*`; a diffusers-layout one through diffusers' own LDM -> diffusers converter; the
cached latents against the other VAE's encoding computed here with diffusers directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdtune.checkpoint import load_vae
from sdtune.cli import main
from sdtune.errors import UserError
from sdtune.testing import build_tiny_model

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

VAE = "first_stage_model."


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    """Model A (seed 0) to train, model B (seed 1) whose VAE is the --vae in every form; two 64x64 images."""
    root = tmp_path_factory.mktemp("vae")
    tiny_model_file(root / "a.safetensors", "sd1", seed=0)
    tiny_model_file(root / "b.safetensors", "sd1", seed=1)
    tiny_model_file(root / "b", "sd1", seed=1, fmt="diffusers")
    full = load_file(str(root / "b.safetensors"))
    ldm = {k[len(VAE):]: v for k, v in full.items() if k.startswith(VAE)}
    save_file(ldm, str(root / "vae_ldm.safetensors"))
    # as CompVis' VAE .ckpt files: wrapped in state_dict, with the training loss's tensors beside
    torch.save({"state_dict": {**ldm, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2)},
                "global_step": 840000}, root / "vae_ldm.ckpt")
    b = build_tiny_model("sd1", seed=1).vae.state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in b.items():  # diffusers < 0.14 attention names, as old VAE files have
        for new, old in old_names.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v.contiguous()
    save_file(renamed, str(root / "vae_diffusers_old.safetensors"))
    img = root / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    for name in ("p", "q"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img / f"{name}.png")
    (root / "m.json").write_text('{"p": {"caption": "a photo"}, "q": {"caption": "a picture"}}')
    return root


@pytest.fixture(scope="module")
def vae_b():
    return build_tiny_model("sd1", seed=1).vae


@pytest.fixture(scope="module")
def like():
    return build_tiny_model("sd1", seed=0).vae


@pytest.mark.parametrize("form", ["vae_ldm.safetensors", "vae_ldm.ckpt", "vae_diffusers_old.safetensors", "b.safetensors", "b", "b/vae"])
def test_every_form_loads_the_same_vae(ws, vae_b, like, form):
    vae = load_vae(ws / form, like=like)
    want = vae_b.state_dict()
    got = vae.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert vae.config.scaling_factor == like.config.scaling_factor


def _train(ws, out, *extra):
    return main(["train", "--pretrained_model_name_or_path", str(ws / "a.safetensors"), "--in_json", str(ws / "m.json"),
                 "--train_data_dir", str(ws / "img"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
                 "--train_batch_size", "2", "--max_train_steps", "1", "--max_data_loader_n_workers", "0", *extra])


def test_vae_caches_and_is_saved(ws, vae_b, like, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cache = tmp_path / "cache"
    assert _train(ws, tmp_path / "out", "--vae", str(ws / "vae_diffusers_old.safetensors"), "--cache_latents_to_disk",
                  "--cache_dir", str(cache)) == 0
    saved = load_file(str(tmp_path / "out" / "N.safetensors"))
    # the saved VAE is the --vae file's, read back through diffusers' own converter
    converted = convert_ldm_vae_checkpoint({k: v for k, v in saved.items() if k.startswith(VAE)}, dict(vae_b.config))
    old_file = load_file(str(ws / "vae_diffusers_old.safetensors"))
    for k, v in vae_b.state_dict().items():
        assert torch.equal(converted[k].reshape(v.shape), v), k
    assert sum(1 for k in saved if k.startswith(VAE)) == len(old_file)
    # the cached latents are B's encoding of the images, not A's
    entries = sorted(cache.glob("img-*/*.safetensors"))
    assert len(entries) == 2
    for entry in entries:
        pixels = np.asarray(Image.open(ws / "img" / entry.name.split(".n.")[0]).convert("RGB"), np.float32)
        x = torch.from_numpy(pixels.transpose(2, 0, 1)[None] / 127.5 - 1.0)
        with torch.no_grad():
            want_b, want_a = vae_b.encode(x).latent_dist.mean[0], like.encode(x).latent_dist.mean[0]
        got = load_file(str(entry))["mean"].float()
        torch.testing.assert_close(got, want_b, rtol=2e-3, atol=2e-3)
        assert not torch.allclose(got, want_a, rtol=2e-3, atol=2e-3)


def test_cache_command_takes_vae_and_a_different_vae_reencodes(ws, tmp_path, capsys):
    data = ["--in_json", str(ws / "m.json"), "--train_data_dir", str(ws / "img"), "--resolution", "64",
            "--max_data_loader_n_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    model = ["--pretrained_model_name_or_path", str(ws / "a.safetensors")]
    assert main(["cache", *model, *data]) == 0
    assert "2 encoded" in capsys.readouterr().out
    assert main(["cache", *model, "--vae", str(ws / "vae_ldm.safetensors"), *data]) == 0
    out = capsys.readouterr().out
    assert "2 VAE changed" in out and "0 reused, 2 encoded" in out
    # the same VAE in another form (a whole checkpoint) has the same weights: reused
    assert main(["cache", *model, "--vae", str(ws / "b.safetensors"), *data]) == 0
    assert "2 reused, 0 encoded" in capsys.readouterr().out


def _bad(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_bad_vae_gets_one_line(ws, like, tmp_path, capsys):
    ldm = load_file(str(ws / "vae_ldm.safetensors"))
    unet_only = {k: v for k, v in load_file(str(ws / "a.safetensors")).items() if k.startswith("model.diffusion_model.")}
    from diffusers import AutoencoderKL

    from sdtune.testing import tiny_config

    wide = AutoencoderKL.from_config({**tiny_config("sd1", "vae"), "latent_channels": 8}).state_dict()
    cases = {
        "not a VAE": _bad(tmp_path / "unet.safetensors", unet_only),
        "VAE tensors are missing": _bad(tmp_path / "cut.safetensors",
                                        {k: v for k, v in ldm.items() if "decoder.up.0" not in k}),
        "tensors do not fit": _bad(tmp_path / "shape.safetensors", {**ldm, "encoder.conv_in.weight": torch.zeros(8, 3, 5, 5)}),
        "8-channel latents": _bad(tmp_path / "wide.safetensors", wide),
        "VAE not found": tmp_path / "nowhere.safetensors",
        "not a Diffusers VAE folder": tmp_path,
        "the VAE 'someone/no-such-vae' is not in the local Hugging Face cache": "someone/no-such-vae",
    }
    for needle, path in cases.items():
        with pytest.raises(UserError, match=needle):
            load_vae(path, like=like)
    assert _train(ws, tmp_path / "out", "--vae", str(cases["8-channel latents"])) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "--vae" in last and "8-channel latents" in last and "Traceback" not in err
    assert not (tmp_path / "out" / "N.safetensors").exists()
