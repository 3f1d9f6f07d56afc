"""`--dry_run`: what a training run would do, without torch and without loading the model.

The family (which decides the default resolution) comes from the same detector loading uses
(`sdtune.checkpoint.detect`), run on the checkpoint's header: the safetensors JSON header, a .ckpt's
structure, or a Diffusers folder's configs. A Hub id is only read when loaded; the SD1 defaults are
then assumed and the output says so (training loads such a model before planning).
"""

from __future__ import annotations

import math

from sdtune.console import plural
from sdtune.families import SD1, Family
from sdtune.train.options import TrainOptions


def peek_family(path: str, v2: bool = False, v_parameterization: bool = False) -> tuple[Family | None, str]:
    """(family, how it was found) from the header, as loading would detect it; (None, why not)."""
    from sdtune.checkpoint.detect import detect_from_header

    found, why_not = detect_from_header(path, v2=v2 or None, v_parameterization=v_parameterization or None)
    if found is None:
        return None, why_not
    for line in found.warnings:
        print(f"warning: {line}")
    return found.family, f"from the checkpoint header: {found.reason}"


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
        print(f"validation: {plural(len(held_out), 'held-out image')} (never trained on)")
    per_epoch = plan.steps_per_epoch(1, accum)
    steps = opts.max_train_epochs * per_epoch if opts.max_train_epochs else opts.max_train_steps
    print(f"training: {plural(steps, 'optimizer step')} = {plural(math.ceil(steps / max(1, per_epoch)), 'epoch')} of "
          f"{plural(per_epoch, 'step')} "
          f"(1 process; with N processes each epoch has about 1/N of the steps)")
    if opts.hypernetwork_module:
        for line in opts.hypernetwork_plan(_unet_config(opts.pretrained_model_name_or_path, family or SD1)):
            print(line)
    else:  # the planner models full fine-tuning (--vram is refused with a hypernetwork)
        print_memory(opts, family or SD1, plan)


def _unet_config(model: str | None, family: Family) -> dict:
    """A Diffusers folder's own U-Net config, else the family's (single files have its shapes)."""
    import json
    from pathlib import Path

    own = Path(model or "") / "unet" / "config.json"
    return json.loads((own if own.is_file() else family.asset_dir / "unet" / "config.json").read_text())


def print_memory(opts: TrainOptions, family: Family, plan) -> None:
    """The predicted peak accelerator memory (sdtune.train.memory_plan), and with --vram whether it fits."""
    from sdtune.train import memory_plan
    from sdtune.train.options import TrainOptions as _Options

    shape = memory_plan.shape_from_options(opts, family.assets, plan)
    run = memory_plan.predict_run(shape)
    fused = "fused_backward_pass" in _Options.model_fields
    for line in memory_plan.describe(run, opts.vram, fused_available=fused):
        print(line)
