"""Whole-model conversion: an original-layout state dict <-> the three diffusers components.

Both directions only rename and reshape (views), except SD2's fused q/k/v, which is concatenated
on save. Nothing is cast here: dtypes travel unchanged, so round trips are bit-exact.
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import UserError

from . import text_encoder as te
from . import unet as un
from . import vae as va
from .detect import V_PRED_KEY

EMA_PREFIX = "model_ema."


def ema_key(unet_original_key: str) -> str:
    """LDM's EMA copy of one U-Net tensor: `model_ema.` + the name without `model.` and dots."""
    return EMA_PREFIX + unet_original_key[len("model."):].replace(".", "")


def to_original(model) -> dict[str, Any]:
    """The original-layout state dict of `model`, including passthrough and the v_pred marker."""
    import torch

    fam = model.family
    out: dict[str, Any] = {}
    ucfg = dict(model.unet.config)
    for k, v in model.unet.state_dict().items():
        if un.is_projection(k):
            v = un.to_native_rank(v, fam.v2)
        out[un.PREFIX + un.to_original_key(k, ucfg)] = v
    vcfg = dict(model.vae.config)
    for k, v in model.vae.state_dict().items():
        if va.is_attention_matrix(k):
            v = v[:, :, None, None]
        out[va.PREFIX + va.to_original_key(k, vcfg)] = v
    tsd = model.text_encoder.state_dict()
    passthrough = dict(model.passthrough)
    if fam.text_encoder_layout == "openclip":
        layers = model.text_encoder.config.num_hidden_layers
        out.update(te.openclip_to_original(tsd, layers))
        needed = (f"{te.OPENCLIP_PREFIX}transformer.resblocks.{layers}.ln_1.weight", te.OPENCLIP_PREFIX + "text_projection",
                  te.OPENCLIP_PREFIX + "logit_scale")
        if not all(k in passthrough for k in needed):
            for k, v in te.fabricate_openclip_extras(out, layers).items():
                passthrough.setdefault(k, v)  # only what the source did not bring
    else:
        out.update(te.clip_to_original(tsd))
    marker = passthrough.pop(V_PRED_KEY, None)
    clash = sorted(set(passthrough) & set(out))
    if clash:
        raise RuntimeError(f"passthrough tensors shadow model tensors: {clash[:5]}")
    out.update(passthrough)
    if fam.v_parameterization:
        # ComfyUI / Forge read this key to choose v-prediction; its value is not used.
        out[V_PRED_KEY] = marker if marker is not None else torch.tensor([])
    return out


def from_original(sd: dict, *, unet_keys, vae_keys, text_keys, unet_config, vae_config, openclip: bool,
                  use_ema: bool, where: str):
    """(unet_sd, vae_sd, text_sd, passthrough) from an original-layout state dict."""
    used: set[str] = set()
    missing: list[str] = []

    def take(name):
        used.add(name)
        if name not in sd:
            missing.append(name)
            return None
        return sd[name]

    unet_sd, ema_missing = {}, []
    for k in unet_keys:
        name = un.PREFIX + un.to_original_key(k, unet_config)
        v = take(name)
        if use_ema:
            used.add(ema_key(name))
            if ema_key(name) in sd:
                v = sd[ema_key(name)]
            else:
                ema_missing.append(ema_key(name))
        unet_sd[k] = v
    vae_sd = {}
    for k in vae_keys:
        v = take(va.PREFIX + va.to_original_key(k, vae_config))
        vae_sd[k] = v[:, :, 0, 0] if v is not None and va.is_attention_matrix(k) and v.ndim == 4 else v
    try:
        text_sd, tused = (te.openclip_from_original if openclip else te.clip_from_original)(sd, list(text_keys))
        used |= tused
    except KeyError as exc:
        missing.append(str(exc).strip("'"))
        text_sd = {}
    if missing:
        raise UserError(f"{len(missing)} tensors of a Stable Diffusion model are missing, e.g. {missing[:3]}",
                        where=where, fix="The file is incomplete (a pruned VAE-less or U-Net-only file?) or not "
                                         "an SD 1.x/2.x checkpoint; use a full checkpoint.")
    if use_ema and ema_missing:
        has_any = any(k.startswith(EMA_PREFIX) for k in sd)
        raise UserError(f"--use_ema_weights: {'some' if has_any else 'no'} EMA tensors (model_ema.*) in the file"
                        f"{', e.g. missing ' + ema_missing[0] if has_any else ''}", where=where,
                        fix="Drop --use_ema_weights to start from the regular weights.")
    stray = sorted(k for k in sd if k.startswith(un.PREFIX) and k not in used)
    if stray:
        raise UserError(f"U-Net tensors that do not fit the detected architecture: {stray[:3]}", where=where,
                        fix="This is not an SD 1.x/2.x U-Net (inpainting, SDXL, ...?) or the family detection is wrong.")
    # EMA copies are deliberately not carried: an output holding stale EMA next to trained weights
    # misleads any tool that prefers EMA (sd-scripts carries them over from the source checkpoint).
    passthrough = {k: v.clone() for k, v in sd.items() if k not in used and not k.startswith(EMA_PREFIX)}
    return unet_sd, vae_sd, text_sd, passthrough
