"""Optimizers, parameter groups and learning-rate schedules.

    groups = build_param_groups(unet, text_encoder if opts.train_text_encoder else None,
                                learning_rate=opts.learning_rate, learning_rate_te=opts.learning_rate_te)
    optimizer = build_optimizer(resolve_optimizer_name(opts.optimizer_type, opts.use_8bit_adam,
                                                       opts.use_lion_optimizer),
                                groups, opts.learning_rate, opts.optimizer_args)
    scheduler = schedules.scheduler_from_options(opts, optimizer, total_steps=max_steps,
                                                 num_processes=accelerator.num_processes)
    ...
    with eval_weights(optimizer):   # schedule-free optimizers: sample and save the averaged weights
        sample(); save()

The optimizer names are sd-scripts' (case-insensitive), so its command lines work unchanged; any
other name is a class path ("torch.optim.RAdam", "mypkg.MyOpt") or a bare `torch.optim` class name.
Optional packages (bitsandbytes, lion-pytorch, prodigyopt, schedulefree, dadaptation) are imported
only when named, and a missing one is a UserError saying what to install.

Learning-rate schedules are in sdtune.train.schedules.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from sdtune.errors import UserError

if TYPE_CHECKING:
    import torch

Note = Callable[[str], None]


@dataclass(frozen=True)
class OptimizerSpec:
    module: str
    cls: str
    package: str | None = None  # pip name when it is not a core dependency
    defaults: dict[str, Any] = field(default_factory=dict)


_BNB = "bitsandbytes"
_DADAPT = "dadaptation"
# sd-scripts' built-in names, lower-cased.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", _BNB),
    "pagedadamw": OptimizerSpec("bitsandbytes.optim", "PagedAdamW", _BNB),
    "pagedadamw8bit": OptimizerSpec("bitsandbytes.optim", "PagedAdamW8bit", _BNB),
    "pagedadamw32bit": OptimizerSpec("bitsandbytes.optim", "PagedAdamW32bit", _BNB),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim", "Lion8bit", _BNB),
    "pagedlion8bit": OptimizerSpec("bitsandbytes.optim", "PagedLion8bit", _BNB),
    "sgdnesterov": OptimizerSpec("torch.optim", "SGD", None, {"nesterov": True, "momentum": 0.9}),
    "sgdnesterov8bit": OptimizerSpec("bitsandbytes.optim", "SGD8bit", _BNB, {"nesterov": True, "momentum": 0.9}),
    "adafactor": OptimizerSpec("transformers.optimization", "Adafactor", None, {"relative_step": True}),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt"),
    "adamwschedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "radamschedulefree": OptimizerSpec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "sgdschedulefree": OptimizerSpec("schedulefree", "SGDScheduleFree", "schedulefree"),
    "dadaptation": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", _DADAPT),
    "dadaptadampreprint": OptimizerSpec("dadaptation.experimental", "DAdaptAdamPreprint", _DADAPT),
    "dadaptadagrad": OptimizerSpec("dadaptation", "DAdaptAdaGrad", _DADAPT),
    "dadaptadam": OptimizerSpec("dadaptation", "DAdaptAdam", _DADAPT),
    "dadaptadan": OptimizerSpec("dadaptation", "DAdaptAdan", _DADAPT),
    "dadaptadanip": OptimizerSpec("dadaptation.experimental", "DAdaptAdanIP", _DADAPT),
    "dadaptlion": OptimizerSpec("dadaptation", "DAdaptLion", _DADAPT),
    "dadaptsgd": OptimizerSpec("dadaptation", "DAdaptSGD", _DADAPT),
}
OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
                   "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "Adafactor", "Prodigy", "AdamWScheduleFree",
                   "RAdamScheduleFree", "SGDScheduleFree", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad",
                   "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD")


DEFAULT_OPTIMIZER = "AdamW"  # --optimizer_type left out (the option declares it by this name)


def resolve_optimizer_name(optimizer_type: str | None, use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> str:
    """--optimizer_type with sd-scripts' legacy switches folded in; None means AdamW."""
    legacy = [flag for flag, on in (("--use_8bit_adam", use_8bit_adam), ("--use_lion_optimizer", use_lion_optimizer)) if on]
    if len(legacy) > 1:
        raise UserError("--use_8bit_adam and --use_lion_optimizer contradict each other", fix="Use --optimizer_type instead.")
    if legacy and optimizer_type:
        raise UserError(f"{legacy[0]} contradicts --optimizer_type {optimizer_type}", where=legacy[0],
                        fix="Keep only --optimizer_type.")
    if use_8bit_adam:
        return "AdamW8bit"
    if use_lion_optimizer:
        return "Lion"
    return optimizer_type or DEFAULT_OPTIMIZER


