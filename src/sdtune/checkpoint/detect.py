"""Which family a checkpoint is (SD1 / SD2 base / SD2-v), and why: one detector for loading and --dry_run.

Both run the functions below on the same facts (`header.CheckpointView`: key names, shapes,
metadata, one tensor's values; or a Diffusers folder's configs), so the dry run plans what training
trains. `detect_from_header` is the cheap entry point (no torch; a .ckpt's
structure is read without running it); loading calls the same
`detect_single_file` / `detect_diffusers` on what it read.

Architecture (v1 vs v2) is read from the text encoder's layout, which does not depend on widths:
OpenCLIP keys (`cond_stage_model.model.*`) mean SD2, CLIP keys (`cond_stage_model.transformer.*`)
SD1. A `--v2` (or `v2=False`) that contradicts them is refused: the tensors cannot be loaded as the
other family. diffusers' own test (cross-attention width 1024) misclassifies small models, so it is
only the fallback for files without a text encoder.

Prediction type, first match wins:
1. `--v_parameterization` (or `v_parameterization=False`); a warning when the file says otherwise;
2. the `v_pred` marker key (ComfyUI, Forge, OneTrainer); ModelSpec `prediction_type` or a `-v`
   architecture; a Diffusers scheduler config's `prediction_type`;
3. a full-size SD2 U-Net without a marker: a forward probe of the loaded U-Net (`probe.py`, as
   AUTOMATIC1111's web UI does). It tests what the model does; ComfyUI's weight statistic (the std of
   one late LayerNorm bias, > 0.09 in 768-v models) is a heuristic its authors call unproven, so it is
   only the header-only estimate (`--dry_run`, and the plan when the model is not loaded yet);
4. otherwise epsilon, and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdtune.errors import UserError
from sdtune.families import Family, family_from_flags

from .header import CheckpointView, is_hub_id, read_ckpt_view, read_diffusers_configs, read_safetensors_view
from .text_encoder import CLIP_PREFIX, OPENCLIP_PREFIX

V_PRED_KEY = "v_pred"
UNET_PREFIX = "model.diffusion_model."
_COMFY_STAT_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_UNET_INPUT_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
_SD2_UNET_INPUT = (320, 4, 3, 3)  # SD 2.x's U-Net: 320 channels, 4 latent channels in (9: inpainting)


@dataclass(frozen=True)
class Detection:
    family: Family
    architecture_reason: str
    prediction_reason: str
    warnings: tuple[str, ...] = ()
    # a full-size SD2 U-Net without a prediction marker: the forward probe of the loaded U-Net decides;
    # `family` is then the header estimate (ComfyUI's statistic)
    probe: bool = False

    @property
    def reason(self) -> str:
        return f"{self.architecture_reason}; {self.prediction_reason}"

    def with_prediction(self, v_prediction: bool, why: str) -> "Detection":
        """The detection once the probe has decided."""
        return replace(self, family=family_from_flags(self.family.v2, v_prediction), prediction_reason=why, probe=False)


def detect_single_file(view: CheckpointView, *, v2: bool | None = None, v_parameterization: bool | None = None,
                       where: str = "") -> Detection:
    keys = view.shapes
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        hint = "a Diffusers component or LoRA?" if any(k.startswith(("down_blocks.", "lora_")) for k in keys) else \
            f"first keys: {sorted(keys)[:3]}"
        raise UserError(f"not a Stable Diffusion checkpoint: no U-Net tensors (model.diffusion_model.*; {hint})",
                        where=where, fix="Give a full SD 1.x/2.x checkpoint or a Diffusers folder.")
    arch_v2, arch_why = _architecture(view, v2, where)
    warnings: list[str] = []
    vpred, why, probe = _prediction(view, arch_v2, v_parameterization, warnings)
    return Detection(family_from_flags(arch_v2, vpred), arch_why, why, tuple(warnings), probe)


def _architecture(view: CheckpointView, v2: bool | None, where: str) -> tuple[bool, str]:
    keys = view.shapes
    from_keys = None
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        from_keys = True, "OpenCLIP text encoder keys (cond_stage_model.model.*) -> SD 2.x"
    elif any(k.startswith(CLIP_PREFIX) for k in keys):
        from_keys = False, "CLIP text encoder keys (cond_stage_model.transformer.*) -> SD 1.x"
    if from_keys is not None:
        if v2 is not None and bool(v2) != from_keys[0]:
            _refuse_architecture(bool(v2), from_keys[1].split(" -> ")[0], where)
        return from_keys
    if v2 is not None:
        return bool(v2), f"{'--v2' if v2 else 'v2=False'} given"
    arch = str(view.metadata.get("modelspec.architecture", ""))
    if arch.startswith("stable-diffusion-v2"):
        return True, f"ModelSpec architecture {arch!r}"
    width = _cross_attention_width(view)
    return width == 1024, f"no text encoder; cross-attention width {width if width is not None else '?'}"


def _cross_attention_width(view: CheckpointView) -> int | None:
    return next((s[-1] for k, s in view.shapes.items() if k.endswith("attn2.to_k.weight")), None)


def _refuse_architecture(v2: bool, evidence: str, where: str) -> None:
    actual, other = ("1.x", "2.x") if v2 else ("2.x", "1.x")
    flag = "--v2" if v2 else "v2=False (--v1)"
    raise UserError(f"{flag} says Stable Diffusion {other}, but this is a Stable Diffusion {actual} model ({evidence})",
                    where=where, fix=f"Drop {flag.split(' ')[0]}: the family is read from the model itself.")


def _marker(view: CheckpointView) -> tuple[bool, str] | None:
    """(v-prediction?, what says so) from the markers other tools write, or None."""
    if V_PRED_KEY in view.shapes:
        return True, "'v_pred' marker key"
    pt = str(view.metadata.get("modelspec.prediction_type", "")).lower()
    if pt in ("v", "v_prediction", "epsilon", "eps"):
        return pt.startswith("v"), f"ModelSpec prediction_type {pt!r}"
    arch = str(view.metadata.get("modelspec.architecture", ""))
    if arch.endswith("-v") or "-v/" in arch:
        return True, f"ModelSpec architecture {arch!r}"
    return None


def _prediction(view: CheckpointView, v2: bool, override: bool | None, warnings: list[str]) -> tuple[bool, str, bool]:
    marker = _marker(view)
    if override is not None:
        if marker is not None and marker[0] != bool(override):
            warnings.append(_contradiction(bool(override), marker[1]))
        return bool(override), f"{'--v_parameterization' if override else 'v_parameterization=False'} given", False
    if marker is not None:
        return marker[0], f"{marker[1]} -> {'v-prediction' if marker[0] else 'epsilon'}", False
    if v2 and view.shapes.get(_UNET_INPUT_KEY) == _SD2_UNET_INPUT and _cross_attention_width(view) == 1024:
        guess, stat = _comfy_statistic(view)
        return guess, (f"no prediction-type marker on a full-size SD2 U-Net: a forward probe decides when it is loaded "
                       f"(estimate from the header: {stat})"), True
    return False, "no prediction-type marker -> epsilon (pass --v_parameterization for a v-prediction model)", False


def _comfy_statistic(view: CheckpointView) -> tuple[bool, str]:
    values = view.values(_COMFY_STAT_KEY) if view.shapes.get(_COMFY_STAT_KEY) == (320,) else None
    if not values:
        return False, "no weight statistic readable -> epsilon"
    mean = sum(values) / len(values)
    std = (sum((x - mean) ** 2 for x in values) / len(values)) ** 0.5
    v = std > 0.09
    return v, f"ComfyUI's weight statistic, std {std:.3f} {'>' if v else '<='} 0.09 -> {'v-prediction' if v else 'epsilon'}"


def _contradiction(v: bool, source: str) -> str:
    if v:
        return (f"--v_parameterization given, but the model's {source} says epsilon: it will be trained to predict v "
                "from an epsilon model (drop the flag unless you mean to convert it)")
    return f"epsilon forced, but the model's {source} says v-prediction: it will be trained to predict epsilon"


def detect_diffusers(unet_config: dict, text_config: dict, scheduler_config: dict, *, v2: bool | None = None,
                     v_parameterization: bool | None = None, where: str = "") -> Detection:
    act = text_config.get("hidden_act")
    arch_v2 = act == "gelu" or unet_config.get("cross_attention_dim") == 1024
    why = f"text encoder activation {act!r} -> SD {'2' if arch_v2 else '1'}.x"
    if v2 is not None and bool(v2) != arch_v2:
        _refuse_architecture(bool(v2), f"text encoder activation {act!r}", where)
    warnings = []
    pt = scheduler_config.get("prediction_type")
    if v_parameterization is not None:
        vpred = bool(v_parameterization)
        if pt in ("epsilon", "v_prediction") and (pt == "v_prediction") != vpred:
            warnings.append(_contradiction(vpred, f"scheduler_config.json (prediction_type {pt!r})"))
        pred_why = f"{'--v_parameterization' if vpred else 'v_parameterization=False'} given"
    else:
        vpred = pt == "v_prediction"
        pred_why = f"scheduler prediction_type {pt or 'epsilon'!r}"
    return Detection(family_from_flags(arch_v2, vpred), why, pred_why, tuple(warnings))


def detect_from_header(path_or_id: str | Path, *, v2: bool | None = None,
                       v_parameterization: bool | None = None) -> tuple[Detection | None, str]:
    """(detection, "") from a .safetensors header, a torch zip checkpoint's structure or a Diffusers
    folder's configs, without loading; (None, why not) for other pickles, a Hub id or a path that does
    not exist (loading tells, or fails)."""
    path = Path(path_or_id)
    if path.is_file() and path.suffix == ".safetensors":
        return detect_single_file(read_safetensors_view(path), v2=v2, v_parameterization=v_parameterization,
                                  where=str(path)), ""
    if path.is_dir():
        unet, text, sched = read_diffusers_configs(path)
        return detect_diffusers(unet, text, sched, v2=v2, v_parameterization=v_parameterization, where=str(path)), ""
    if path.is_file() and path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        view = read_ckpt_view(path)
        if view is not None:
            return detect_single_file(view, v2=v2, v_parameterization=v_parameterization, where=str(path)), ""
        return None, f"this {path.suffix} file is read only when the model is loaded (not torch's zip format, or it " \
                     "pickles more than tensors)"
    if path.is_file():
        return None, f"a {path.suffix} file is read only when the model is loaded"
    if is_hub_id(str(path_or_id)):
        return None, "a Hugging Face Hub id is read when the model is loaded"
    return None, "model not found"


def needs_loading_to_plan(path_or_id: str | Path, detection: Detection | None) -> bool:
    """True when only a loaded model tells the family (a Hub id, an unreadable pickle, an SD2 file for the probe):
    the trainer then loads it before building the dataset plan, so that the plan is built once."""
    if detection is not None:
        return detection.probe
    return Path(path_or_id).exists() or is_hub_id(str(path_or_id))


def view_of(sd: dict, metadata: dict[str, Any]) -> CheckpointView:
    return CheckpointView.of_state_dict(sd, {k: v for k, v in metadata.items() if isinstance(v, str)})
