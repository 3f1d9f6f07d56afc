"""Learning-rate schedules: sd-scripts' `--lr_scheduler` names, `--lr_scheduler_type` classes.

    scheduler = scheduler_from_options(opts, optimizer, total_steps=max_steps, num_processes=world)
    unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)

Every schedule counts optimizer steps. accelerate advances a prepared scheduler once per process
for each optimizer step, so the step counts handed to the named schedules (warm-up, total, decay,
timescale, the boundaries of piecewise_constant) are multiplied by the number of processes, and a
`--lr_scheduler_type` class is wrapped so that it advances once per optimizer step. sd-scripts
forgets this for integer warm-ups and for custom classes: on N GPUs their curves run
N times faster.

The functions are the libraries': diffusers for the schedules it has (constant ... polynomial,
piecewise_constant), transformers for the ones only it has (inverse_sqrt, cosine_with_min_lr,
warmup_stable_decay), with the arguments sd-scripts' `get_scheduler_fix` gives them.
Which flag acts with which schedule is checked once on the options (no torch needed), so a flag
that would be ignored is refused before anything loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sdtune.errors import UserError

if TYPE_CHECKING:
    import torch

Note = Callable[[str], None]

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")

# what --lr_scheduler_num_cycles and --lr_scheduler_power left out mean (the options declare them by these names)
DEFAULT_NUM_CYCLES = 1
DEFAULT_POWER = 1.0
_DIFFUSERS = "diffusers.optimization"
_TRANSFORMERS = "transformers.optimization"
FUNCTIONS = {
    "constant": (_DIFFUSERS, "get_constant_schedule"),
    "constant_with_warmup": (_DIFFUSERS, "get_constant_schedule_with_warmup"),
    "linear": (_DIFFUSERS, "get_linear_schedule_with_warmup"),
    "cosine": (_DIFFUSERS, "get_cosine_schedule_with_warmup"),
    "cosine_with_restarts": (_DIFFUSERS, "get_cosine_with_hard_restarts_schedule_with_warmup"),
    "polynomial": (_DIFFUSERS, "get_polynomial_decay_schedule_with_warmup"),
    "piecewise_constant": (_DIFFUSERS, "get_piecewise_constant_schedule"),
    "inverse_sqrt": (_TRANSFORMERS, "get_inverse_sqrt_schedule"),
    "cosine_with_min_lr": (_TRANSFORMERS, "get_cosine_with_min_lr_schedule_with_warmup"),
    "warmup_stable_decay": (_TRANSFORMERS, "get_wsd_schedule"),
}

# flag -> the schedules it acts with
ONLY_WITH = {
    "lr_scheduler_num_cycles": ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay"),
    "lr_scheduler_power": ("polynomial",),
    "lr_decay_steps": ("warmup_stable_decay",),
    "lr_scheduler_timescale": ("inverse_sqrt",),
    "lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay"),
}
NO_WARMUP = ("constant", "piecewise_constant", "adafactor")

# arguments sdtune passes to the schedule functions, and the flag that sets each
_FROM_FLAG = {"num_warmup_steps": "--lr_warmup_steps", "num_training_steps": "--max_train_steps",
              "num_cycles": "--lr_scheduler_num_cycles", "power": "--lr_scheduler_power",
              "timescale": "--lr_scheduler_timescale", "min_lr_rate": "--lr_scheduler_min_lr_ratio",
              "min_lr_ratio": "--lr_scheduler_min_lr_ratio", "num_decay_steps": "--lr_decay_steps",
              "num_stable_steps": "--max_train_steps, --lr_warmup_steps and --lr_decay_steps"}
_WARMUP_TOTAL = ("num_warmup_steps", "num_training_steps")
PASSED = {
    "constant": (), "piecewise_constant": (), "adafactor": (), "constant_with_warmup": ("num_warmup_steps",),
    "linear": _WARMUP_TOTAL, "cosine": _WARMUP_TOTAL, "cosine_with_restarts": (*_WARMUP_TOTAL, "num_cycles"),
    "polynomial": (*_WARMUP_TOTAL, "power"), "inverse_sqrt": ("num_warmup_steps", "timescale"),
    "cosine_with_min_lr": (*_WARMUP_TOTAL, "num_cycles", "min_lr_rate"),
    "warmup_stable_decay": ("num_warmup_steps", "num_stable_steps", "num_decay_steps", "num_cycles", "min_lr_ratio"),
}


def parse_scheduler_args(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings; values are Python literals, and anything else is kept as text
    (`step_rules=1:100,0.5:200,0.1` needs no quotes)."""
    from sdtune.train.optim import parse_key_values

    return parse_key_values(items, "--lr_scheduler_args", text_fallback=True)


