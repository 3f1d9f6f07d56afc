"""sdtune's training step against a minimal hand-written loop on the same tiny model and batches.

    .venv/bin/python bench/step_overhead.py [--steps 60] [--batch 4] [--resolution 64] [--repeats 3]

Prints JSON lines: one per measurement, then a summary with the ratio (goal: at most 1.05).

sdtune's time per step is the difference between two full runs of the real `sdtune train` path
(options, loop, logging, saving) with `--max_train_steps` S and S + steps, divided by `steps`,
so model loading, caching and saving cancel out. The hand-written loop is what diffusers' training
examples do: cached latents, a frozen text encoder's embeddings computed once, DDPMScheduler noise,
U-Net forward, MSE, backward, gradient clipping at 1.0 (sdtune's default), AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sdtune_seconds(root: Path, steps: int, batch: int, resolution: int, extra: tuple[str, ...] = ()) -> float:
    from sdtune.cli import build_parser
    from sdtune.console import quiet_libraries
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    quiet_libraries()
    args = build_parser("train").parse_args([
        "train", "--pretrained_model_name_or_path", str(root / "model"), "--in_json", str(root / "meta.json"),
        "--train_data_dir", str(root / "data"), "--output_dir", str(root / "out"), "--resolution", str(resolution),
        "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
        "--cache_latents", "--max_data_loader_n_workers", "0", "--save_model_as", "diffusers", *extra])
    opts = options_from_args(args)
    started = time.perf_counter()
    train(opts)
    return time.perf_counter() - started


def plain_ms_per_step(root: Path, steps: int, batch: int, resolution: int, warmup: int = 5) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    meta = json.loads((root / "meta.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(root / "model", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(root / "model", subfolder="vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(root / "model", subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "model", subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(root / "model", subfolder="scheduler")
    images, captions = [], []
    for stem, entry in sorted(meta.items()):
        path = next(p for p in (root / "data").glob(f"{stem}.*") if p.suffix in (".png", ".jpg", ".webp", ".bmp"))
        image = Image.open(path).convert("RGB").resize((resolution, resolution))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        captions.append(f"{entry['caption']}, {entry['tags']}")
    with torch.no_grad():
        latents_all = vae.encode(torch.stack(images)).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond_all = text_encoder(ids).last_hidden_state
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    n = len(captions)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        idx = [(step * batch + i) % n for i in range(batch)]
        latents, cond = latents_all[idx], cond_all[idx]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # sdtune reads the loss every step too
    return (time.perf_counter() - started) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each; the minimum counts")
    a = parser.parse_args()

    import torch

    from sdtune.console import quiet_libraries
    from sdtune.testing import make_dataset, write_tiny_model

    quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_model(root / "model", "sd1", seed=0, fmt="diffusers")
        make_dataset(root / "data", n=8, seed=0, metadata=root / "meta.json")
        base_steps = 5
        sdtune_ms, plain_ms = [], []
        import contextlib
        import io

        for r in range(a.repeats):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                short = sdtune_seconds(root, base_steps, a.batch, a.resolution)
                long = sdtune_seconds(root, base_steps + a.steps, a.batch, a.resolution)
            sdtune_ms.append((long - short) / a.steps * 1000)
            print(json.dumps({"bench": "step_overhead", "impl": "sdtune", "repeat": r,
                              "ms_per_step": round(sdtune_ms[-1], 2)}), flush=True)
            plain_ms.append(plain_ms_per_step(root, a.steps, a.batch, a.resolution))
            print(json.dumps({"bench": "step_overhead", "impl": "plain", "repeat": r,
                              "ms_per_step": round(plain_ms[-1], 2)}), flush=True)
        best_s, best_p = min(sdtune_ms), min(plain_ms)
        print(json.dumps({"bench": "step_overhead", "summary": True, "sdtune_ms": round(best_s, 2),
                          "plain_ms": round(best_p, 2), "ratio": round(best_s / best_p, 3), "goal": 1.05,
                          "steps": a.steps, "batch": a.batch, "resolution": a.resolution,
                          "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
