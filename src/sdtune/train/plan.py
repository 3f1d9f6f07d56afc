"""`--dry_run`: what a training run would do, without torch and without loading the model.

The family (which decides the default resolution) is read from the checkpoint's header only: the
safetensors JSON header, or a Diffusers folder's configs. Anything else falls back to the SD1
defaults, and the output says so.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from sdtune.families import SD1, SD2, SD2_V, Family
from sdtune.train.options import TrainOptions


def peek_family(path: str, v2: bool = False, v_parameterization: bool = False) -> tuple[Family | None, str]:
    p = Path(path)
    keys: set[str] = set()
    meta: dict = {}
    prediction = None
    if p.is_file() and p.suffix == ".safetensors":
        try:
            with open(p, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None, "unreadable safetensors header"
        meta = header.pop("__metadata__", {}) or {}
        keys = set(header)
        pt = meta.get("modelspec.prediction_type")
        prediction = "v_prediction" if "v_pred" in keys or pt == "v" else ("epsilon" if pt == "epsilon" else None)
        is_v2 = any(k.startswith("cond_stage_model.model.") for k in keys)
    elif p.is_dir() and (p / "model_index.json").is_file():
        try:
            te = json.loads((p / "text_encoder" / "config.json").read_text())
            sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError):
            return None, "unreadable Diffusers configs"
        is_v2 = te.get("hidden_act") == "gelu"
        prediction = sched.get("prediction_type")
    else:
        return None, "family not read without loading the model"
    is_v2 = is_v2 or v2
    if v_parameterization:
        prediction = "v_prediction"
    if not is_v2:
        return SD1.with_prediction_type(prediction or "epsilon"), "from the checkpoint header"
    return (SD2_V if prediction == "v_prediction" else SD2), "from the checkpoint header"


def dry_run(opts: TrainOptions) -> None:
    from sdtune.data import build_plan, cache_plan_summary

    family, how = peek_family(opts.pretrained_model_name_or_path, opts.v2, opts.v_parameterization)
    print(f"model: {opts.pretrained_model_name_or_path} — "
          f"{family.title if family else 'family unknown (SD1 defaults assumed)'} ({how})")
    from sdtune.train.validation import check_options, split_plan

    plan = build_plan(opts, seed=opts.effective_seed, default_resolution=(family or SD1).resolution)
    plan, held_out = split_plan(plan, opts.validation_split, opts.effective_validation_seed)  # as the run will
    check_options(opts, held_out)
    accum = opts.gradient_accumulation_steps
    print(plan.summary(1, accum))
    print(cache_plan_summary(plan))
    if held_out:
        print(f"validation: {len(held_out)} held-out images (never trained on)")
    per_epoch = plan.steps_per_epoch(1, accum)
    steps = opts.max_train_epochs * per_epoch if opts.max_train_epochs else opts.max_train_steps
    print(f"training: {steps} optimizer steps = {math.ceil(steps / max(1, per_epoch))} epochs of {per_epoch} steps "
          f"(1 process; with N processes each epoch has about 1/N of the steps)")
