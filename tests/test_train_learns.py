"""It learns: 30 steps on 4 images lower the loss measured at fixed timesteps
and fixed noise by at least 30 %, for an epsilon (SD1) and a v-prediction (SD2-v) model.

The loss is computed here, independently of sdtune: images resized and centre-cropped with PIL,
encoded with the VAE's posterior mean, captions through the bare CLIP text encoder, noise and
targets from diffusers' DDPMScheduler, before training (the written model) and after (the model
sdtune saved).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.cli import main
from sdtune.families import get_family
from sdtune.testing import make_dataset

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

TIMESTEPS = [50, 200, 400, 600, 800]
# 30 steps at a learning rate of 2e-3 end with the loss at ~0.33 (SD1) and ~0.45 (SD2-v) of its start on
# the development machine, well under the 0.7 asserted; 60 steps at 1e-3 (0.29, 0.43) cost twice the time.
STEPS = 30


def fixed_noise_loss(model_dir: Path, data: Path, meta: dict, prediction_type: str) -> float:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    assert scheduler.config.prediction_type == prediction_type

    pixels = []
    for stem in sorted(meta):
        path = next(p for p in data.glob(f"{stem}.*") if p.suffix in (".png", ".jpg", ".webp", ".bmp"))
        image = Image.open(path).convert("RGB")
        w, h = image.size
        s = 64 / min(w, h)
        image = image.resize((max(64, round(w * s)), max(64, round(h * s))), Image.LANCZOS)
        left, top = (image.width - 64) // 2, (image.height - 64) // 2
        image = image.crop((left, top, left + 64, top + 64))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    captions = [meta[stem]["caption"] for stem in sorted(meta)]
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        latents = vae.encode(torch.stack(pixels)).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids).last_hidden_state
        for t in TIMESTEPS:
            noise = torch.randn(latents.shape, generator=gen)
            ts = torch.full((len(captions),), t, dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, ts)
            target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, ts)
            pred = unet(noisy, ts, cond).sample
            total += torch.nn.functional.mse_loss(pred, target).item()
    return total / len(TIMESTEPS)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_overfit_lowers_the_fixed_noise_loss(family, tmp_path, tiny_model_file):
    prediction_type = get_family(family).prediction_type
    tiny_model_file(tmp_path / "model", family, seed=0, fmt="diffusers")
    full = make_dataset(tmp_path / "data", n=4, seed=3)
    meta = {stem: {"caption": entry["caption"]} for stem, entry in full.items()}  # the caption is the whole text
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    before = fixed_noise_loss(tmp_path / "model", tmp_path / "data", meta, prediction_type)

    code = main(["train", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--in_json",
                 str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "data"), "--output_dir",
                 str(tmp_path / "out"), "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", str(STEPS),
                 "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--cache_latents", "--save_model_as",
                 "diffusers", "--seed", "0", "--max_data_loader_n_workers", "0"])
    assert code == 0
    after = fixed_noise_loss(tmp_path / "out" / "last", tmp_path / "data", meta, prediction_type)
    assert after < 0.7 * before, (before, after)