# ---------------------------------------------------------------- parameter groups


def _trainable(module_or_params: Any) -> list["torch.nn.Parameter"]:
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return [p for p in params if p.requires_grad]


def build_param_groups(unet: Any, text_encoder: Any = None, *, learning_rate: float,
                       learning_rate_te: float | None = None) -> list[dict[str, Any]]:
    """The U-Net's trainable parameters at `learning_rate`; the text encoder's (when trained) at
    `learning_rate_te`, which defaults to the U-Net's. Modules or iterables of parameters."""
    if text_encoder is None and learning_rate_te is not None:
        raise UserError("the text encoder is not trained, so its learning rate would be ignored", where="--learning_rate_te",
                        fix="Add --train_text_encoder, or drop --learning_rate_te.")
    groups = [{"params": _trainable(unet), "lr": learning_rate, "name": "unet"}]
    if text_encoder is not None:
        te_lr = learning_rate if learning_rate_te is None else learning_rate_te
        groups.append({"params": _trainable(text_encoder), "lr": te_lr, "name": "text_encoder"})
    for group in groups:
        if not group["params"]:
            raise UserError(f"the {group['name'].replace('_', ' ')} has no trainable parameters")
    return groups


# ---------------------------------------------------------------- optimizer


_BARE_WORD = re.compile(r"^[A-Za-z_][\w.\-]*$")


def parse_optimizer_args(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings to keyword arguments; values are Python literals (`betas=(0.9,0.99)`,
    `weight_decay=0.01`, `decouple=True`); true/false/none in any case and bare words are accepted."""
    kwargs = parse_key_values(items, "--optimizer_args")
    if "lr" in kwargs:
        raise UserError("the learning rate is not an optimizer argument", where="--optimizer_args",
                        fix="Use --learning_rate (and --learning_rate_te).")
    return kwargs


def parse_key_values(items: Iterable[str], where: str, *, text_fallback: bool = False) -> dict[str, Any]:
    """`key=value` strings (optimizer or scheduler arguments) to keyword arguments. Values are Python
    literals, true/false/none in any case, or bare words; with `text_fallback` any other value is
    kept as text instead of refused."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"expected key=value, got {item!r}", where=where,
                            fix=f"Write e.g. {where} weight_decay=0.01 betas=0.9,0.999")
        if key in kwargs:
            raise UserError(f"{key!r} is given twice", where=where)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            lowered = text.lower()
            if lowered in ("true", "false", "none"):
                value = {"true": True, "false": False, "none": None}[lowered]
            elif _BARE_WORD.match(text) or text_fallback:
                value = text  # a plain string option of a custom class
            else:
                raise UserError(f"{key}={text!r} is not a Python literal", where=where,
                                fix="Use numbers, True/False, tuples like 0.9,0.999, or quoted strings.") from None
        kwargs[key] = value
    return kwargs


