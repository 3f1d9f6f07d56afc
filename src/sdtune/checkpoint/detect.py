"""Which family a checkpoint is (SD1 / SD2 base / SD2-v), and why.

Architecture (v1 vs v2) is read from the text encoder's layout, which does not depend on widths:
OpenCLIP keys (`cond_stage_model.model.*`) mean SD2, CLIP keys (`cond_stage_model.transformer.*`)
SD1. diffusers' own test (cross-attention width 1024) misclassifies small models, so it is only the
fallback for files without a text encoder.

Prediction type, first match wins: `--v_parameterization`; the `v_pred` marker key (ComfyUI, Forge,
OneTrainer); ModelSpec `prediction_type` / a `-v` architecture; a Diffusers scheduler config; for
full-size SD2 U-Nets ComfyUI's weight statistic (the std of one late LayerNorm bias is > 0.09 in
768-v models, ~0.05 in base); otherwise epsilon, and the reason says so.
"""

from __future__ import annotations

from typing import Any

from sdtune.families import Family, family_from_flags

from .text_encoder import CLIP_PREFIX, OPENCLIP_PREFIX

V_PRED_KEY = "v_pred"
_COMFY_STAT_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def detect_single_file(sd: dict, metadata: dict[str, Any], *, v2: bool | None = None,
                       v_parameterization: bool | None = None) -> tuple[Family, str]:
    reasons = []
    if v2 is not None:
        arch_v2 = bool(v2)
        reasons.append(f"{'--v2' if v2 else 'v2=False'} given")
    elif any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        arch_v2 = True
        reasons.append("OpenCLIP text encoder keys (cond_stage_model.model.*) -> SD 2.x")
    elif any(k.startswith(CLIP_PREFIX) for k in sd):
        arch_v2 = False
        reasons.append("CLIP text encoder keys (cond_stage_model.transformer.*) -> SD 1.x")
    else:
        to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
        arch = str(metadata.get("modelspec.architecture", ""))
        if arch.startswith("stable-diffusion-v2"):
            arch_v2 = True
            reasons.append(f"ModelSpec architecture {arch!r}")
        else:
            arch_v2 = bool(to_k) and to_k[0].shape[-1] == 1024
            reasons.append(f"no text encoder; cross-attention width {to_k[0].shape[-1] if to_k else '?'}")

    vpred, why = _prediction(sd, metadata, arch_v2, v_parameterization)
    reasons.append(why)
    return family_from_flags(arch_v2, vpred), "; ".join(reasons)


def _prediction(sd, metadata, v2, override):
    if override is not None:
        return bool(override), f"{'--v_parameterization' if override else 'v_parameterization=False'} given"
    if V_PRED_KEY in sd:
        return True, "'v_pred' marker key -> v-prediction"
    pt = str(metadata.get("modelspec.prediction_type", "")).lower()
    if pt in ("v", "v_prediction", "epsilon", "eps"):
        return pt.startswith("v"), f"ModelSpec prediction_type {pt!r}"
    arch = str(metadata.get("modelspec.architecture", ""))
    if arch.endswith("-v") or "-v/" in arch:
        return True, f"ModelSpec architecture {arch!r} -> v-prediction"
    stat = sd.get(_COMFY_STAT_KEY)
    if v2 and stat is not None and stat.shape[0] == 320:
        std = float(stat.float().std(unbiased=False))
        return std > 0.09, f"SD2 weight statistic (std {std:.3f} {'>' if std > 0.09 else '<='} 0.09, as ComfyUI) -> " \
                           f"{'v-prediction' if std > 0.09 else 'epsilon'}"
    return False, "no prediction-type marker -> epsilon (pass --v_parameterization for a v-prediction model)"


def detect_diffusers(unet_config: dict, text_config: dict, scheduler_config: dict, *, v2: bool | None = None,
                     v_parameterization: bool | None = None) -> tuple[Family, str]:
    reasons = []
    if v2 is not None:
        arch_v2 = bool(v2)
        reasons.append(f"{'--v2' if v2 else 'v2=False'} given")
    else:
        act = text_config.get("hidden_act")
        arch_v2 = act == "gelu" or unet_config.get("cross_attention_dim") == 1024
        reasons.append(f"text encoder activation {act!r} -> SD {'2' if arch_v2 else '1'}.x")
    if v_parameterization is not None:
        vpred = bool(v_parameterization)
        reasons.append(f"{'--v_parameterization' if vpred else 'v_parameterization=False'} given")
    else:
        pt = scheduler_config.get("prediction_type", "epsilon")
        vpred = pt == "v_prediction"
        reasons.append(f"scheduler prediction_type {pt!r}")
    return family_from_flags(arch_v2, vpred), "; ".join(reasons)
