"""Loading and saving Stable Diffusion 1.x / 2.x checkpoints.

Public API (used by train, convert, testing):

    load_model(path_or_id, *, v2=None, v_parameterization=None, use_ema_weights=False,
               config=None, dtype=None, verbose=True) -> SDModel
    load_vae(path_or_id, *, like, dtype=None) -> AutoencoderKL   (a separate VAE, --vae)
    save_model(model, path, *, fmt, precision=None, metadata=None, title=None, progress=True) -> Path
    build_modelspec(family, *, title, resolution=None, date=None, clip_skip=None, training=None,
                    diffusers=False, extra=None) -> dict[str, str]

Layout of the package (one concern per module):

    io.py            safe reading (mmap safetensors, weights-only pickles), streamed atomic writing
    unet.py          U-Net key map, original <-> diffusers, derived from the config
    vae.py           VAE key map (reversed decoder numbering, 1x1-conv attention)
    text_encoder.py  SD1 CLIP and SD2 OpenCLIP key maps (fused q/k/v), the missing-24th-layer policy
    convert.py       whole model <-> original state dict; EMA selection; passthrough
    header.py        what a file holds, read without loading it (safetensors header, Diffusers configs)
    detect.py        SD1 / SD2 / SD2-v detection, with the reason: one detector for loading and --dry_run
    probe.py         v-prediction or epsilon from a forward pass of a full-size SD2 U-Net
    modelspec.py     ModelSpec metadata
    load.py, save.py the two entry points

We write our own diffusers -> original converter because the installed diffusers only converts the
other way; loading uses our key maps too so that both directions are one table, tested against
diffusers' independent `from_single_file`.

Nothing here imports torch at module level, so `sdtune convert --help` stays fast.
"""

from __future__ import annotations

from .load import load_model, load_vae
from .modelspec import build_modelspec
from .save import PRECISIONS, SAVE_FORMATS, save_model

__all__ = ["load_model", "load_vae", "save_model", "build_modelspec", "SAVE_FORMATS", "PRECISIONS"]
