"""The training loop, top to bottom: load, data, optimizer, steps, save.

Built on accelerate (multi-GPU and multi-process CPU through `accelerate launch`). All randomness
comes from generators derived from (seed, step, rank), never from the global RNG, so the same seed
gives the same run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import UserError
from sdtune.train.options import BaseTrainOptions


@dataclass
class TrainResult:
    steps: int
    epochs: int
    final_loss: float
    seconds: float
    outputs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 mixing), so nearby tuples give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x ^= (p + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def make_accelerator(opts: BaseTrainOptions):
    import torch
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    precision = opts.mixed_precision
    if precision == "fp16" and not on_gpu:
        print("note: fp16 mixed precision needs a CUDA GPU; training in float32 on the CPU instead (use bf16 for CPU mixed precision)")
        precision = "no"
    return Accelerator(gradient_accumulation_steps=opts.gradient_accumulation_steps, mixed_precision=precision,
                       cpu=not on_gpu)


def make_optimizer(opts: BaseTrainOptions, params):
    import ast

    import torch

    kwargs = {}
    for item in opts.optimizer_args:
        key, value = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    name = opts.effective_optimizer
    if name.lower() == "adamw":
        cls = torch.optim.AdamW
    elif name.lower() == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("AdamW8bit needs bitsandbytes", where="--optimizer_type",
                            fix="pip install 'sdtune[bnb]', or use --optimizer_type AdamW.") from None
        cls = bnb.optim.AdamW8bit
    else:
        raise UserError(f"optimizer {name!r} is not supported yet", where="--optimizer_type", fix="Use AdamW or AdamW8bit.")
    try:
        return cls(params, lr=opts.learning_rate, **kwargs)
    except TypeError as exc:
        raise UserError(f"bad optimizer argument ({exc})", where="--optimizer_args") from None


def epoch_order(n: int, seed: int, epoch: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def train(opts: BaseTrainOptions) -> TrainResult:
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from sdtune import checkpoint
    from sdtune.console import quiet_libraries
    from sdtune.train import simple_data

    quiet_libraries()

    accelerator = make_accelerator(opts)
    main = accelerator.is_main_process
    seed = opts.effective_seed

    # --- data (interim: one resolution, centre crop)
    width = height = _resolution(opts)
    samples = simple_data.read_samples(opts.in_json, opts.train_data_dir)
    # --- model
    model = checkpoint.load_model(opts.pretrained_model_name_or_path, v2=opts.v2 or None,
                                  v_parameterization=opts.v_parameterization or None,
                                  use_ema_weights=opts.use_ema_weights)
    if main:
        print(f"model: {model.family.title} — {model.detection or model.source}")
    unet, vae, text_encoder, tokenizer = model.unet, model.vae, model.text_encoder, model.tokenizer
    noise_scheduler = model.noise_scheduler()
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    unet.requires_grad_(True).train()
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    device = accelerator.device
    vae.to(device)
    text_encoder.to(device)

    batch_size = opts.train_batch_size
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = len(samples) // (batch_size * world)
    if batches_per_epoch == 0:
        raise UserError(f"{len(samples)} images cannot fill one batch of {batch_size} on {world} processes",
                        fix="Lower --train_batch_size or add images.")
    steps_per_epoch = max(1, batches_per_epoch // opts.gradient_accumulation_steps)
    max_steps = opts.max_train_epochs * steps_per_epoch if opts.max_train_epochs else opts.max_train_steps
    epochs = math.ceil(max_steps / steps_per_epoch)

    # --- optimizer and schedule
    optimizer = make_optimizer(opts, [p for p in unet.parameters() if p.requires_grad])
    warmup = opts.lr_warmup_steps
    warmup_steps = int(warmup * max_steps) if 0 < warmup < 1 else int(warmup)
    # accelerate steps a prepared scheduler once per process, so counts are scaled by the world size
    # (sd-scripts forgets this for integer warm-ups: its bug #19).
    lr_scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=warmup_steps * world,
                                 num_training_steps=max_steps * world)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    if main:
        print(f"data: {len(samples)} images at {width}x{height}, batch {batch_size} x {world} processes "
              f"x {opts.gradient_accumulation_steps} accumulation; {steps_per_epoch} steps/epoch, "
              f"{max_steps} steps, {epochs} epochs")

    def encode_text(captions: list[str]):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state

    scaling = vae.config.scaling_factor
    losses: list[float] = []
    start = time.time()
    global_step = 0
    bar = tqdm(total=max_steps, disable=not main, desc="steps", dynamic_ncols=True)
    for epoch in range(epochs):
        order = epoch_order(len(samples), seed, epoch)
        for b in range(batches_per_epoch):
            if global_step >= max_steps:
                break
            first = (b * world + rank) * batch_size
            items = [samples[i] for i in order[first:first + batch_size]]
            pixels = torch.stack([simple_data.load_pixels(p, width, height) for p, _ in items]).to(device)
            gen = torch.Generator().manual_seed(derive_seed(seed, epoch, b, rank))
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
                    eps = torch.randn(posterior.mean.shape, generator=gen).to(device, posterior.mean.dtype)
                    latents = (posterior.mean + posterior.std * eps) * scaling
                cond = encode_text([c for _, c in items])
                noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():
                    pred = unet(noisy, timesteps, cond).sample
                target = noise if model.family.prediction_type == "epsilon" else noise_scheduler.get_velocity(
                    latents, noise, timesteps)
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), opts.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            if accelerator.sync_gradients:
                global_step += 1
                bar.update(1)
                window = losses[-50:]
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                                epoch=epoch + 1)
        if global_step >= max_steps:
            break
    bar.close()

    # --- save
    accelerator.wait_for_everyone()
    outputs = []
    if main:
        model.unet = accelerator.unwrap_model(unet)
        path = opts.output_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"title": opts.metadata_title or opts.output_name or "last", "resolution": f"{width}x{height}",
                    "steps": global_step, "epochs": epoch + 1}
        outputs.append(checkpoint.save_model(model, path, fmt=opts.save_format, precision=opts.save_precision,
                                             metadata=metadata))
        print(f"saved: {outputs[-1]}")
    accelerator.end_training()
    return TrainResult(global_step, epoch + 1, losses[-1] if losses else float("nan"), time.time() - start, outputs, losses)


def _resolution(opts) -> int:
    res = str(opts.resolution).split(",")
    if len(res) == 2 and res[0].strip() != res[1].strip():
        raise UserError("non-square resolutions need aspect-ratio bucketing, which is not implemented yet",
                        where="--resolution")
    value = int(res[0])
    if value % 8:
        raise UserError(f"{value} is not a multiple of 8", where="--resolution")
    return value
