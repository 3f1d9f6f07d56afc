"""Building the pieces the trainer uses: accelerator, attention, compute copies, saving, signals.

Kept apart from trainer.py so the trainer reads as the training step and its schedule.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Callable

from sdtune.console import plural
from sdtune.errors import UserError
from sdtune.train.accel import fresh_accelerator_state
from sdtune.train.options import TrainingOptions, TrainOptions


def make_accelerator(opts: TrainOptions, note: Callable[[str], None]):
    import torch
    from accelerate import Accelerator

    from sdtune.train.accel import deepspeed_accelerator
    from sdtune.train.world import accelerator_handlers

    on_gpu = torch.cuda.is_available()
    precision = opts.mixed_precision
    if opts.full_fp16 and not on_gpu:
        raise UserError("float16 weights need a CUDA GPU (the CPU has no float16 training kernels worth using)",
                        where="--full_fp16", fix="On the CPU use --mixed_precision bf16 --full_bf16, or drop --full_fp16.")
    if opts.deepspeed:  # never cpu=True: accelerate would drop DeepSpeed for plain data parallel
        return deepspeed_accelerator(opts, precision)  # fp16 on a CPU is refused there, not quietly dropped
    if precision == "fp16" and not on_gpu:
        note("note: fp16 mixed precision needs a CUDA GPU; training in float32 on the CPU instead "
             "(--mixed_precision bf16 works on CPUs)")
        precision = "no"
    handlers = accelerator_handlers(opts)  # refuses an engine the trainer cannot run under, before accelerate
    fresh_accelerator_state()  # a second run in one process (tests, notebooks) starts afresh
    return Accelerator(gradient_accumulation_steps=opts.gradient_accumulation_steps, mixed_precision=precision,
                       cpu=not on_gpu, kwargs_handlers=handlers)


def text_embedding_cache(plan, conditioner, caption_options, opts: TrainOptions, accelerator, note):
    """A filled TextEmbeddingCache when the user chose disk caches (--cache_dir or
    --cache_latents_to_disk), the text encoder is frozen and no subset varies its captions beyond
    dropout to ""; else None (captions are then encoded at every step, as sd-scripts does).

    Every caption the run can draw is encoded before the first step, so the encoder is idle during
    training. Lives in `<cache_dir or the first subset's image folder>/.sdtune-cache/text`; entries
    are keyed by encoder weights, tokenizer and clip skip, so they are reused by later runs and never
    read stale. Without a disk-cache option nothing is written next to the images (the folder may be
    read-only), and holding every embedding in memory would cost ~240 KB per caption.
    """
    from sdtune.text import TextEmbeddingCache, build_caption, process_caption

    if not (opts.cache_dir or opts.cache_latents_to_disk):
        return None
    if opts.train_text_encoder or not all(c.cache_compatible for c in caption_options):
        return None
    first = plan.subsets[0]
    root = Path(opts.cache_dir) if opts.cache_dir else (first.image_dir or first.metadata_file.parent) / ".sdtune-cache"
    cache = TextEmbeddingCache(root / "text", conditioner)
    captions = [""]
    for s in plan.active:
        fixed = caption_options[s.subset].model_copy(update={"caption_dropout_rate": 0.0,
                                                             "caption_dropout_every_n_epochs": 0})
        # with cache-compatible options the text is the same at every epoch and step
        captions.append(process_caption(build_caption(s.caption, s.tags, fixed), fixed, seed=0, epoch=1, index=s.index))
    with accelerator.main_process_first():  # one process encodes, the others read its files
        stats = cache.precompute(captions, progress=accelerator.is_main_process)
    note(f"text embeddings: {plural(len(set(captions)), 'caption')} cached in {cache.directory} ({stats.written} new); "
         "the text encoder is not run during training")
    return cache


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


def configure_attention(unet, opts: TrainingOptions, note: Callable[[str], None]) -> None:
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


def mem_eff_context(opts: TrainingOptions):
    """SDPA restricted to the memory-efficient kernel (--mem_eff_attn on CUDA), else nothing."""
    import contextlib

    import torch

    if opts.mem_eff_attn and torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    return contextlib.nullcontext()


def save_trained(model, path: Path, *, fmt: str, precision: str, metadata: dict[str, str], ema=None,
                 use_ema: bool = False) -> Path:
    """Save `model` with its current weights (its U-Net's EMA weights with `use_ema`) without
    disturbing training."""
    import torch

    from sdtune import checkpoint

    unet = model.unet
    backup = None
    if use_ema:
        backup = [p.detach().to("cpu", copy=True) for p in unet.parameters()]
        ema.copy_to(unet)
    try:
        return checkpoint.save_model(model, path, fmt=fmt, precision=precision, metadata=metadata, progress=False)
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
        self.signum: int | None = None  # the signal that asked (None: another process asked)
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
        self.signum = signum
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