def _import_module(module_name: str):
    """bitsandbytes (imported only here, for an 8-bit optimizer) without its import-time chatter
    about optional kernels; any failure of a broken install comes out as an ImportError."""
    if module_name.split(".")[0] != _BNB:
        return importlib.import_module(module_name)
    from sdtune.console import quiet_import

    try:
        with quiet_import():
            return importlib.import_module(module_name)
    except ImportError:
        raise
    except Exception as exc:  # a broken install fails in many ways; the user needs one line
        raise ImportError(f"{type(exc).__name__}: {exc}") from exc


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _import_class(name: str, spec: OptimizerSpec | None) -> type:
    import torch

    if spec is not None:
        module_name, cls_name = spec.module, spec.cls
    elif "." in name:
        module_name, _, cls_name = name.rpartition(".")
    else:
        module_name, cls_name = "torch.optim", name
    try:
        module = _import_module(module_name)
    except ImportError as exc:
        if spec is not None and spec.package and not _installed(spec.package):
            raise UserError(f"{name} needs the {spec.package!r} package, which is not installed", where="--optimizer_type",
                            fix=f"pip install {spec.package}") from None
        if spec is not None and spec.package:
            raise UserError(f"{name} needs the {spec.package!r} package, which is installed but fails to import "
                            f"({_last_line(exc)})", where="--optimizer_type",
                            fix=f"Reinstall it (pip install --force-reinstall {spec.package}), or choose an optimizer "
                                "that does not need it (AdamW).") from None
        raise UserError(f"cannot import {module_name!r} ({_last_line(exc)})", where="--optimizer_type",
                        fix=f"Use one of {', '.join(OPTIMIZER_NAMES)}, or a class path like torch.optim.RAdam.") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        from sdtune.config import suggest

        hint = suggest(name, OPTIMIZER_NAMES) if "." not in name else ""
        raise UserError(f"unknown optimizer {name!r}{hint}", where="--optimizer_type",
                        fix=f"Use one of {', '.join(OPTIMIZER_NAMES)}, or a class path like torch.optim.RAdam.")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{module_name}.{cls_name} is not a torch optimizer class", where="--optimizer_type")
    return cls


def accepted_arguments(func: Any, skip: Iterable[str] = ("self", "params", "lr")) -> str:
    """" X accepts: a, b." for an error message: the keyword arguments of a class or function."""
    target = func.__init__ if isinstance(func, type) else func
    skip = {"self", *skip}
    try:
        names = [n for n, p in inspect.signature(target).parameters.items()
                 if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return ""
    return f" {func.__name__} accepts: {', '.join(names)}." if names else ""


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, optimizer_args: Iterable[str] = (),
                    note: Note | None = print) -> "torch.optim.Optimizer":
    """The optimizer `name` over `param_groups` (from build_param_groups), with `--optimizer_args`.

    Adafactor's default `relative_step=True` makes it compute its own step size: the group learning
    rates are removed (sd-scripts does the same, by rewriting its arguments) and build_lr_scheduler
    then only accepts a constant schedule. Schedule-free optimizers are returned in train mode.
    """
    key = name.lower()
    spec = OPTIMIZERS.get(key)
    cls = _import_class(name, spec)
    kwargs = dict(spec.defaults) if spec else {}
    kwargs.update(parse_optimizer_args(optimizer_args))
    groups = [dict(g) for g in param_groups]
    group_lrs = {g.get("lr", lr) for g in groups}
    relative_step = False
    opt_lr: float | None = lr

    if key == "adafactor":
        if kwargs.get("warmup_init") and not kwargs.get("relative_step"):
            raise UserError("warmup_init=True needs relative_step=True", where="--optimizer_args",
                            fix="Drop warmup_init, or set relative_step=True.")
        relative_step = bool(kwargs.get("relative_step"))
        if relative_step:
            if len(group_lrs) > 1:
                raise UserError("Adafactor with relative_step=True sets its own step size, so --learning_rate_te "
                                "would be ignored", where="--learning_rate_te",
                                fix="Drop --learning_rate_te, or pass --optimizer_args relative_step=False "
                                    "scale_parameter=False warmup_init=False.")
            for g in groups:
                g.pop("lr", None)
            opt_lr = None
            if note:
                note(f"Adafactor with relative_step=True computes its own learning rate; --learning_rate {lr:g} is "
                     "not used (pass --optimizer_args relative_step=False scale_parameter=False to use it)")
    if (key.startswith("dadapt") or key == "prodigy") and note:
        if lr <= 0.1:
            note(f"{name} adapts the step size d and multiplies it by the learning rate; --learning_rate {lr:g} is "
                 "unusually low for it (1.0 is the usual value)")
        if len(group_lrs) > 1:
            note(f"{name}: the text encoder's learning rate multiplies the same adapted step size d")

    try:
        optimizer = cls(groups, lr=opt_lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"{cls.__name__} rejected the arguments ({exc}).{accepted_arguments(cls)}", where="--optimizer_args") from None
    except ValueError as exc:
        raise UserError(f"{cls.__name__} rejected the arguments ({exc})", where="--optimizer_args") from None
    if relative_step:
        optimizer.sdtune_initial_lr = lr  # only for the schedule's first logged value
    optimizer_train_mode(optimizer)
    return optimizer


