"""What a hypernetwork is, as data: its structure and the metadata its file carries (no torch here).

A hypernetwork holds, for each context width it is enabled for, two small residual MLPs: one
transforms the attention context before the key projection, the other before the value projection.
The structure of those MLPs is AUTOMATIC1111's web UI's (its "Create hypernetwork" options); NovelAI's
original hypernetworks, and those sd-scripts once trained, are its default, `1, 2, 1` with no
activation. `Structure` holds it; `layer_plan` lists the layers of one MLP in the web UI's order,
which fixes the `linear.N` key numbers of the file, so the option checks and `--dry_run` can count
parameters without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sdtune.errors import UserError

# The web UI's activation names. Its own list ("swish" is torch's Hardswish, not SiLU), then every
# torch.nn activation class, lower-cased, that keeps the width and needs no constructor argument.
# ComfyUI loads only BOTH_LOADERS; the others make files that only the web UI (and sdtune) load.
BOTH_LOADERS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
ACTIVATION_CLASSES = {
    "relu": "ReLU", "leakyrelu": "LeakyReLU", "elu": "ELU", "swish": "Hardswish", "tanh": "Tanh",
    "sigmoid": "Sigmoid", "softsign": "Softsign", "mish": "Mish",
    "celu": "CELU", "gelu": "GELU", "hardshrink": "Hardshrink", "hardsigmoid": "Hardsigmoid",
    "hardswish": "Hardswish", "hardtanh": "Hardtanh", "logsigmoid": "LogSigmoid", "relu6": "ReLU6",
    "rrelu": "RReLU", "selu": "SELU", "silu": "SiLU", "softplus": "Softplus", "softshrink": "Softshrink",
    "tanhshrink": "Tanhshrink",
}
ACTIVATIONS = ("linear", *ACTIVATION_CLASSES)
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
NAI_MODULE_NAMES = ("hypernetwork_nai", "finetune.hypernetwork_nai")

# The top-level metadata keys, in the order the web UI writes them; a file always gets all of them,
# because the web UI and ComfyUI default a missing `activate_output` differently.
METADATA_KEYS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                 "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                 "last_layer_dropout", "optional_info")


@dataclass(frozen=True)
class Structure:
    """The shape of every K/V module of one hypernetwork (the web UI's creation options)."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str = "linear"
    is_layer_norm: bool = False
    dropout_structure: tuple[float, ...] | None = None  # None: no dropout (all zeros)
    activate_output: bool = False  # the web UI's creation default; its loader assumes True when missing
    weight_initialization: str = "Normal"

    def __post_init__(self):
        ls = tuple(self.layer_structure)
        object.__setattr__(self, "layer_structure", ls)
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
            raise ValueError(f"the layer structure {_text(ls)} must start and end with 1 (e.g. 1, 2, 1)")
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or x <= 0 for x in ls):
            raise ValueError(f"the layer structure {_text(ls)} must hold positive numbers")
        if self.activation_func not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation_func!r} (known: {', '.join(ACTIVATIONS)})")
        if self.weight_initialization not in WEIGHT_INITS:
            raise ValueError(f"unknown weight initialisation {self.weight_initialization!r} "
                             f"(known: {', '.join(WEIGHT_INITS)})")
        if self.dropout_structure is not None:
            ds = tuple(self.dropout_structure)
            object.__setattr__(self, "dropout_structure", ds)
            if len(ds) != len(ls):
                raise ValueError(f"the dropout structure {_text(ds)} needs one entry per layer structure entry "
                                 f"({len(ls)})")
            if any(not isinstance(p, (int, float)) or isinstance(p, bool) or not (p == 0 or 0 < p < 1) for p in ds):
                raise ValueError(f"the dropout structure {_text(ds)} must hold 0 or probabilities between 0 and 1")
            if not any(ds):  # all zeros is no dropout: one form, so equal structures compare equal
                object.__setattr__(self, "dropout_structure", None)

    @property
    def dropouts(self) -> tuple[float, ...]:
        return self.dropout_structure if self.dropout_structure is not None else (0,) * len(self.layer_structure)

    @property
    def use_dropout(self) -> bool:
        return any(p > 0 for p in self.dropouts)

    def layer_plan(self, width: int) -> list[tuple[str, tuple]]:
        """The layers of one module of this width, in order: ("linear", (in, out)), ("activation",
        (name,)), ("layer_norm", (size,)), ("dropout", (p,)). The position in this list is the N of
        the file's `linear.N.*` keys."""
        ls, plan = self.layer_structure, []
        for i in range(len(ls) - 1):
            size_in, size_out = int(width * ls[i]), int(width * ls[i + 1])
            plan.append(("linear", (size_in, size_out)))
            last = i == len(ls) - 2
            if self.activation_func != "linear" and not (last and not self.activate_output):
                plan.append(("activation", (self.activation_func,)))
            if self.is_layer_norm:
                plan.append(("layer_norm", (size_out,)))
            if self.dropouts[i + 1] > 0:
                plan.append(("dropout", (self.dropouts[i + 1],)))
        return plan

    def parameter_count(self, width: int) -> int:
        """Parameters of one module (a K/V pair has twice as many)."""
        count = 0
        for kind, args in self.layer_plan(width):
            if kind == "linear":
                count += args[0] * args[1] + args[1]
            elif kind == "layer_norm":
                count += 2 * args[0]
        return count

    def key_shapes(self, width: int) -> dict[str, tuple[int, ...]]:
        """The state dict of one module: key -> shape, in module order (weight before bias)."""
        shapes = {}
        for n, (kind, args) in enumerate(self.layer_plan(width)):
            if kind == "linear":
                shapes[f"linear.{n}.weight"] = (args[1], args[0])
                shapes[f"linear.{n}.bias"] = (args[1],)
            elif kind == "layer_norm":
                shapes[f"linear.{n}.weight"] = (args[0],)
                shapes[f"linear.{n}.bias"] = (args[0],)
        return shapes

    def describe(self) -> str:
        parts = [_text(self.layer_structure), self.activation_func]
        if self.activation_func != "linear":
            parts.append("output activated" if self.activate_output else "linear output")
        if self.is_layer_norm:
            parts.append("layer norm")
        if self.use_dropout:
            parts.append(f"dropout {_text(self.dropouts)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class FileInfo:
    """The metadata of a hypernetwork file besides its structure (kept so that a loaded file is
    written back as it was)."""

    name: str = ""
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    extra: dict = field(default_factory=dict)  # other plain-typed top-level keys of a file, written back

    def replace(self, **changes) -> FileInfo:
        return dataclasses.replace(self, **changes)


def parse_numbers(value, what: str) -> tuple[float, ...]:
    """The web UI's text form "1, 2, 1" (or a list of numbers / of such texts) as numbers; integral
    entries stay ints, so "1, 2, 1" is written as the web UI's default [1, 2, 1]."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[float] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{what}: {item!r} is not a number")
        if isinstance(item, (int, float)):
            out.append(item)
            continue
        for piece in str(item).replace(",", " ").split():
            try:
                number = float(piece)
            except ValueError:
                raise ValueError(f"{what}: {piece!r} is not a number (write e.g. 1,2,1)") from None
            out.append(int(number) if number.is_integer() else number)
    return tuple(out)


def default_widths(attention_widths: set[int] | list[int]) -> tuple[int, ...]:
    """The widths a new hypernetwork gets: every context width of the U-Net's attention layers (SD1:
    320, 640, 768, 1280; SD2: 320, 640, 1024, 1280), ascending."""
    return tuple(sorted(set(attention_widths)))


def check_widths(widths, where: str) -> tuple[int, ...]:
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise UserError(f"{w!r} is not a width (a positive whole number such as 768)", where=where)
        if w in out:
            raise UserError(f"width {w} is given twice", where=where)
        out.append(w)
    if not out:
        raise UserError("no width given", where=where, fix="Give the context widths, e.g. 320 640 768 1280.")
    return tuple(out)


def _text(numbers) -> str:
    return ", ".join(str(x) for x in numbers)


def attention_widths_from_config(config: dict) -> set[int]:
    """The context widths of a diffusers U-Net's attention layers, from its config alone (for
    `--dry_run`, which loads no model): the channels of the blocks with attention (self-attention)
    and `cross_attention_dim` (cross-attention)."""
    channels = list(config["block_out_channels"])
    widths = {c for c, kind in zip(channels, config["down_block_types"]) if "CrossAttn" in kind}
    widths |= {c for c, kind in zip(reversed(channels), config["up_block_types"]) if "CrossAttn" in kind}
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        widths.add(channels[-1])
    return widths | {int(config["cross_attention_dim"])}


def resolve_widths(enable_sizes, model_widths) -> tuple[int, ...]:
    """The widths of a new hypernetwork: `--hypernetwork_enable_sizes` in the order given, else the
    model's attention widths."""
    return tuple(enable_sizes) if enable_sizes else default_widths(model_widths)


def plan_lines(structure: Structure, widths, model_widths) -> list[str]:
    """What `--dry_run` says about a hypernetwork: structure, widths, size; and widths that would never act."""
    count = sum(2 * structure.parameter_count(w) for w in widths)
    mib = count * 4 / 2**20
    lines = [f"hypernetwork: {structure.describe()}; K/V pairs for widths {_text(widths)}; {count:,} parameters, "
             f"{mib:.1f} MiB in float32 (about {4 * mib:.0f} MiB while training with AdamW: weights, gradients "
             "and two moments); the U-Net and text encoder stay frozen"]
    unused = [w for w in widths if w not in set(model_widths)]
    if unused:
        what = "that module pair is saved but never acts" if len(unused) == 1 else \
            "those module pairs are saved but never act"
        lines.append(f"note: no attention layer of this model has context width {_text(unused)}: {what} "
                     f"(the model's widths: {_text(sorted(set(model_widths)))})")
    return lines
