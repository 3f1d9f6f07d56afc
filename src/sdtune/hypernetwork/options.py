"""The hypernetwork options of `sdtune train` / `fine_tune.py` (no torch here).

`--hypernetwork_module` is sd-scripts' historical switch from fine-tuning to hypernetwork training
(its value named the Python module holding the architecture; `hypernetwork_nai` and
`finetune.hypernetwork_nai` name the built-in NovelAI one, the only one sdtune builds).
`--hypernetwork_weights` continues from an existing file. The structure flags carry the names of the
web UI's "Create hypernetwork" options and only shape a new hypernetwork: a loaded file brings its own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from sdtune.config import Field, Options
from sdtune.errors import UserError
from sdtune.hypernetwork.spec import (ACTIVATIONS, NAI_MODULE_NAMES, WEIGHT_INITS, Structure,
                                     attention_widths_from_config, check_widths, parse_numbers, plan_lines,
                                     resolve_widths)

_GROUP = "Hypernetwork"
# the options that shape a new hypernetwork (a loaded file brings its own structure)
STRUCTURE_OPTIONS = ("hypernetwork_enable_sizes", "hypernetwork_layer_structure", "hypernetwork_activation_func",
                     "hypernetwork_weight_init", "hypernetwork_add_layer_norm", "hypernetwork_dropout_structure",
                     "hypernetwork_activate_output")


class HypernetworkOptions(Options):
    hypernetwork_module: str | None = Field(
        None, "train a hypernetwork instead of fine-tuning: hypernetwork_nai (or finetune.hypernetwork_nai), "
        "NovelAI's architecture in the web UI's configurable form", group=_GROUP, metavar="NAME")
    hypernetwork_weights: str | None = Field(
        None, "continue training this hypernetwork file (.pt from the web UI, sd-scripts or sdtune); its structure "
        "comes from the file", group=_GROUP, metavar="FILE")
    hypernetwork_enable_sizes: list[int] | None = Field(
        None, "context widths that get a K/V module pair (the web UI's 'Modules')", group=_GROUP,
        implied="every attention width of the model: 320 640 768 1280 (SD1), 320 640 1024 1280 (SD2)", metavar="WIDTH")
    hypernetwork_layer_structure: list[int | float] | None = Field(
        None, "the web UI's layer structure: width multipliers from input to output, first and last 1, e.g. 1,2,2,1",
        group=_GROUP, implied="1,2,1", metavar="N,N,...")
    hypernetwork_activation_func: Literal[ACTIVATIONS] | None = Field(
        None, "activation after each hidden layer (the web UI's names; swish is Hardswish; ComfyUI loads only "
        "linear, relu, leakyrelu, elu, swish, tanh, sigmoid, softsign, mish)", group=_GROUP, implied="linear")
    hypernetwork_weight_init: Literal[WEIGHT_INITS] | None = Field(
        None, "initial weights of a new hypernetwork", group=_GROUP, implied="Normal")
    hypernetwork_add_layer_norm: bool = Field(False, "a LayerNorm after each layer", group=_GROUP)
    hypernetwork_dropout_structure: list[int | float] | None = Field(
        None, "dropout after each layer, one entry per layer structure entry, the first 0, e.g. 0,0.05,0.15,0 "
        "(the web UI's 'Use dropout' with its dropout structure)", group=_GROUP, implied="no dropout",
        metavar="P,P,...")
    hypernetwork_activate_output: bool = Field(
        False, "apply the activation after the output layer too (the web UI's activate_output)", group=_GROUP)

    @field_validator("hypernetwork_module")
    @classmethod
    def _module(cls, value: str | None) -> str | None:
        if value is not None and value not in NAI_MODULE_NAMES:
            raise ValueError(f"{value!r}: only the built-in NovelAI architecture is available "
                             f"({' or '.join(NAI_MODULE_NAMES)}); other Python modules are not imported")
        return value

    @field_validator("hypernetwork_layer_structure", "hypernetwork_dropout_structure", mode="before")
    @classmethod
    def _numbers(cls, value, info):
        return None if value is None else list(parse_numbers(value, "--" + info.field_name))

    @field_validator("hypernetwork_weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        from pathlib import Path

        if value is not None and not Path(value).is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _hypernetwork(self):
        given = [name for name in STRUCTURE_OPTIONS if getattr(self, name) not in (None, False)]
        if self.hypernetwork_module is None:
            other = given + (["hypernetwork_weights"] if self.hypernetwork_weights else [])
            if other:
                raise UserError("only acts in hypernetwork training", where=f"--{other[0]}",
                                fix="Add --hypernetwork_module hypernetwork_nai, or drop the flag.")
            return self
        if self.hypernetwork_weights and given:
            raise UserError("the structure of a continued hypernetwork comes from its file", where=f"--{given[0]}",
                            fix="Drop the structure flags, or start a new hypernetwork without --hypernetwork_weights.")
        self.hypernetwork_structure()
        if getattr(self, "save_model_as", "safetensors") != "safetensors":  # the training options' own default
            raise UserError("a hypernetwork is saved as the web UIs' .pt file, not as a model",
                            where="--save_model_as", fix="Drop --save_model_as (--use_safetensors writes a "
                            ".safetensors hypernetwork instead).")
        if self.hypernetwork_enable_sizes is not None:
            check_widths(self.hypernetwork_enable_sizes, "--hypernetwork_enable_sizes")
        return self

    def hypernetwork_plan(self, unet_config: dict) -> list[str]:
        """What `--dry_run` says about the hypernetwork, from the options and the U-Net's config alone."""
        if self.hypernetwork_weights:
            return [f"hypernetwork: continuing {self.hypernetwork_weights} (its structure and widths come from the "
                    "file); the U-Net and text encoder stay frozen"]
        model_widths = attention_widths_from_config(unet_config)
        widths = resolve_widths(self.hypernetwork_enable_sizes, model_widths)
        return plan_lines(self.hypernetwork_structure(), widths, model_widths)

    def hypernetwork_structure(self) -> Structure:
        """The structure of a new hypernetwork, from the flags (the web UI's defaults where not given)."""
        flag = "--hypernetwork_layer_structure"
        try:
            layers = parse_numbers(self.resolved("hypernetwork_layer_structure"), flag)
            dropout = self.hypernetwork_dropout_structure
            if dropout is not None:
                flag = "--hypernetwork_dropout_structure"
                if dropout[0] != 0:  # the web UI never reads it: a value there would not act
                    raise ValueError("the first entry is the input's, which gets no dropout: make it 0")
            return Structure(layer_structure=layers, activation_func=self.resolved("hypernetwork_activation_func"),
                             is_layer_norm=self.hypernetwork_add_layer_norm,
                             dropout_structure=None if dropout is None else tuple(dropout),
                             activate_output=self.hypernetwork_activate_output,
                             weight_initialization=self.resolved("hypernetwork_weight_init"))
        except ValueError as exc:
            raise UserError(str(exc), where=flag) from None