def check_schedule_options(opts: Any) -> None:
    """Refuse a scheduler flag that would do nothing with the chosen schedule (no torch needed)."""
    name = opts.lr_scheduler
    given = {flag: getattr(opts, flag) for flag in ONLY_WITH if getattr(opts, flag) is not None}
    args = parse_scheduler_args(opts.lr_scheduler_args)
    warmup = _given(opts.lr_warmup_steps)
    if opts.lr_scheduler_type:
        others = ([f"--lr_scheduler {name}"] if name != "constant" else []) + [f"--{f}" for f in given]
        others += ["--lr_warmup_steps"] if warmup else []
        if others:
            raise UserError(f"{others[0]} would be ignored: --lr_scheduler_type {opts.lr_scheduler_type} builds the class "
                            "from --lr_scheduler_args alone", where=others[0].split()[0],
                            fix="Drop it, or pass the value to the class with --lr_scheduler_args key=value.")
        _check_args(None, args, min_lr_ratio=None)
        return
    for flag in given:
        if name not in ONLY_WITH[flag]:
            raise UserError(f"only acts with --lr_scheduler {' / '.join(ONLY_WITH[flag])}, not {name}", where=f"--{flag}")
    if warmup and name in NO_WARMUP:
        fix = ("Use --lr_scheduler constant_with_warmup, or drop --lr_warmup_steps." if name == "constant"
               else "Drop --lr_warmup_steps.")
        raise UserError(f"--lr_scheduler {name} has no warm-up", where="--lr_warmup_steps", fix=fix)
    _check_args(name, args, min_lr_ratio=opts.lr_scheduler_min_lr_ratio)


def _given(steps: float | int | str | None) -> bool:
    """A warm-up other than none (0, "0.0", "0%")."""
    if isinstance(steps, str):
        try:
            return float(steps.strip().removesuffix("%")) != 0
        except ValueError:
            return True  # reported by resolve_steps with the schedule
    return bool(steps)


def _check_args(name: str | None, args: dict[str, Any], *, min_lr_ratio: float | None) -> None:
    for key in args:
        if key in ("optimizer", "last_epoch"):
            raise UserError(f"{key!r} is set by sdtune", where="--lr_scheduler_args", fix="Drop it.")
        if name and key in PASSED[name]:
            raise UserError(f"{key!r} is set by sdtune for --lr_scheduler {name}", where="--lr_scheduler_args",
                            fix=f"Use {_FROM_FLAG[key]} instead.")
    if name == "cosine_with_min_lr" and min_lr_ratio is None and "min_lr" not in args:
        raise UserError("cosine_with_min_lr needs the lowest learning rate", where="--lr_scheduler",
                        fix="Add --lr_scheduler_min_lr_ratio, e.g. 0.1 (or --lr_scheduler_args min_lr=1e-7).")
    if name == "cosine_with_min_lr" and min_lr_ratio is not None and "min_lr" in args:
        raise UserError("min_lr and --lr_scheduler_min_lr_ratio both set the lowest learning rate",
                        where="--lr_scheduler_args", fix="Keep one of them.")
    if name == "piecewise_constant":
        if "step_rules" not in args:
            raise UserError("piecewise_constant needs its rules", where="--lr_scheduler",
                            fix="Add --lr_scheduler_args step_rules=1:100,0.5:200,0.1 (factor 1 until step 100, "
                                "0.5 until step 200, then 0.1).")
        scale_step_rules(args["step_rules"], 1)  # a malformed rule is reported now, not after loading
    if name == "adafactor" and args:
        raise UserError("Adafactor's own schedule takes no arguments", where="--lr_scheduler_args")


