"""What a run trains: the training-target seam.

The trainer (train/trainer.py) knows how to feed batches, step an optimizer, save on a schedule and
resume; a `TrainingTarget` says what those steps change. Full fine-tuning (the U-Net, optionally the
text encoder) is one target; a network trained beside a frozen model (a hypernetwork) is another.
The trainer calls a target in this order:

1. `place(model, ...)`: freeze, cast and move the model's parts for this kind of training; after it,
   `text_encoder` is the encoder the run conditions with.
2. `param_groups()` for the optimizer (each with its "lr" and a "name" used for the logged
   learning rate), then `modules()` are prepared by the engine together with the optimizer and
   `adopt(prepared)` receives them back (wrapped for data parallelism).
3. Every step: `denoiser` is the module `predict.denoise` calls; `conditioning_encoder` (when the
   text encoder trains) the one the conditioner calls.
4. `eval_view(weights)` gives the unwrapped denoiser and encoder for validation and sampling;
   `ema_module(weights)` what an EMA averages; `checksum_modules()` what replicas must agree on;
   `save(...)` writes the target's file at each save point.

A new target subclasses `TrainingTarget`; the trainer's code does not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from sdtune.model import SDModel
    from sdtune.train.options import TrainOptions
    from sdtune.train.weights import Weights


class TrainingTarget:
    """The interface (see the module's docstring); subclasses implement every method."""

    label = "model"  # what the weight checksum line names
    trains_text_encoder = False
    text_encoder = None  # the encoder the conditioner uses (set by place)

    def save_format(self, opts: "TrainOptions") -> str:
        """The file format of the target's saves (a key of saving.EXTENSIONS)."""
        return opts.save_format

    def place(self, model: "SDModel", *, device, compute_dtype, note: Callable[[str], None]) -> None:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def modules(self) -> list:
        raise NotImplementedError

    def adopt(self, prepared: list) -> None:
        raise NotImplementedError

    @property
    def denoiser(self):
        raise NotImplementedError

    @property
    def conditioning_encoder(self):
        """The (prepared) text encoder when it trains, else None."""
        return None

    def eval_view(self, weights: "Weights") -> contextlib.AbstractContextManager:
        """(denoiser, text encoder or None) unwrapped, with every weight present, for one process."""
        raise NotImplementedError

    def ema_module(self, weights: "Weights"):
        """The unwrapped module an EMA averages (None: EMA is not available for this target)."""
        return None

    def checksum_modules(self) -> list:
        raise NotImplementedError

    def save(self, path_for: Callable[[str], Path], stem: str, *, step: int, weights: "Weights",
             metadata: dict[str, str], ema=None) -> Path:
        """Write the save point `stem`, taken after optimizer step `step` (main process only); returns
        the main file."""
        raise NotImplementedError


class FullFineTune(TrainingTarget):
    """The U-Net, and the text encoder with --train_text_encoder: sd-scripts' fine_tune.py."""

    label = "U-Net"

    def __init__(self, opts: "TrainOptions"):
        self.opts = opts
        self.trains_text_encoder = opts.train_text_encoder
        self.model = self.unet = None

    def place(self, model, *, device, compute_dtype, note) -> None:
        from sdtune.train.setup import compute_copy, configure_attention

        opts, train_te = self.opts, self.trains_text_encoder
        self.model = model
        text_encoder = model.text_encoder.requires_grad_(train_te)
        text_encoder.train(train_te)
        if train_te:
            text_encoder.to(device)
        elif self._saved_in(compute_dtype):  # saves round it to this precision anyway: cast in place, one copy
            text_encoder = text_encoder.eval().to(device=device, dtype=compute_dtype)
        else:  # frozen: a copy in the compute precision; the model's own stays as loaded, for saving
            text_encoder = compute_copy(text_encoder.eval(), device, compute_dtype)
        self.text_encoder = text_encoder
        unet = model.unet.requires_grad_(True).to(device)
        unet.train()
        configure_attention(unet, opts, note)
        if opts.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if train_te:
                text_encoder.gradient_checkpointing_enable()
        if opts.full_fp16 or opts.full_bf16:
            # the trained weights themselves in half precision: weights, gradients and optimizer state take half
            unet.to(compute_dtype)
            if train_te:
                text_encoder.to(compute_dtype)
        self.unet = unet

    def _saved_in(self, dtype) -> bool:
        """Whether saves write the model in `dtype` (rounding from float32 once, as a cast at load does)."""
        import torch

        from sdtune.checkpoint.save import precision_dtype

        return dtype != torch.float32 and precision_dtype(self.opts.save_precision or "float") == dtype

    def param_groups(self) -> list[dict[str, Any]]:
        from sdtune.train.optim import build_param_groups

        return build_param_groups(self.unet, self.text_encoder if self.trains_text_encoder else None,
                                  learning_rate=self.opts.learning_rate, learning_rate_te=self.opts.learning_rate_te)

    def modules(self) -> list:
        return [self.unet, self.text_encoder] if self.trains_text_encoder else [self.unet]

    def adopt(self, prepared: list) -> None:
        self.unet = prepared[0]
        if self.trains_text_encoder:
            self.text_encoder = prepared[1]

    @property
    def denoiser(self):
        return self.unet

    @property
    def conditioning_encoder(self):
        return self.text_encoder if self.trains_text_encoder else None

    @contextlib.contextmanager
    def eval_view(self, weights) -> Iterator[tuple[Any, Any]]:
        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(weights.full(self.unet))
            encoder = stack.enter_context(weights.full(self.text_encoder)) if self.trains_text_encoder else None
            yield unet, encoder

    def ema_module(self, weights):
        return weights.unwrap(self.unet)

    def checksum_modules(self) -> list:
        return [self.unet]

    def save(self, path_for, stem, *, step, weights, metadata, ema=None) -> Path:
        from sdtune.train.setup import save_trained

        opts = self.opts
        with self.eval_view(weights) as (unet, encoder):
            model = dataclasses.replace(self.model, unet=unet, text_encoder=encoder or self.model.text_encoder)
            kwargs = dict(fmt=opts.save_format, precision=opts.save_precision or "float", metadata=metadata, ema=ema)
            main = save_trained(model, path_for(stem), use_ema=opts.save_ema, **kwargs)
            if ema is not None and not opts.save_ema:  # both: the trained weights and their average
                save_trained(model, path_for(stem + "-ema"), use_ema=True, **kwargs)
        return main
