"""Tiny, randomly initialised Stable Diffusion models and synthetic datasets.

Used by the tests, `sdtune demo` and the benchmarks. The models are built from the same shipped
configs as the real families (sdtune/assets) with only the widths shrunk: the U-Net keeps SD's
4-level block layout with SD1's 1:2:4:4 width ratio and two layers per block, the VAE keeps its
4 levels (so the real 8x downsampling), and the text encoders keep the real tokenizer and
vocabulary. Checkpoint key sets are therefore the real ones.

Everything is deterministic from a seed, and the global RNG is left as it was.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from sdtune.families import Family, get_family

# Width overrides applied to the shipped configs. Keeping the ratios is what keeps the key set.
_TINY_UNET = {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 8}
_TINY_VAE = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 4,
              "projection_dim": 32}


def tiny_config(family: Family | str, component: str) -> dict[str, Any]:
    """The shipped config of `component` ("unet", "vae", "text_encoder") with tiny widths."""
    fam = get_family(family) if isinstance(family, str) else family
    name = "config.json"
    config = json.loads((fam.asset_dir / component / name).read_text())
    if component == "unet":
        config.update(_TINY_UNET)
        config["cross_attention_dim"] = _TINY_TEXT["hidden_size"]
        # SD1 counts heads (8 everywhere); SD2 keeps a constant head width: heads grow with channels.
        config["attention_head_dim"] = [1, 2, 4, 4] if fam.v2 else 2
    elif component == "vae":
        config.update(_TINY_VAE)
    elif component == "text_encoder":
        config.update(_TINY_TEXT)
    else:
        raise ValueError(component)
    return config


def build_tiny_model(family: Family | str = "sd1", seed: int = 0):
    """An `SDModel` with random weights, the real tokenizer and the family's scheduler config."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtune.model import SDModel

    fam = get_family(family) if isinstance(family, str) else family
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(tiny_config(fam, "unet"))
        vae = AutoencoderKL.from_config(tiny_config(fam, "vae"))
        te_config = {k: v for k, v in tiny_config(fam, "text_encoder").items() if k not in ("architectures", "model_type")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    tokenizer = CLIPTokenizer.from_pretrained(fam.asset_dir / "tokenizer")
    scheduler_config = json.loads((fam.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDModel(fam, unet, vae, text_encoder, tokenizer, scheduler_config, source=f"tiny random {fam.name} (seed {seed})",
                   detection="built by sdtune.testing")


def write_tiny_model(path: str | Path, family: Family | str = "sd1", seed: int = 0, fmt: str | None = None) -> Path:
    """Build a tiny model and write it as a Diffusers folder or an original-layout single file.

    `fmt` is taken from the suffix when not given: ".safetensors" / ".ckpt" write a single file,
    anything else a Diffusers folder.
    """
    from sdtune import checkpoint

    path = Path(path)
    if fmt is None:
        fmt = {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(path.suffix, "diffusers")
    checkpoint.save_model(build_tiny_model(family, seed), path, fmt=fmt)
    return path


# ---------------------------------------------------------------------------------------------
# Synthetic datasets

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
            "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (240, 140, 30)}
_SHAPES = ("circle", "square", "triangle")
# (width, height) and file format: varied aspect ratios and encodings.
_LAYOUTS = [((96, 64), "png"), ((64, 96), "jpg"), ((80, 80), "webp"), ((128, 64), "png"),
            ((64, 128), "jpg"), ((72, 96), "png"), ((96, 72), "jpg"), ((64, 64), "bmp")]


def make_dataset(directory: str | Path, n: int = 8, seed: int = 0, metadata: str | Path | None = None) -> dict[str, dict]:
    """Write `n` synthetic images with `.caption` (sentence) and `.txt` (tags) files.

    Each image is one coloured shape on a coloured background, described by its caption and tags,
    so a model can learn the conditioning. Returns the sd-scripts metadata dict keyed by file stem;
    written as JSON to `metadata` when given.
    """
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(_COLOURS)
    meta: dict[str, dict] = {}
    for i in range(n):
        (w, h), ext = _LAYOUTS[i % len(_LAYOUTS)]
        fg, bg = rng.sample(names, 2)
        shape = rng.choice(_SHAPES)
        img = Image.new("RGB", (w, h), _COLOURS[bg])
        draw = ImageDraw.Draw(img)
        s = min(w, h)
        cx, cy = rng.randint(s // 3, w - s // 3), rng.randint(s // 3, h - s // 3)
        r = rng.randint(s // 6, s // 3)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[fg])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLOURS[fg])
        stem = f"img_{i:03d}"
        img.save(directory / f"{stem}.{ext}", quality=95) if ext == "jpg" else img.save(directory / f"{stem}.{ext}")
        caption = f"a {fg} {shape} on a {bg} background"
        tags = f"{fg} {shape}, {bg} background, simple background"
        (directory / f"{stem}.caption").write_text(caption + "\n")
        (directory / f"{stem}.txt").write_text(tags + "\n")
        meta[stem] = {"caption": caption, "tags": tags, "image_size": [w, h]}
    if metadata is not None:
        Path(metadata).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