def resolve_steps(value: float | int | str | None, total_steps: int, where: str) -> int:
    """A step count, a fraction < 1 of `total_steps`, or "N%" (sd-scripts' int_or_float) -> steps."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise UserError(f"{text!r} is not a number or percentage", where=where) from None
    if value < 0:
        raise UserError(f"must be >= 0, got {value:g}", where=where)
    if value < 1:
        return int(value * total_steps)
    if value != int(value):
        raise UserError(f"{value:g} is neither a step count nor a fraction below 1", where=where,
                        fix="Give a whole number of steps, or a fraction like 0.05.")
    steps = int(value)
    if steps > total_steps:
        raise UserError(f"{steps} steps exceed the {total_steps} training steps", where=where,
                        fix="Lower it, or give a fraction like 0.05.")
    return steps


def resolve_warmup(warmup: float | int | str | None, total_steps: int) -> int:
    """Warm-up in optimizer steps: a count, a fraction < 1 of `total_steps`, or "N%" (as sd-scripts)."""
    return resolve_steps(warmup, total_steps, "--lr_warmup_steps")


def scheduler_from_options(opts: Any, optimizer: "torch.optim.Optimizer", *, total_steps: int, num_processes: int = 1,
                           note: Note | None = print):
    """The schedule the options ask for, over `total_steps` optimizer steps on `num_processes` processes."""
    return build_lr_scheduler(opts.lr_scheduler, optimizer, warmup=opts.lr_warmup_steps, total_steps=total_steps,
                              num_processes=num_processes, num_cycles=opts.lr_scheduler_num_cycles,
                              power=opts.lr_scheduler_power, decay=opts.lr_decay_steps,
                              timescale=opts.lr_scheduler_timescale, min_lr_ratio=opts.lr_scheduler_min_lr_ratio,
                              scheduler_type=opts.lr_scheduler_type, scheduler_args=opts.lr_scheduler_args, note=note)


def build_lr_scheduler(name: str, optimizer: "torch.optim.Optimizer", *, warmup: float | int | str | None = 0,
                       total_steps: int, num_processes: int = 1, num_cycles: int | None = None,
                       power: float | None = None, decay: float | int | str | None = None, timescale: int | None = None,
                       min_lr_ratio: float | None = None, scheduler_type: str | None = None,
                       scheduler_args: Iterable[str] = (), note: Note | None = print):
    """The schedule `name` (or the class `scheduler_type`) in optimizer steps; pass it to
    `accelerator.prepare` with the optimizer. `num_processes` must be the accelerate world size."""
    from sdtune.train.optim import _unwrap, is_relative_step_adafactor, is_schedule_free

    if total_steps < 1 or num_processes < 1:
        raise ValueError("total_steps and num_processes must be >= 1")
    if name not in LR_SCHEDULERS:
        raise UserError(f"unknown schedule {name!r}", where="--lr_scheduler", fix=f"Use one of {', '.join(LR_SCHEDULERS)}.")
    args = parse_scheduler_args(scheduler_args)
    check_schedule_options(_Flags(name, warmup, num_cycles, power, decay, timescale, min_lr_ratio, scheduler_type,
                                  list(scheduler_args)))
    warmup_steps = resolve_warmup(warmup, total_steps)
    decay_steps = resolve_steps(decay, total_steps, "--lr_decay_steps")
    if warmup_steps + decay_steps > total_steps:
        raise UserError(f"{warmup_steps} warm-up and {decay_steps} decay steps exceed the {total_steps} training steps",
                        where="--lr_decay_steps", fix="Lower --lr_decay_steps or --lr_warmup_steps.")
    inner = _unwrap(optimizer)

    if is_relative_step_adafactor(optimizer):
        if name not in ("constant", "adafactor") or warmup_steps or scheduler_type:
            what = f"--lr_scheduler_type {scheduler_type}" if scheduler_type else f"--lr_scheduler {name}"
            raise UserError(f"Adafactor with relative_step=True computes its own learning rate, so {what} "
                            "and --lr_warmup_steps would be ignored", where="--lr_scheduler",
                            fix="Use --lr_scheduler constant (or adafactor), or pass --optimizer_args "
                                "relative_step=False scale_parameter=False warmup_init=False.")
        from transformers.optimization import AdafactorSchedule

        # a proxy that reports Adafactor's own step size for logging; stepping it changes nothing
        return AdafactorSchedule(inner, getattr(inner, "sdtune_initial_lr", 0.0))
    if name == "adafactor" and not scheduler_type:
        raise UserError("--lr_scheduler adafactor is Adafactor's own step size and needs --optimizer_type Adafactor "
                        "(with relative_step=True, its default)", where="--lr_scheduler",
                        fix="Use another --lr_scheduler, or --optimizer_type Adafactor.")

    if is_schedule_free(optimizer) and (name != "constant" or warmup_steps or scheduler_type) and note:
        note(f"schedule-free optimizers are designed for a constant learning rate; --lr_scheduler {name} still "
             "scales it (their own warm-up is --optimizer_args warmup_steps=N)")

    if scheduler_type:
        from sdtune.train.custom_schedule import build_custom_scheduler

        if note:
            note(f"learning-rate schedule: {scheduler_type}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
        return build_custom_scheduler(scheduler_type, inner, args, num_processes)

    kwargs = _schedule_kwargs(name, args, warmup_steps, decay_steps, total_steps, num_processes, num_cycles, power,
                              timescale, min_lr_ratio, note)
    module, function = FUNCTIONS[name]
    func = getattr(importlib.import_module(module), function)
    try:
        return func(inner, **kwargs, **args)
    except TypeError as exc:
        from sdtune.train.optim import accepted_arguments

        accepted = accepted_arguments(func, skip={*kwargs, "optimizer", "last_epoch"})
        raise UserError(f"the {name} schedule rejected the arguments ({exc}).{accepted}", where="--lr_scheduler_args") from None
    except ValueError as exc:  # e.g. polynomial decay with a learning rate below its end value 1e-7
        raise UserError(f"cannot build the {name} schedule ({exc})", where="--lr_scheduler") from None


def _schedule_kwargs(name: str, args: dict[str, Any], warmup_steps: int, decay_steps: int, total_steps: int, n: int,
                     num_cycles: int | None, power: float | None, timescale: int | None, min_lr_ratio: float | None,
                     note: Note | None) -> dict[str, Any]:
    """The keyword arguments of schedule `name`'s transformers function, in scheduler steps: accelerate
    steps a prepared schedule once per process per optimizer step, hence every count times `n`.
    piecewise_constant's step rules in `args` are scaled in place."""
    kwargs: dict[str, Any] = {}
    if name != "constant" and name != "piecewise_constant":
        kwargs["num_warmup_steps"] = warmup_steps * n
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr"):
        kwargs["num_training_steps"] = total_steps * n
    cycles = int(DEFAULT_NUM_CYCLES if num_cycles is None else num_cycles)
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = cycles
    elif name in ("cosine_with_min_lr", "warmup_stable_decay"):
        kwargs["num_cycles"] = cycles / 2  # sd-scripts' meaning: half-waves, 1 = down once
    if name == "polynomial":
        kwargs["power"] = float(DEFAULT_POWER if power is None else power)
    if name == "inverse_sqrt":
        # transformers' default timescale (the warm-up, else 10000), taken in optimizer steps
        kwargs["timescale"] = (timescale or warmup_steps or 10_000) * n
    if name == "cosine_with_min_lr" and min_lr_ratio is not None:
        kwargs["min_lr_rate"] = float(min_lr_ratio)
    if name == "warmup_stable_decay":
        kwargs.update(num_stable_steps=(total_steps - warmup_steps - decay_steps) * n, num_decay_steps=decay_steps * n,
                      min_lr_ratio=0.0 if min_lr_ratio is None else float(min_lr_ratio))
        if not decay_steps and note:
            note("warmup_stable_decay without --lr_decay_steps holds the learning rate to the end (no decay)")
    if name == "piecewise_constant":
        args["step_rules"] = scale_step_rules(args["step_rules"], n)
    return kwargs


