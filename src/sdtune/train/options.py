"""The training command's options: sd-scripts' fine_tune.py flag names, typed and validated.

Grouped by area (model, training, saving); `TrainOptions` combines them with the dataset options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from sdtune.config import Field, Options

SAVE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": ""}


class ModelOptions(Options):
    pretrained_model_name_or_path: str | None = Field(
        None, "the model to fine-tune: a .safetensors or .ckpt file, a Diffusers folder, or a hub id",
        group="Model", metavar="PATH")
    v2: bool = Field(False, "force SD 2.x (normally detected from the checkpoint)", group="Model")
    v_parameterization: bool = Field(False, "force v-prediction (normally detected from the checkpoint)", group="Model")
    use_ema_weights: bool = Field(False, "start from the checkpoint's EMA weights (model_ema.*) when present", group="Model")


class TrainingOptions(Options):
    learning_rate: float = Field(2e-6, "learning rate of the U-Net", group="Training", gt=0)
    max_train_steps: int = Field(1600, "number of optimizer steps", group="Training", ge=1)
    max_train_epochs: int | None = Field(None, "number of epochs (overrides --max_train_steps)", group="Training", ge=1)
    seed: int | None = Field(None, "random seed: the same seed gives the same run (default: 42)", group="Training")
    gradient_accumulation_steps: int = Field(1, "micro-batches per optimizer step", group="Training", ge=1)
    max_grad_norm: float = Field(1.0, "clip the gradient norm to this (0 disables)", group="Training", ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", "mixed precision for the forward pass", group="Training")
    optimizer_type: str = Field("AdamW", "optimizer (AdamW, AdamW8bit)", group="Training")
    optimizer_args: list[str] = Field([], "optimizer arguments as key=value", group="Training", metavar="K=V")
    use_8bit_adam: bool = Field(False, "same as --optimizer_type AdamW8bit (needs bitsandbytes)", group="Training")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field(
        "constant", "learning-rate schedule", group="Training")
    lr_warmup_steps: float = Field(0, "warm-up steps (a count, or a fraction < 1 of the total steps)", group="Training", ge=0)
    gradient_checkpointing: bool = Field(False, "recompute activations in the backward pass to save memory", group="Training")
    clip_skip: int | None = Field(None, "condition on the text encoder's N-th layer from the end (2 = penultimate)", group="Training", ge=1)
    max_token_length: Literal[75, 150, 225] | None = Field(None, "caption length in tokens: 75, 150 or 225", group="Training")
    logging_dir: str | None = Field(None, "write TensorBoard logs here", group="Training", metavar="DIR")
    dry_run: bool = Field(False, "print the plan (model, buckets, steps) and exit without training", group="Training")

    @field_validator("optimizer_args")
    @classmethod
    def _kv(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
        return value


class SavingOptions(Options):
    output_dir: str | None = Field(None, "folder for the trained model", group="Saving", metavar="DIR")
    output_name: str | None = Field(None, "file name of the trained model, without extension (default: last)", group="Saving")
    save_model_as: Literal["ckpt", "safetensors", "diffusers", "diffusers_safetensors"] = Field(
        "safetensors", "format of the saved model (diffusers* write a folder)", group="Saving")
    save_precision: Literal["float", "fp16", "bf16"] | None = Field(
        None, "dtype of the saved weights (default: as trained, float32)", group="Saving")
    use_safetensors: bool = Field(
        False, "sd-scripts' legacy flag: safetensors serialisation (with --save_model_as diffusers: diffusers_safetensors)",
        group="Saving")
    metadata_title: str | None = Field(None, "ModelSpec title (default: the output name)", group="Saving")
    metadata_author: str | None = Field(None, "ModelSpec author", group="Saving")
    metadata_description: str | None = Field(None, "ModelSpec description", group="Saving")
    metadata_license: str | None = Field(None, "ModelSpec license", group="Saving")
    metadata_tags: str | None = Field(None, "ModelSpec tags, comma-separated", group="Saving")

    @field_validator("output_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value):
            raise ValueError("must be a plain file name without folders")
        return value

    @property
    def save_format(self) -> str:
        """--save_model_as, with sd-scripts' --use_safetensors folded in."""
        if self.use_safetensors and self.save_model_as == "diffusers":
            return "diffusers_safetensors"
        return self.save_model_as

    def output_path(self, stem: str | None = None):
        from pathlib import Path

        name = stem or self.output_name or "last"
        return Path(self.output_dir or ".") / (name + SAVE_EXTENSIONS[self.save_format])


class BaseTrainOptions(ModelOptions, TrainingOptions, SavingOptions):
    @model_validator(mode="after")
    def _required(self):
        from sdtune.errors import UserError

        if not self.pretrained_model_name_or_path:
            raise UserError("no model given", where="--pretrained_model_name_or_path",
                            fix="Pass a .safetensors/.ckpt file, a Diffusers folder or a hub id.")
        if self.use_safetensors and self.save_model_as == "ckpt":
            raise UserError("--use_safetensors contradicts --save_model_as ckpt", fix="Drop one of them.")
        if not self.output_dir and not self.dry_run:
            raise UserError("no output folder given", where="--output_dir", fix="Pass --output_dir DIR.")
        return self

    @property
    def effective_optimizer(self) -> str:
        return "AdamW8bit" if self.use_8bit_adam else self.optimizer_type

    @property
    def effective_seed(self) -> int:
        return 42 if self.seed is None else self.seed
