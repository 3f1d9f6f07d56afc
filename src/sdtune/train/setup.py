"""Building the pieces the loop uses: accelerator, attention, compute copies, saving, signals.

Kept apart from loop.py so the loop reads as the training step and its schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
from pathlib import Path
from typing import Callable

from sdtune.errors import UserError
from sdtune.train.options import TrainOptions


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 mixing), so nearby tuples give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x ^= (p + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def make_accelerator(opts: TrainOptions, note: Callable[[str], None]):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    on_gpu = torch.cuda.is_available()
    precision = opts.mixed_precision
    if precision == "fp16" and not on_gpu:
        note("note: fp16 mixed precision needs a CUDA GPU; training in float32 on the CPU instead "
             "(--mixed_precision bf16 works on CPUs)")
        precision = "no"
    # A trained text encoder conditioned on an earlier layer (clip skip) leaves its top layers
    # without gradients, which DDP must be told about.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=opts.train_text_encoder)
    return Accelerator(gradient_accumulation_steps=opts.gradient_accumulation_steps, mixed_precision=precision,
                       cpu=not on_gpu, kwargs_handlers=[ddp])


def weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def compute_copy(module, device, dtype):
    """The module as used for computing: itself when nothing changes, else a converted copy.

    The model's own components stay as loaded (float32, on the CPU) so that saving writes exactly
    what was trained and loaded, never weights that went through a half-precision cast.
    """
    import torch

    first = next(module.parameters())
    if first.device == torch.device(device) and first.dtype == dtype:
        return module
    if first.device.type == "cpu" and torch.device(device).type == "cpu" and first.dtype == dtype:
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def configure_attention(unet, opts: TrainOptions, note: Callable[[str], None]) -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    if opts.xformers or opts.diffusers_xformers:
        try:
            import xformers  # noqa: F401

            if not torch.cuda.is_available():
                raise ImportError("xformers needs CUDA")
            unet.enable_xformers_memory_efficient_attention()
            note("attention: xformers")
            return
        except (ImportError, NotImplementedError, ValueError) as exc:
            note(f"note: --xformers requested but unavailable ({exc}); using torch SDPA attention, which is "
                 "memory-efficient on GPUs too")
    unet.set_attn_processor(AttnProcessor2_0())
    if opts.mem_eff_attn and not torch.cuda.is_available():
        note("note: --mem_eff_attn selects SDPA's memory-efficient CUDA kernel; on the CPU SDPA chooses its own")


def mem_eff_context(opts: TrainOptions):
    """SDPA restricted to the memory-efficient kernel (--mem_eff_attn on CUDA), else nothing."""
    import contextlib

    import torch

    if opts.mem_eff_attn and torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    return contextlib.nullcontext()


def save_trained(model, path: Path, *, unet, text_encoder, opts: TrainOptions, metadata: dict[str, str],
                 ema=None, use_ema: bool = False) -> Path:
    """Save the current weights (the EMA weights with `use_ema`) without disturbing training."""
    import torch

    from sdtune import checkpoint

    to_save = dataclasses.replace(model, unet=unet, text_encoder=text_encoder)
    backup = None
    if use_ema:
        backup = [p.detach().to("cpu", copy=True) for p in unet.parameters()]
        ema.copy_to(unet)
    try:
        return checkpoint.save_model(to_save, path, fmt=opts.save_format, precision=opts.save_precision or "float",
                                     metadata=metadata, progress=False)
    finally:
        if backup is not None:
            with torch.no_grad():
                for p, b in zip(unet.parameters(), backup):
                    p.copy_(b.to(p.device, p.dtype))


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to save its state and stop after the current step.

    A second Ctrl-C interrupts at once (the default behaviour).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: finishing this step and saving the training state (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class TrainingDiverged(UserError):
    pass


def diverged(step: int, loss: float, opts: TrainOptions) -> TrainingDiverged:
    causes = ["a learning rate too high for this optimizer"]
    if opts.mixed_precision == "fp16":
        causes.append("fp16 overflow (try --mixed_precision bf16, or --no_half_vae)")
    if opts.min_snr_gamma is None and opts.zero_terminal_snr:
        causes.append("zero terminal SNR weights without --min_snr_gamma")
    return TrainingDiverged(f"the loss became {loss} at step {step}; training stopped and nothing was saved from "
                            f"this step on (earlier saves are intact). Likely causes: {'; '.join(causes)}")