def is_relative_step_adafactor(optimizer: Any) -> bool:
    inner = _unwrap(optimizer)
    return type(inner).__name__ == "Adafactor" and bool(inner.defaults.get("relative_step"))


# ---------------------------------------------------------------- schedule-free: train / eval weights


def _unwrap(optimizer: Any) -> Any:
    """The optimizer under accelerate's (or DeepSpeed's) wrappers."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """Optimizers that keep two sets of weights and switch with .train()/.eval() (schedulefree)."""
    inner = _unwrap(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def optimizer_train_mode(optimizer: Any) -> None:
    """Parameters back to the training point (call after sampling/saving); a no-op for other optimizers."""
    if is_schedule_free(optimizer):
        _unwrap(optimizer).train()


def optimizer_eval_mode(optimizer: Any) -> None:
    """Parameters to the averaged weights schedule-free methods evaluate and save; a no-op for others."""
    if is_schedule_free(optimizer):
        _unwrap(optimizer).eval()


@contextlib.contextmanager
def eval_weights(optimizer: Any) -> Iterator[None]:
    """Sample and save inside this block: schedule-free optimizers show their averaged weights there."""
    optimizer_eval_mode(optimizer)
    try:
        yield
    finally:
        optimizer_train_mode(optimizer)


# ---------------------------------------------------------------- bf16 weights: stochastic rounding


def round_stochastic_bf16(x: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
    """float32 -> bfloat16, rounding up with probability equal to the dropped fraction (unbiased).

    bf16 keeps the top 16 bits of a float32; adding uniform noise to the low 16 bits before
    truncating them rounds each value up exactly as often as its distance from the lower neighbour
    says. Plain round-to-nearest loses every update below half a bf16 step (0.2 % of the weight),
    which at fine-tuning learning rates is most of them.
    """
    import torch

    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


# Optimizers whose step updates each parameter from its own gradient and state alone, so stepping
# them a chunk of parameters at a time gives the same result as one step over all of them. The
# others (Prodigy and D-Adaptation estimate one step size over all parameters, the schedule-free
# ones count steps per group) are stepped whole.
SEPARABLE_OPTIMIZERS = frozenset({
    "AdamW", "Adam", "SGD", "RAdam", "NAdam", "Adamax", "Adagrad", "RMSprop", "Adadelta", "Rprop",
    "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit", "SGD8bit",
    "Lion", "Adafactor",
})
# Elements stepped together in float32: small parameters are batched up to this many (fewer Python
# calls), a larger parameter is stepped alone. The float32 transient is ~16 bytes per element of a chunk.
BF16_CHUNK_ELEMENTS = 1 << 22


def _chunks(opt: Any, limit: int) -> Iterator[tuple[int, list[Any]]]:
    """(group index, parameters) in the optimizer's own order, each chunk at most `limit` elements
    unless one parameter is larger."""
    for gi, group in enumerate(opt.param_groups):
        chunk: list[Any] = []
        size = 0
        for p in group["params"]:
            if p.grad is None:
                continue
            if chunk and size + p.numel() > limit:
                yield gi, chunk
                chunk, size = [], 0
            chunk.append(p)
            size += p.numel()
        if chunk:
            yield gi, chunk


def add_bf16_stochastic_rounding(optimizer: "torch.optim.Optimizer", generator: "torch.Generator",
                                 chunk_elements: int = BF16_CHUNK_ELEMENTS) -> bool:
    """Make any optimizer over bfloat16 parameters step in float32 and round back stochastically.

    The parameters, gradients and bf16 state tensors of one chunk of parameters at a time become
    float32, are stepped, and are rounded back before the next chunk, so the float32 transient is
    one chunk's (the largest parameter's, for an SD U-Net ~0.5 GB), never the model's 16 bytes per
    weight, and there is no persistent master copy. Works for every optimizer sdtune builds,
    bitsandbytes' 8-bit ones included; optimizers whose step couples parameters (not in
    SEPARABLE_OPTIMIZERS) are upcast and stepped whole. Returns whether the step is chunked.
    `generator` must draw the same numbers on every process, so that data-parallel replicas stay
    identical; the draws are in parameter order either way.
    """
    import types

    inner = _unwrap(optimizer)
    if type(inner).__name__ not in SEPARABLE_OPTIMIZERS:
        _round_whole_step(inner, generator)
        return False
    cls_step = type(inner).step

    def step(self, closure=None):
        if closure is not None:
            raise UserError("a closure would be evaluated once per chunk of parameters under --full_bf16")
        if getattr(self, "initialized", True) is False:  # bitsandbytes: its one-off set-up sees every parameter
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        groups = [g["params"] for g in self.param_groups]
        try:
            for gi, chunk in list(_chunks(self, chunk_elements)):
                for g in self.param_groups:
                    g["params"] = []
                self.param_groups[gi]["params"] = chunk
                upcast = [p for p in chunk if _to_float32(self, p)]
                cls_step(self)
                for p in upcast:
                    _round_back(self, p, generator)
        finally:
            for g, params in zip(self.param_groups, groups):
                g["params"] = params
        return None

    inner.step = types.MethodType(step, inner)
    return True


def _to_float32(opt: Any, p: "torch.Tensor") -> bool:
    import torch

    if p.dtype != torch.bfloat16 or p.grad is None:
        return False
    grad = p.grad.float()
    p.grad = None  # the bf16 gradient is freed before the float32 weight is made
    p.data = p.data.float()
    p.grad = grad
    state = opt.state.get(p, {})
    for key, value in state.items():
        if torch.is_tensor(value) and value.dtype == torch.bfloat16:
            state[key] = value.float()
    return True


def _round_back(opt: Any, p: "torch.Tensor", generator: "torch.Generator") -> None:
    import torch

    p.grad = None  # the loop zeroes gradients right after the step anyway
    p.data = round_stochastic_bf16(p.data, generator)
    state = opt.state.get(p, {})
    for key, value in state.items():
        # moments shaped like the weight go back to bf16 (else the state would double the memory)
        if torch.is_tensor(value) and value.dtype == torch.float32 and value.shape == p.shape:
            state[key] = round_stochastic_bf16(value, generator)


def _round_whole_step(inner: Any, generator: "torch.Generator") -> None:
    """Every parameter upcast before the step and rounded after it (a transient of the whole model)."""
    upcast: list[Any] = []

    def before(opt, args, kwargs):
        upcast.clear()
        for group in opt.param_groups:
            for p in group["params"]:
                if _to_float32(opt, p):
                    upcast.append(p)

    def after(opt, args, kwargs):
        for p in upcast:
            _round_back(opt, p, generator)
        upcast.clear()

    inner.register_step_pre_hook(before)
    inner.register_step_post_hook(after)
