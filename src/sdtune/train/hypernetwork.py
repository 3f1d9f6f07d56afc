"""Hypernetwork training: the training target that trains a hypernetwork beside a frozen model.

The U-Net and the text encoder are frozen and kept in the compute precision (so memory stays far
below a full fine-tune); the hypernetwork, in float32 unless --full_fp16 / --full_bf16, is applied
to the U-Net's attention layers (sdtune.hypernetwork.apply) and is the only trained module. It is
saved as the web UIs' `.pt` on the models' cadence and names; its optimizer state travels in the
training state like any trained module's.

The engine (DDP) must see the hypernetwork's forward to average its gradients across processes, but
the hypernetwork is called from inside the U-Net's attention layers. So the module handed to the
engine is `HypernetworkedUNet`: its forward is the U-Net's, and it holds the hypernetwork as its only
submodule; the frozen U-Net is kept outside its module tree, so that the training state and the
replica checks carry the hypernetwork alone, not a copy of the whole U-Net.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from sdtune.train.target import TrainingTarget

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HypernetworkedUNet(torch.nn.Module):
    """The frozen U-Net with a hypernetwork applied, as the one module the engine trains.

    Its forward only passes its arguments on to the wrapped U-Net (sdtune.model.denoise forms them):
    it exists so that the engine's forward, and so its gradient averaging, covers the hypernetwork."""

    def __init__(self, unet, hypernetwork):
        super().__init__()
        self.hypernetwork = hypernetwork
        self._frozen = (unet,)  # outside the module tree: not in the state, not broadcast, not trained

    @property
    def unet(self):
        return self._frozen[0]

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


class HypernetworkTarget(TrainingTarget):
    """--hypernetwork_module hypernetwork_nai: sd-scripts' hypernetwork mode, in the web UI's format."""

    label = "hypernetwork"
    trains_text_encoder = False

    def __init__(self, opts):
        self.opts = opts
        self.model = self.hypernetwork = self.wrapper = self.attachment = None
        self.start_step = 0

    def save_format(self, opts) -> str:
        return "safetensors" if opts.use_safetensors else "pt"

    def place(self, model, *, device, compute_dtype, note) -> None:
        from sdtune.hypernetwork import apply
        from sdtune.train.setup import compute_copy, configure_attention

        opts = self.opts
        self.model = model
        self.text_encoder = compute_copy(model.text_encoder.requires_grad_(False).eval(), device, compute_dtype)
        unet = compute_copy(model.unet.requires_grad_(False).eval(), device, compute_dtype)
        model.vae.requires_grad_(False)
        configure_attention(unet, opts, note)
        if opts.gradient_checkpointing:  # recomputes the frozen U-Net's activations; the hypernetwork still learns
            unet.enable_gradient_checkpointing()
        model_widths = apply.attention_widths(unet)
        hn = self._hypernetwork(model_widths, note)
        apply.trainable_parameters(hn, model.unet, model.text_encoder, model.vae, unet, self.text_encoder)
        for width in hn.widths:
            if width not in model_widths:  # never reached: no gradient, which data parallelism would wait for
                hn.pairs[str(width)].requires_grad_(False)
        hn.to(device, compute_dtype if (opts.full_fp16 or opts.full_bf16) else torch.float32)
        hn.multiplier = 1.0
        hn.train()
        self.hypernetwork = hn
        self.attachment = apply.attach(unet, hn)
        self.wrapper = HypernetworkedUNet(unet, hn)

    def _hypernetwork(self, model_widths, note):
        from sdtune.hypernetwork import files
        from sdtune.hypernetwork.module import new_hypernetwork
        from sdtune.hypernetwork.spec import plan_lines, resolve_widths

        opts = self.opts
        if opts.hypernetwork_weights:
            hn = files.load(opts.hypernetwork_weights)
            self.start_step = hn.info.step
            note(f"hypernetwork: continuing {opts.hypernetwork_weights} (step {hn.info.step})")
        else:
            widths = resolve_widths(opts.hypernetwork_enable_sizes, model_widths)
            hn = new_hypernetwork(widths, opts.hypernetwork_structure(), name=opts.resolved("output_name"),
                                  seed=opts.effective_seed)
            hn.info = hn.info.replace(**files.base_checkpoint_fields(opts.pretrained_model_name_or_path))
        for line in plan_lines(hn.structure, hn.widths, model_widths):
            note(line)
        return hn

    def param_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.hypernetwork.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.opts.learning_rate, "name": "hypernetwork"}]

    def modules(self) -> list:
        return [self.wrapper]

    def adopt(self, prepared: list) -> None:
        self.wrapper = prepared[0]

    @property
    def denoiser(self):
        return self.wrapper

    @contextlib.contextmanager
    def eval_view(self, weights) -> Iterator[tuple[Any, Any]]:
        """The U-Net with the hypernetwork applied, dropout off (validation and samples show its effect)."""
        with weights.full(self.wrapper) as wrapper:
            was_training = wrapper.hypernetwork.training
            wrapper.hypernetwork.eval()
            try:
                yield wrapper.unet, None
            finally:
                wrapper.hypernetwork.train(was_training)

    def ema_module(self, weights):
        return weights.unwrap(self.wrapper).hypernetwork

    def checksum_modules(self) -> list:
        return [self.hypernetwork]

    def save(self, path_for, stem, *, step, weights, metadata, ema=None) -> Path:
        opts = self.opts
        # the web UI counts a hypernetwork's steps over all its training: a continued file goes on counting
        step = self.start_step + step
        with weights.full(self.wrapper) as wrapper:
            hn = wrapper.hypernetwork
            main = self._write(hn, path_for(stem), step, ema if opts.save_ema else None)
            if ema is not None and not opts.save_ema:  # both: the trained weights and their average
                self._write(hn, path_for(stem + "-ema"), step, ema)
        return main

    def _write(self, hn, path: Path, step: int, ema) -> Path:
        import copy

        from sdtune.hypernetwork import files

        out = hn
        if ema is not None:
            out = copy.deepcopy(hn)
            ema.copy_to(out)
        out.info = hn.info.replace(step=step)
        return files.save(out, path, dtype=PRECISIONS[self.opts.save_precision or "float"])
