"""The training loop, top to bottom: model, data, text, optimizer, resume, steps, saves.

Built on accelerate (multi-GPU and multi-process CPU through `accelerate launch`). Every random draw
comes from a generator derived from (seed, epoch, batch, rank) — never the global RNG — so the same
seed gives the same run and a resumed run continues with the very numbers an uninterrupted one draws.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdtune import seeds
from sdtune.train.options import TrainOptions


@dataclass
class TrainResult:
    steps: int
    epochs: int
    final_loss: float
    seconds: float
    outputs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)   # one per optimizer step (mean over its micro-batches)
    stopped: bool = False
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss/validation)
    exit_status: int = 0  # 128 + the signal number when a signal stopped the run (shell convention)


def train(opts: TrainOptions) -> TrainResult:
    import torch

    from sdtune.checkpoint import build_modelspec, load_vae
    from sdtune.config import public_options
    from sdtune.console import note as console_note, setup_console
    from sdtune.data import BucketBatchSampler, ensure_latent_cache, make_loader, sample_latents
    from sdtune.data.failures import LoadFailures
    from sdtune.data.plan import skipped_summary
    from sdtune.text import CaptionOptions, TextConditioner, build_caption, process_caption
    from sdtune.text.encode import clip_skip_note
    from sdtune.train import history as run_history, logs, optim, sampling, schedules, state, validation
    from sdtune.train.accel import allow_fp16_gradients, micro_batch
    from sdtune.train.ema import EMA
    from sdtune.train.noise import DiffusionObjective
    from sdtune.train.preflight import check_outputs
    from sdtune.train.prompts import load_prompts
    from sdtune.train.saving import SavePolicy, default_names, epoch_stem, step_stem
    from sdtune.train.setup import (StopRequest, compute_copy, configure_attention,
                                    diverged, make_accelerator, mem_eff_context, save_trained, text_embedding_cache,
                                    weight_dtype)

    if os.environ.get("RANK", "0") == "0":  # one process tries (another's clean-up would race with it)
        check_outputs(opts)  # an unwritable output stops the run now, not at the first save
    setup_console(opts.console_log_level, opts.console_log_file, opts.console_log_simple)
    started = time.time()
    accelerator = make_accelerator(opts, console_note)
    main = accelerator.is_main_process
    note = console_note if main else (lambda *a, **k: None)
    seed, world, rank = opts.effective_seed, accelerator.num_processes, accelerator.process_index
    device, accum = accelerator.device, opts.gradient_accumulation_steps
    options_dict = public_options(opts)  # without secrets: written to states, summary and tracker
    resume_record = state.read_state(opts.resume) if opts.resume else None
    length_changed = None
    if resume_record:  # refuse a mismatched resume before any expensive work
        state.check_compatible(resume_record, options_dict, opts.resume_allow_changes, opts.resume)
        if length_changed := state.length_change_note(resume_record, options_dict):
            note(f"note: {length_changed}")
    schedule = sampling.SampleSchedule(opts.sample_every_n_steps, opts.sample_every_n_epochs, opts.sample_at_first)
    for line in sampling.check_sampling_options(opts.sample_prompts, opts.sample_every_n_steps,
                                                opts.sample_every_n_epochs, opts.sample_at_first):
        note(f"note: {line}")
    prompts = load_prompts(opts.sample_prompts) if opts.sample_prompts and schedule.enabled else []

    # --- data first (cheap, and the likelier mistakes), then the model: float32 master weights
    model, plan = _model_and_plan(opts, seed, torch.float32, main)
    if opts.vae:  # as sd-scripts: it caches, encodes, samples and is saved in place of the model's own
        model = _replace(model, vae=load_vae(opts.vae, like=model.vae, dtype=torch.float32))
        note(f"vae: {opts.vae} (for the latents, the samples and the saved model)")
    plan, held_out = validation.split_plan(plan, opts.validation_split, opts.effective_validation_seed)
    validation.check_options(opts, held_out)
    plan.check_fill(world, accum)
    # the objective owns the (possibly rescaled) noise schedule
    objective = DiffusionObjective.from_options(opts, model.scheduler_config, model.family.prediction_type)
    for line in objective.notes:
        note(f"note: {line}")
    compute_dtype = weight_dtype(accelerator)
    vae_dtype = torch.float32 if opts.no_half_vae or device.type == "cpu" else compute_dtype
    model.vae.requires_grad_(False).eval()
    # a compute copy only where images are encoded at every step or for validation; cached latents
    # are encoded from the model's own VAE below
    needs_vae = not opts.caches_latents or (held_out and main)
    vae = compute_copy(model.vae, device, vae_dtype) if needs_vae else None
    validator = None
    if held_out and main:  # the other processes wait while the main one validates
        validator = validation.Validator(plan, held_out, objective, max_batches=opts.max_validation_steps,
                                         seed=opts.effective_validation_seed)
        validator.encode_images(vae, device, model.vae.config.scaling_factor, strict=opts.strict)
        note(validator.describe())
    cache = None
    if opts.caches_latents:
        shard = world > 1 and opts.cache_latents_to_disk
        # from the model's own full-precision VAE, with the cache's own precision rule (float16 on a
        # GPU unless --no_half_vae), exactly as `sdtune cache` encodes: its entries are then reused
        # and the latents never come from weights rounded twice (e.g. bf16, then fp16)
        cache = ensure_latent_cache(plan, model.vae, device=device, rank=rank if shard else 0,
                                    world_size=world if shard else 1, progress=main, log=note)
        if shard:  # every rank needs the whole index: a second pass only reads what the others wrote
            accelerator.wait_for_everyone()
            cache = ensure_latent_cache(plan, model.vae, device=device, progress=False, log=lambda *a: None)
        plan = cache.plan
        if vae is model.vae:
            vae.to("cpu")
        vae = None  # a compute copy leaves the accelerator; sampling uses the model's own VAE
    note(plan.summary(world, accum))
    dataset = state.dataset_fingerprint(plan)
    if resume_record and not state.check_dataset(resume_record, dataset, opts.resume_allow_changes, opts.resume):
        note("note: the dataset changed since the state was saved; the resumed epoch's order differs")

    # --- text: the one path from caption to conditioning, shared with sampling
    train_te = opts.train_text_encoder
    text_encoder = model.text_encoder.requires_grad_(train_te)
    text_encoder.train(train_te)
    if train_te:
        text_encoder.to(device)
    else:
        text_encoder = compute_copy(text_encoder.eval(), device, compute_dtype)
    conditioner = TextConditioner(model.tokenizer, text_encoder, model.family, max_token_length=opts.max_token_length,
                                  clip_skip=opts.clip_skip, weighted=opts.weighted_captions)
    note(f"text: {conditioner.layer.description}")
    clip_note = clip_skip_note(model.family, model.text_encoder.config.num_hidden_layers, opts.clip_skip)
    if clip_note:
        note(f"note: {clip_note}")
    caption_options = [CaptionOptions.from_dict(s.caption_options, where=f"subset {i + 1}") for i, s in enumerate(plan.subsets)]
    if validator is not None and not train_te:
        with accelerator.autocast():
            validator.encode_captions(conditioner.encode)
    text_cache = text_embedding_cache(plan, conditioner, caption_options, opts, accelerator, note)
    if text_cache is not None:
        text_encoder.to("cpu")  # idle from here on; sampling moves it back for the duration

    # --- U-Net, optimizer, schedule
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
    steps_per_epoch = plan.steps_per_epoch(world, accum)
    max_steps = opts.max_train_epochs * steps_per_epoch if opts.max_train_epochs else opts.max_train_steps
    epochs = math.ceil(max_steps / steps_per_epoch)
    if resume_record:
        state.check_remaining(resume_record, max_steps, opts.resume)
    groups = optim.build_param_groups(unet, text_encoder if train_te else None, learning_rate=opts.learning_rate,
                                      learning_rate_te=opts.learning_rate_te)
    optimizer = optim.build_optimizer(opts.effective_optimizer, groups, opts.learning_rate, opts.optimizer_args, note=note)
    if opts.full_bf16:  # the same rounding draws on every process keeps the replicas identical
        optim.add_bf16_stochastic_rounding(optimizer, torch.Generator(device).manual_seed(seeds.derive(seed, seeds.BF16_ROUNDING)))
    lr_scheduler = schedules.scheduler_from_options(opts, optimizer, total_steps=max_steps, num_processes=world, note=note)
    if train_te:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
        conditioner.text_encoder = text_encoder
        trained = [unet, text_encoder]
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained = [unet]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    if opts.full_fp16:
        allow_fp16_gradients(accelerator)
    ema = EMA(accelerator.unwrap_model(unet), opts.ema_decay, opts.ema_update_every,
              device="cpu" if opts.ema_cpu else None) if opts.ema else None

    # --- resume
    position = state.Position()
    if opts.resume:
        position = state.load_state(accelerator, opts.resume, ema)
        if length_changed:
            state.follow_new_length(lr_scheduler)
        note(f"resumed from {opts.resume}: step {position.global_step}, epoch {position.epoch + 1}, batch {position.batch}")
    start = opts.initial_position(steps_per_epoch, max_steps, position.global_step if opts.resume else None)
    if start:  # --initial_step / --initial_epoch: counters only, no data replayed
        position = state.Position(start[0], start[1], 0)
        note(start[2])
    # the loss at every step and the saves of the whole run, continued from the state's record
    history = run_history.RunHistory.begin(position.global_step, opts.resume, start and (
        "--initial_step" if opts.initial_step is not None else "--initial_epoch"))
    if history.note():
        note(f"note: {history.note()}")

    # --- outputs
    name, epoch_name, step_name = default_names(opts.output_name)
    out_dir = Path(opts.output_dir)
    policy = SavePolicy(name, out_dir, opts.save_format, opts.save_every_n_epochs_for(epochs), opts.save_every_n_steps,
                        opts.save_last_n_epochs, opts.save_last_n_steps, opts.save_last_n_epochs_state,
                        opts.save_last_n_steps_state, opts.save_state, epoch_name, step_name)
    settings = logs.trained_settings(plan.datasets, clip_skip=conditioner.layer.clip_skip, num_processes=world,
                                     gradient_accumulation_steps=accum)  # what was trained, for ModelSpec and the summary
    outputs: list[Path] = []
    logger = logs.RunLogger(opts.logging_dir, opts.log_with, logs.default_run_name(opts.log_prefix),
                            options_dict if opts.log_config else None, tracker_name=opts.resolved("log_tracker_name"),
                            init_kwargs=_tracker_init(opts, logs), wandb_api_key=opts.wandb_api_key) if main else None

    def save(stem: str, step: int, epoch: int, *, final: bool = False) -> None:
        accelerator.wait_for_everyone()
        failure = None
        try:
            if main:
                _save_model(stem, step, epoch)
        except Exception as exc:  # raised on every process below, so that none waits for the main one
            failure = exc
        state.raise_together(failure, accelerator)
        if opts.save_state and not final:
            state.save_state(accelerator, policy.state_path(stem), position, options_dict, ema, dataset,
                             history.record(losses, outputs, time.time() - started))
        accelerator.wait_for_everyone()

    def _save_model(stem: str, step: int, epoch: int) -> None:
        """The model file(s) of one save point (main process only)."""
        w, h = (int(x) for x in settings["resolution"].split("x"))
        meta = build_modelspec(model.family, title=opts.metadata_title or stem, resolution=(w, h),
                               clip_skip=settings["clip_skip"], training={"steps": step, "epochs": epoch, "seed": seed,
                                                                          "learning_rate": opts.learning_rate, **settings})
        meta.update(opts.modelspec_fields())
        u, t = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder) if train_te else model.text_encoder
        with optim.eval_weights(optimizer):
            outputs.append(save_trained(model, policy.model_path(stem), unet=u, text_encoder=t, opts=opts,
                                        metadata=meta, ema=ema, use_ema=opts.save_ema))
            if ema is not None and not opts.save_ema:
                save_trained(model, policy.model_path(stem + "-ema"), unet=u, text_encoder=t, opts=opts,
                             metadata=meta, ema=ema, use_ema=True)
        note(f"saved {outputs[-1]}")

    validation_losses: list[tuple[int, float]] = []

    def validate(step: int) -> None:
        if not held_out or (validation_losses and validation_losses[-1][0] == step):
            return
        if main:
            with optim.eval_weights(optimizer):
                value = validator.loss(accelerator.unwrap_model(unet), None if not train_te else
                                       _unwrapped_encoder(conditioner, accelerator.unwrap_model(text_encoder)),
                                       device=device, autocast=accelerator.autocast)
            validation_losses.append((step, value))
            progress.write(f"validation loss at step {step}: {value:.6f}")
            logger.log(step, {"loss/validation": value})
        accelerator.wait_for_everyone()

    def sample(step: int, epoch: int | None = None) -> None:
        if not prompts:
            return
        if main:
            u = accelerator.unwrap_model(unet)
            t = accelerator.unwrap_model(text_encoder) if train_te else model.text_encoder
            snapshot = _replace(model, unet=u, text_encoder=t)
            with optim.eval_weights(optimizer), mem_eff_context(opts):
                files = sampling.sample_images(snapshot, conditioner, prompts, sampler=opts.sample_sampler,
                                               out_dir=out_dir / "sample", name=name,
                                               tag=sampling.sample_tag(step=step, epoch=epoch), device=device, seed=seed,
                                               dtype=compute_dtype if compute_dtype != torch.float32 else None,
                                               progress=False)
            logger.log_images(step, "samples", list(files), [p.prompt for p in prompts])
        accelerator.wait_for_everyone()

    # --- the loop
    sampler = BucketBatchSampler(plan, seed=seed, rank=rank, world_size=world)
    loader = make_loader(plan, sampler, cache)
    last_batch = plan.batches_per_epoch(world) - 1
    progress = logs.TrainProgress(max_steps, initial=position.global_step, disable=not main)

    def warn(line: str) -> None:  # on a line of its own above the progress bar, not inside it
        with type(progress.bar).external_write_mode():
            console_note(f"warning: {line}")  # stdout, like every line of ours

    failures = LoadFailures(plan, loader.dataset, strict=opts.strict, warn=warn if main else None,
                            before_stop=progress.close)
    global_step, losses, micro, stopped = position.global_step, [], [], False
    epochs_done = position.epoch  # for the summary and ModelSpec: epochs begun, as before
    scaling = model.vae.config.scaling_factor
    if schedule.at_start() and (global_step == 0 or not opts.resume):
        sample(global_step)
    with StopRequest() as stop:
        for epoch in range(position.epoch, epochs):
            sampler.set_epoch(epoch, position.batch if epoch == position.epoch else 0)
            epoch_losses = []
            for batch in loader:
                if not failures.admit(batch, accelerator):
                    continue  # every image of this batch (or of another process's) failed to load
                gen = torch.Generator().manual_seed(seeds.derive(seed, epoch, batch["position"], rank))
                if world > 1 and not losses and not micro:  # each process names its first images once
                    print(f"process {rank + 1}/{world}: first batch "  # one write: ranks share the terminal
                          f"{', '.join(Path(plan.samples[i].path).name for i in batch['indices'])}\n", end="", flush=True)
                t0 = time.time()
                # The epoch's last batch closes the step, as sd-scripts' prepared loader does: the epoch
                # holds steps_per_epoch steps, and a state saved at its end has no half-accumulated gradient.
                closes_step = len(micro) + 1 == accum or batch["position"] == last_batch
                with micro_batch(accelerator, trained, closes_step):
                    if cache is not None:
                        latents = sample_latents(batch["latent_mean"].float(), batch["latent_logvar"].float(), gen)
                        latents = latents.to(device) * scaling
                    else:
                        with torch.no_grad():
                            dist = vae.encode(batch["images"].to(device, vae.dtype)).latent_dist
                            eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
                            latents = ((dist.mean + dist.std * eps) * scaling).float()
                    captions = [process_caption(build_caption(c, t, caption_options[s]), caption_options[s], seed=seed,
                                                epoch=epoch + 1, index=i, step=global_step, max_steps=max_steps)
                                for c, t, s, i in zip(batch["captions"], batch["tags"], batch["subsets"], batch["indices"])]
                    if text_cache is not None:
                        cond = text_cache.get(captions).to(device)
                    else:
                        with torch.set_grad_enabled(train_te), accelerator.autocast():
                            cond = conditioner.encode(captions)
                    noise, timesteps, noisy = objective.noise_batch(latents, gen)
                    with accelerator.autocast(), mem_eff_context(opts):
                        pred = unet(noisy, timesteps, cond).sample
                    loss = objective.loss(pred.float(), objective.target(latents, noise, timesteps).float(), timesteps,
                                          batch.get("loss_mask"))
                    if not torch.isfinite(loss):
                        progress.close()  # the error goes on a line of its own
                        raise diverged(global_step + 1, loss.item(), opts)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and opts.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro.append(loss.detach().item())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                step_loss = sum(micro) / len(micro)
                micro.clear()
                losses.append(step_loss)
                epoch_losses.append(step_loss)
                position = state.Position(global_step, epoch, batch["position"] + 1)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(unet), global_step)
                lr = lr_scheduler.get_last_lr()[0]
                mean = progress.update(step_loss, lr=lr, epoch=epoch + 1)
                if main:
                    values = {"loss/current": step_loss, "loss/average": mean, "lr/unet": lr,
                              "time/step_seconds": time.time() - t0}
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    if train_te:
                        values["lr/text_encoder"] = lr_scheduler.get_last_lr()[-1]
                    logger.log(global_step, values)
                if opts.validate_every_n_steps and global_step % opts.validate_every_n_steps == 0:
                    validate(global_step)
                if schedule.after_step(global_step):
                    sample(global_step)
                if policy.due_after_step(global_step, max_steps):
                    save(step_stem(step_name, global_step), global_step, epoch + 1)
                    if main:
                        policy.prune_steps(global_step)
                # all processes stop at the same step if any was asked to (they must save together)
                if state.any_process(stop.requested, accelerator) or global_step >= max_steps:
                    stopped = global_step < max_steps
                    break
            if stopped:
                break
            epochs_done = epoch + 1
            if global_step < max_steps or position.batch > last_batch:
                position = state.Position(global_step, epoch + 1, 0)
            # else the run ended inside the epoch: its end state continues there, as a mid-run one does
            if main and epoch_losses:
                logger.log(global_step, {"loss/epoch": sum(epoch_losses) / len(epoch_losses)})
            if (epoch + 1) % (opts.validate_every_n_epochs or 1) == 0:
                validate(global_step)
            if schedule.after_epoch(epoch + 1):
                sample(global_step, epoch + 1)
            if policy.due_after_epoch(epoch + 1, epochs) and global_step < max_steps:
                save(epoch_stem(epoch_name, epoch + 1), global_step, epoch + 1)
                if main:
                    policy.prune_epochs(epoch + 1)
            if global_step >= max_steps:
                break
    progress.close()

    # --- the end: state on request or interruption, final model, summary
    if stopped or opts.save_state or opts.save_state_on_train_end:  # sd-scripts: --save_state alone writes it too
        state.save_state(accelerator, out_dir / f"{name}-state", position, options_dict, ema, dataset,
                         history.record(losses, outputs, time.time() - started))
        note(f"training state saved to {out_dir / f'{name}-state'} (continue with --resume)")
    if world > 1:
        _check_replicas(accelerator, unet, note)
    if not stopped:
        save(name, global_step, epochs_done, final=True)
    seconds = time.time() - started
    if main:
        report = conditioner.truncation_report()
        if report.count:
            note(str(report))
        if failures.skipped:  # the plan's count, printed before training, did not include these
            note(f"note: {skipped_summary(plan.skipped + failures.skipped)} "
                 f"({len(failures.skipped)} found while training)")
        whole = history.record(losses, outputs, seconds)  # the plot and the summary cover every part of the run
        plot = logs.plot_loss(out_dir / f"{name}-loss.png", whole["steps"], whole["losses"]) if whole["steps"] else None
        last = [v for v in whole["losses"][-20:] if v is not None]
        logs.write_summary(out_dir / f"{name}-train_summary.json", options_dict, global_step, seconds,
                           sum(last) / len(last) if last else None, whole["outputs"], steps_this_run=len(losses),
                           epochs=epochs_done, stopped=stopped, loss_plot=str(plot) if plot else None,
                           history=str(logs.write_history(out_dir / f"{name}-history.json", whole)),
                           resumed_from=opts.resume, seconds_whole_run=whole["seconds"], unrecorded=history.note(),
                           family=model.family.name, trained=settings,
                           skipped_images=[{"path": p, "reason": r} for p, r in plan.skipped + failures.skipped])
        logger.close()
    accelerator.end_training()
    # a run stopped early exits like a process killed by the signal would (130 for Ctrl-C), so that
    # scripts and schedulers see it did not finish; with no local signal another process asked
    exit_status = 128 + int(stop.signum or signal.SIGTERM) if stopped else 0
    return TrainResult(global_step, epochs_done, losses[-1] if losses else float("nan"), seconds, outputs, losses,
                       stopped, validation_losses, exit_status)


def _model_and_plan(opts: TrainOptions, seed: int, dtype, verbose: bool):
    """The model and the dataset plan, built once at the resolution of the family loading detects.

    The header tells the family with the very detector loading runs, so the data is checked before
    the model is read; a Hub id, a pickle that is more than tensors, or an SD2 file whose prediction
    type only the forward probe can tell is loaded first (without --resolution the plan needs its family).
    """
    from sdtune import checkpoint
    from sdtune.checkpoint.detect import detect_from_header, needs_loading_to_plan
    from sdtune.data import build_plan
    from sdtune.families import SD1
    from sdtune.train.preflight import check_caches

    source = opts.pretrained_model_name_or_path
    found, _ = detect_from_header(source, v2=opts.v2 or None, v_parameterization=opts.v_parameterization or None)
    plan = None
    if opts.resolution or not needs_loading_to_plan(source, found):
        plan = build_plan(opts, seed=seed, default_resolution=(found.family if found else SD1).resolution)
        check_caches(opts, plan)
    model = checkpoint.load_model(source, v2=opts.v2 or None, v_parameterization=opts.v_parameterization or None,
                                  use_ema_weights=opts.use_ema_weights, dtype=dtype, verbose=verbose)
    if plan is None:
        plan = build_plan(opts, seed=seed, default_resolution=model.family.resolution)
        check_caches(opts, plan)
    return model, plan


def _unwrapped_encoder(conditioner, text_encoder):
    """The conditioning function on the unwrapped (not DDP) text encoder: a DDP forward on one process
    alone would wait for the others."""
    def encode(captions):
        wrapped, conditioner.text_encoder = conditioner.text_encoder, text_encoder
        try:
            return conditioner.encode(captions)
        finally:
            conditioner.text_encoder = wrapped

    return encode


def _replace(model, **changes):
    import dataclasses

    return dataclasses.replace(model, **changes)


def _tracker_init(opts: TrainOptions, logs) -> dict:
    init = logs.load_tracker_config(opts.log_tracker_config) if opts.log_tracker_config else {}
    if opts.wandb_run_name:
        init.setdefault("wandb", {})["name"] = opts.wandb_run_name
    return init


def _check_replicas(accelerator, unet, note) -> None:
    """Data-parallel processes must end with the same weights; a difference means they drifted apart."""
    import torch

    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in accelerator.unwrap_model(unet).parameters())
    sums = accelerator.gather(total.reshape(1).to(accelerator.device)).tolist()
    same = len(set(sums)) == 1
    note(f"U-Net weight checksum per process: {', '.join(f'{s:.17g}' for s in sums)} "
         f"({'identical' if same else 'DIFFERENT: the processes drifted apart; please report this'})")
