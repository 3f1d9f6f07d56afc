"""ModelSpec (https://github.com/Stability-AI/ModelSpec) metadata for safetensors outputs.

A1111, ComfyUI, Forge and model sites read `modelspec.*` to show a title and to know the
architecture and prediction type. Values are strings (a safetensors header holds str -> str).
Training details go under `sdtune.training` as JSON, since ModelSpec defines no key for them.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from sdtune.families import Family

SPEC_VERSION = "1.0.1"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"
# Optional ModelSpec fields a caller may pass through `extra`.
OPTIONAL = ("description", "author", "license", "tags", "usage_hint", "thumbnail", "merged_from",
            "trigger_phrase", "hash_sha256", "timestep_range")


def build_modelspec(family: Family, *, title: str, resolution: int | tuple[int, int] | None = None,
                    date: _dt.datetime | str | None = None, clip_skip: int | None = None,
                    training: dict[str, Any] | None = None, diffusers: bool = False,
                    extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata dict for one saved model (all values str)."""
    if resolution is None:
        resolution = family.resolution
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    if date is None:
        date = _dt.datetime.now().replace(microsecond=0)
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": IMPLEMENTATION_DIFFUSERS if diffusers else IMPLEMENTATION,
        "modelspec.title": str(title),
        "modelspec.date": date if isinstance(date, str) else date.isoformat(),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if family.v_parameterization else "epsilon",
    }
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    for key, value in (extra or {}).items():
        name = key if key.startswith("modelspec.") else f"modelspec.{key}"
        if name.removeprefix("modelspec.") not in OPTIONAL:
            raise ValueError(f"unknown ModelSpec field {key!r}; known: {', '.join(OPTIONAL)}")
        meta[name] = value if isinstance(value, str) else json.dumps(value)
    if training:
        meta["sdtune.training"] = json.dumps(training, sort_keys=True, default=str)
    return meta