def scale_step_rules(rules: Any, factor: int) -> str:
    """piecewise_constant's "f1:s1,f2:s2,...,f_last", with every step boundary multiplied by `factor`."""
    where, fix = "--lr_scheduler_args", "Write e.g. step_rules=1:100,0.5:200,0.1 (factor:until_step, ..., last factor)."
    parts = str(rules).split(",")
    out = []
    try:
        for part in parts[:-1]:
            value, steps = part.split(":")
            if int(steps) < 0:
                raise ValueError
            out.append(f"{float(value)!r}:{int(steps) * factor}")
        out.append(repr(float(parts[-1])))
    except ValueError:
        raise UserError(f"step_rules={rules!r} is not a list of factor:step pairs ending with a factor", where=where,
                        fix=fix) from None
    return ",".join(out)


class _Flags:
    """The schedule flags as check_schedule_options reads them from the options."""

    def __init__(self, name, warmup, num_cycles, power, decay, timescale, min_lr_ratio, scheduler_type, scheduler_args):
        self.lr_scheduler, self.lr_warmup_steps = name, warmup
        self.lr_scheduler_num_cycles, self.lr_scheduler_power, self.lr_decay_steps = num_cycles, power, decay
        self.lr_scheduler_timescale, self.lr_scheduler_min_lr_ratio = timescale, min_lr_ratio
        self.lr_scheduler_type, self.lr_scheduler_args = scheduler_type, scheduler_args
