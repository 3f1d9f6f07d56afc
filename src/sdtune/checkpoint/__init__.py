"""Loading and saving Stable Diffusion checkpoints.

Public API (used by train, convert, testing):

    load_model(path, *, v2=None, v_parameterization=None, use_ema_weights=False) -> SDModel
    save_model(model, path, *, fmt, precision=None, metadata=None) -> Path

PLACEHOLDER: only Diffusers folders for now; the single-file formats come with issue 3.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.errors import UserError
from sdtune.families import get_family

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")


def load_model(path, *, v2=None, v_parameterization=None, use_ema_weights=False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtune.model import SDModel

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError("not a Diffusers folder (no model_index.json)", where=str(path))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    v2 = bool(v2) if v2 is not None else unet.config.cross_attention_dim != 768 and te.config.hidden_act == "gelu"
    fam = get_family("sd2" if v2 else "sd1").with_prediction_type(sched.get("prediction_type", "epsilon"))
    return SDModel(fam, unet, vae, te, tok, sched, source=str(path))


def save_model(model, path, *, fmt, precision=None, metadata=None):
    if fmt not in ("diffusers", "diffusers_safetensors"):
        raise UserError(f"--save_model_as {fmt} is not implemented yet")
    path = Path(path)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(model, name).save_pretrained(path / name)
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    (path / "model_index.json").write_text((model.family.asset_dir / "model_index.json").read_text())
    return path
