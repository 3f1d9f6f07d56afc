"""The trainer: a training target, fed batch by batch, stepped, validated, sampled, saved and resumable.

Built on accelerate (multi-GPU and multi-process CPU through `accelerate launch`). Every random draw
comes from a generator derived from (seed, epoch, batch, rank) — never the global RNG — so the same
seed gives the same run and a resumed run continues with the very numbers an uninterrupted one draws.
What is trained is the target's business (train/target.py); where the weights live, the weight-access
seam's (train/weights.py); the model is asked for predictions in one place (train/predict.py).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdtune import seeds
from sdtune.errors import UserError
from sdtune.train import build, state
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


class Trainer:
    def __init__(self, opts: TrainOptions, target=None):
        from sdtune.train.targets import target_for

        self.opts = opts
        self.target = target if target is not None else target_for(opts)

    # ------------------------------------------------------------------ the fit loop

    def fit(self) -> TrainResult:
        from sdtune.train.setup import StopRequest

        self.run = build.start(self.opts)
        try:
            self._build()
            if self.schedule.at_start() and (self.global_step == 0 or not self.opts.resume):
                self.sample(self.global_step)
            with StopRequest() as self.stop:
                for epoch in range(self.position.epoch, self.epochs):
                    if self._run_epoch(epoch):
                        break
            self.progress.close()
            return self._finish()
        finally:
            self.run.release()  # also when the run fails: the folder is free for the next one

    def _run_epoch(self, epoch: int) -> bool:
        """One epoch, or what is left of it; True when the run ends in it."""
        opts, run = self.opts, self.run
        self.sampler.set_epoch(epoch, self.position.batch if epoch == self.position.epoch else 0)
        epoch_losses = []
        for batch in self.loader:
            if not self.failures.admit(batch, run.accelerator):
                continue  # every image of this batch (or of another process's) failed to load
            if run.world > 1 and not self.losses and not self.micro:  # each process names its first images once
                print(f"process {run.rank + 1}/{run.world}: first batch "  # one write: ranks share the terminal
                      f"{', '.join(Path(self.plan.samples[i].path).name for i in batch.indices)}\n", end="", flush=True)
            started = time.time()
            grad_norm = self._train_batch(batch, epoch)
            if not run.accelerator.sync_gradients:
                continue
            epoch_losses.append(self._close_step(batch, epoch, grad_norm, time.time() - started))
            # all processes stop at the same step if any was asked to (they must save together)
            if run.weights.any_process(self.stop.requested) or self.global_step >= self.max_steps:
                self.stopped = self.global_step < self.max_steps
                break
        if self.stopped:
            return True
        step = self.global_step
        self.epochs_done = epoch + 1
        if step < self.max_steps or self.position.batch > self.last_batch:
            self.position = state.Position(step, epoch + 1, 0)
        # else the run ended inside the epoch: its end state continues there, as a mid-run one does
        if run.main and epoch_losses:
            self.logger.log(step, {"loss/epoch": sum(epoch_losses) / len(epoch_losses)})
        if (epoch + 1) % (opts.validate_every_n_epochs or 1) == 0:
            self.validate(step)
        if self.schedule.after_epoch(epoch + 1):
            self.sample(step, epoch + 1)
        if self.policy.due_after_epoch(epoch + 1, self.epochs) and step < self.max_steps:
            self.save(self.epoch_stem(epoch + 1), step, epoch + 1)
            if run.main:
                self.policy.prune_epochs(epoch + 1)
        return step >= self.max_steps

    def _train_batch(self, batch, epoch: int):
        """Forward and backward of one micro-batch, and the optimizer step when it closes one.
        Returns the gradient norm when it was clipped."""
        import torch

        from sdtune.train.accel import micro_batch
        from sdtune.train.setup import diverged

        opts, run = self.opts, self.run
        gen = torch.Generator().manual_seed(seeds.derive(run.seed, epoch, batch.position, run.rank))
        # The epoch's last batch closes the step, as sd-scripts' prepared loader does: the epoch
        # holds steps_per_epoch steps, and a state saved at its end has no half-accumulated gradient.
        closes_step = len(self.micro) + 1 == opts.gradient_accumulation_steps or batch.position == self.last_batch
        with micro_batch(run.accelerator, self.target.modules(), closes_step):
            latents = self._latents(batch, gen)
            cond = self._conditioning(batch, epoch)
            prediction = self.predictor.predict(self.target.denoiser, latents, cond, generator=gen,
                                                weights=batch.loss_mask)
            loss = self.predictor.loss(prediction)
            if not torch.isfinite(loss):
                self.progress.close()  # the error goes on a line of its own
                raise diverged(self.global_step + 1, loss.item(), opts)
            run.accelerator.backward(loss)
            grad_norm = None
            if self.fused is None:  # else each parameter was clipped and stepped inside backward()
                if run.accelerator.sync_gradients and opts.max_grad_norm > 0:
                    grad_norm = run.accelerator.clip_grad_norm_(self.params, opts.max_grad_norm)
                self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro.append(loss.detach().item())
        return grad_norm

    def _latents(self, batch, gen):
        """The batch's latents: drawn from the cached posterior, or encoded now."""
        import torch

        from sdtune.data import sample_latents

        device, scaling = self.run.device, self.scaling
        if self.cache is not None:
            latents = sample_latents(batch.latent_mean.float(), batch.latent_logvar.float(), gen)
            return latents.to(device) * scaling
        with torch.no_grad():
            dist = self.vae.encode(batch.images.to(device, self.vae.dtype)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
            return ((dist.mean + dist.std * eps) * scaling).float()

    def _conditioning(self, batch, epoch: int):
        import torch

        from sdtune.text import build_caption, process_caption

        options = self.text.caption_options
        captions = [process_caption(build_caption(c, t, options[s]), options[s], seed=self.run.seed, epoch=epoch + 1,
                                    index=i, step=self.global_step, max_steps=self.max_steps)
                    for c, t, s, i in zip(batch.captions, batch.tags, batch.subsets, batch.indices)]
        if self.text.text_cache is not None:
            return self.text.text_cache.get(captions).to(self.run.device)
        with torch.set_grad_enabled(self.target.trains_text_encoder), self.run.weights.autocast():
            return self.text.conditioner.encode(captions)

    def _close_step(self, batch, epoch: int, grad_norm, seconds: float) -> float:
        """Count the optimizer step just taken; log it; validate, sample and save when due."""
        run, step = self.run, self.global_step + 1
        self.global_step = step
        step_loss = sum(self.micro) / len(self.micro)
        self.micro.clear()
        self.losses.append(step_loss)
        self.position = state.Position(step, epoch, batch.position + 1)
        if self.ema is not None:
            self.ema.update(self.target.ema_module(run.weights), step)
        lrs = self.lr_scheduler.get_last_lr()
        mean = self.progress.update(step_loss, lr=lrs[0], epoch=epoch + 1)
        if run.main:
            values = {"loss/current": step_loss, "loss/average": mean, "time/step_seconds": seconds}
            values.update({f"lr/{name}": lr for name, lr in zip(self.group_names, lrs)})
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            self.logger.log(step, values)
        if self.opts.validate_every_n_steps and step % self.opts.validate_every_n_steps == 0:
            self.validate(step)
        if self.schedule.after_step(step):
            self.sample(step)
        if self.policy.due_after_step(step, self.max_steps):
            self.save(self.step_stem(step), step, epoch + 1)
            if run.main:
                self.policy.prune_steps(step)
        return step_loss

    # ------------------------------------------------------------------ saving, validation, samples

    def save(self, stem: str, step: int, epoch: int, *, final: bool = False) -> None:
        """A save point: the target's file(s) from the main process, the training state from all."""
        from sdtune.train import optim

        run = self.run

        def save_model():
            with optim.eval_weights(self.optimizer):
                main = self.target.save(self.policy.model_path, stem, step=step, weights=run.weights,
                                        metadata=self._metadata(stem, step, epoch), ema=self.ema)
            self.outputs.append(main)
            run.note(f"saved {main}")

        run.weights.on_main(save_model)
        if self.opts.save_state and not final:
            self._save_state(self.policy.state_path(stem))
        run.accelerator.wait_for_everyone()

    def _save_state(self, directory: Path) -> None:
        state.save_state(self.run.accelerator, directory, self.position, self.run.options, self.ema, self.data.dataset,
                         self.history.record(self.losses, self.outputs, time.time() - self.run.started))

    def _metadata(self, stem: str, step: int, epoch: int) -> dict[str, str]:
        from sdtune.checkpoint import build_modelspec

        opts, settings = self.opts, self.settings
        w, h = (int(x) for x in settings["resolution"].split("x"))
        meta = build_modelspec(self.data.model.family, title=opts.metadata_title or stem, resolution=(w, h),
                               clip_skip=settings["clip_skip"],
                               training={"steps": step, "epochs": epoch, "seed": self.run.seed,
                                         "learning_rate": opts.learning_rate, **settings})
        meta.update(opts.modelspec_fields())
        return meta

    def validate(self, step: int) -> None:
        from sdtune.train import optim

        # decided alike on every process: the losses are recorded on the main one only, and a process
        # that skipped while another validated would leave that one waiting
        if not self.data.held_out or self.validated_step == step:
            return
        self.validated_step = step
        run = self.run

        def measure():
            with optim.eval_weights(self.optimizer), self.target.eval_view(run.weights) as (denoiser, encoder):
                encode = None if encoder is None else _encoder_call(self.text.conditioner, encoder)
                value = self.data.validator.loss(self.predictor, denoiser, encode, device=run.device)
            self.validation_losses.append((step, value))
            self.progress.write(f"validation loss at step {step}: {value:.6f}")
            self.logger.log(step, {"loss/validation": value})

        run.weights.on_main(measure)

    def sample(self, step: int, epoch: int | None = None) -> None:
        import dataclasses

        import torch

        from sdtune.train import optim, sampling
        from sdtune.train.setup import mem_eff_context

        if not self.prompts:
            return
        run, dtype = self.run, self.run.compute_dtype

        def draw():
            with optim.eval_weights(self.optimizer), mem_eff_context(self.opts), \
                    self.target.eval_view(run.weights) as (denoiser, _encoder):
                files = sampling.sample_images(dataclasses.replace(self.data.model, unet=denoiser),
                                               self.text.conditioner, self.prompts, sampler=self.opts.sample_sampler,
                                               out_dir=self.out_dir / "sample", name=self.name,
                                               tag=sampling.sample_tag(step=step, epoch=epoch), device=run.device,
                                               seed=run.seed, dtype=dtype if dtype != torch.float32 else None,
                                               progress=False)
            self.logger.log_images(step, "samples", list(files), [p.prompt for p in self.prompts])

        run.weights.on_main(draw)

    # ------------------------------------------------------------------ the end

    def _finish(self) -> TrainResult:
        from sdtune.data.plan import skipped_summary
        from sdtune.train import logs

        run, opts = self.run, self.opts
        if self.stopped or opts.save_state or opts.save_state_on_train_end:  # sd-scripts: --save_state alone too
            self._save_state(self.out_dir / f"{self.name}-state")
            run.note(f"training state saved to {self.out_dir / f'{self.name}-state'} (continue with --resume)")
        if run.world > 1:
            self._check_replicas()
        if not self.stopped:
            self.save(self.name, self.global_step, self.epochs_done, final=True)
        seconds = time.time() - run.started
        if run.main:
            report = self.text.conditioner.truncation_report()
            if report.count:
                run.note(str(report))
            skipped = self.plan.skipped + self.failures.skipped
            if self.failures.skipped:  # the plan's count, printed before training, did not include these
                run.note(f"note: {skipped_summary(skipped)} ({len(self.failures.skipped)} found while training)")
            whole = self.history.record(self.losses, self.outputs, seconds)  # every part of the run
            plot = logs.plot_loss(self.out_dir / f"{self.name}-loss.png", whole["steps"], whole["losses"]) \
                if whole["steps"] else None
            last = [v for v in whole["losses"][-20:] if v is not None]
            logs.write_summary(self.out_dir / f"{self.name}-train_summary.json", run.options, self.global_step, seconds,
                               sum(last) / len(last) if last else None, whole["outputs"],
                               steps_this_run=len(self.losses), epochs=self.epochs_done, stopped=self.stopped,
                               loss_plot=str(plot) if plot else None,
                               history=str(logs.write_history(self.out_dir / f"{self.name}-history.json", whole)),
                               resumed_from=opts.resume, seconds_whole_run=whole["seconds"],
                               unrecorded=self.history.note(), family=self.data.model.family.name,
                               trained=self.settings, skipped_images=[{"path": p, "reason": r} for p, r in skipped])
            self.logger.close()
        run.accelerator.end_training()
        # a run stopped early exits like a process killed by the signal would (130 for Ctrl-C), so that
        # scripts and schedulers see it did not finish; with no local signal another process asked
        exit_status = 128 + int(self.stop.signum or signal.SIGTERM) if self.stopped else 0
        return TrainResult(self.global_step, self.epochs_done, self.losses[-1] if self.losses else float("nan"),
                           seconds, self.outputs, self.losses, self.stopped, self.validation_losses, exit_status)

    def _check_replicas(self) -> None:
        """Data-parallel processes must end with the same weights; a difference means they drifted apart."""
        sums = self.run.weights.checksums(self.target.checksum_modules())
        same = len(set(sums)) == 1
        self.run.note(f"{self.target.label} weight checksum per process: {', '.join(f'{s:.17g}' for s in sums)} "
                      f"({'identical' if same else 'DIFFERENT: the processes drifted apart; please report this'})")

    # ------------------------------------------------------------------ building the run

    def _build(self) -> None:
        from sdtune.train import compiled, sampling
        from sdtune.train.predict import Predictor
        from sdtune.train.prompts import load_prompts
        from sdtune.train.setup import mem_eff_context

        opts, run = self.opts, self.run
        self.schedule = sampling.SampleSchedule(opts.sample_every_n_steps, opts.sample_every_n_epochs,
                                                opts.sample_at_first)
        for line in sampling.check_sampling_options(opts.sample_prompts, opts.sample_every_n_steps,
                                                    opts.sample_every_n_epochs, opts.sample_at_first):
            run.note(f"note: {line}")
        self.prompts = load_prompts(opts.sample_prompts) if opts.sample_prompts and self.schedule.enabled else []
        self.data = data = build.load_data(run)
        self.plan, self.cache, self.vae = data.plan, data.cache, data.vae
        self.scaling = data.model.vae.config.scaling_factor
        self.target.place(data.model, device=run.device, compute_dtype=run.compute_dtype, note=run.note)
        if opts.torch_compile:
            compiled.compile_in_place(self.target.denoiser, opts.dynamo_backend, run.note)
        self.text = build.build_text(run, data, self.target)
        self.predictor = Predictor(data.objective, run.weights.autocast, lambda: mem_eff_context(opts))
        self._build_optimizer()
        self._resume()
        self._build_outputs()
        self._build_loader()

    def _build_optimizer(self) -> None:
        import torch

        from sdtune.train import cpu_speed, fused, optim, schedules
        from sdtune.train.accel import allow_fp16_gradients
        from sdtune.train.ema import EMA

        opts, run, target = self.opts, self.run, self.target
        accum = opts.gradient_accumulation_steps
        self.steps_per_epoch = self.plan.steps_per_epoch(run.world, accum)
        self.max_steps = opts.max_train_epochs * self.steps_per_epoch if opts.max_train_epochs else opts.max_train_steps
        self.epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        if run.resume_record:
            state.check_remaining(run.resume_record, self.max_steps, opts.resume)
        groups = target.param_groups()
        self.group_names = [g["name"] for g in groups]
        optimizer = optim.build_optimizer(opts.effective_optimizer, groups, opts.learning_rate, opts.optimizer_args,
                                          note=run.note)
        cpu_speed.fast_cpu_step(optimizer)
        if run.device.type == "cpu":
            cpu_speed.keep_freed_memory()
        if opts.full_bf16:  # the same rounding draws on every process keeps the replicas identical
            rounding = torch.Generator(run.device).manual_seed(seeds.derive(run.seed, seeds.BF16_ROUNDING))
            optim.add_bf16_stochastic_rounding(optimizer, rounding)
        lr_scheduler = schedules.scheduler_from_options(opts, optimizer, total_steps=self.max_steps,
                                                        num_processes=run.world, note=run.note)
        *modules, self.optimizer, self.lr_scheduler = run.weights.prepare(*target.modules(), optimizer, lr_scheduler)
        target.adopt(modules)
        if run.weights.zero3:
            run.note(run.weights.zero3_split())
        if target.conditioning_encoder is not None:
            self.text.conditioner.text_encoder = target.conditioning_encoder
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.fused = fused.attach(self.optimizer, opts.max_grad_norm, run.world) if opts.fused_backward_pass else None
        if opts.full_fp16:
            allow_fp16_gradients(run.accelerator)
        self.ema = None
        if opts.ema:
            averaged = target.ema_module(run.weights)
            if averaged is None:
                raise UserError(f"--ema is not available when training a {target.label}", where="--ema",
                                fix="Drop --ema.")
            self.ema = EMA(averaged, opts.ema_decay, opts.ema_update_every, device="cpu" if opts.ema_cpu else None)

    def _resume(self) -> None:
        from sdtune.train import history as run_history

        opts, run = self.opts, self.run
        self.position = state.Position()
        if opts.resume:
            self.position = state.load_state(run.accelerator, opts.resume, self.ema)
            if run.length_changed:
                state.follow_new_length(self.lr_scheduler)
            p = self.position
            run.note(f"resumed from {opts.resume}: step {p.global_step}, epoch {p.epoch + 1}, batch {p.batch}")
        start = opts.initial_position(self.steps_per_epoch, self.max_steps,
                                      self.position.global_step if opts.resume else None)
        if start:  # --initial_step / --initial_epoch: counters only, no data replayed
            self.position = state.Position(start[0], start[1], 0)
            run.note(start[2])
        # the loss at every step and the saves of the whole run, continued from the state's record
        self.history = run_history.RunHistory.begin(self.position.global_step, opts.resume, start and (
            "--initial_step" if opts.initial_step is not None else "--initial_epoch"))
        if self.history.note():
            run.note(f"note: {self.history.note()}")
        self.global_step, self.losses, self.micro, self.stopped = self.position.global_step, [], [], False
        self.epochs_done = self.position.epoch  # for the summary and ModelSpec: epochs begun, as before
        self.validation_losses: list[tuple[int, float]] = []
        self.validated_step: int | None = None

    def _build_outputs(self) -> None:
        from sdtune.train import logs
        from sdtune.train.saving import SavePolicy, default_names, epoch_stem, step_stem

        opts, run = self.opts, self.run
        self.name, epoch_name, step_name = default_names(opts.output_name)
        self.epoch_stem = lambda epoch: epoch_stem(epoch_name, epoch)
        self.step_stem = lambda step: step_stem(step_name, step)
        self.out_dir = Path(opts.output_dir)
        self.policy = SavePolicy(self.name, self.out_dir, self.target.save_format(opts),
                                 opts.save_every_n_epochs_for(self.epochs), opts.save_every_n_steps,
                                 opts.save_last_n_epochs, opts.save_last_n_steps, opts.save_last_n_epochs_state,
                                 opts.save_last_n_steps_state, opts.save_state, epoch_name, step_name)
        # what was trained, for ModelSpec and the summary
        self.settings = logs.trained_settings(self.plan.datasets, clip_skip=self.text.conditioner.layer.clip_skip,
                                              num_processes=run.world,
                                              gradient_accumulation_steps=opts.gradient_accumulation_steps)
        self.outputs: list[Path] = []
        self.logger = logs.RunLogger(opts.logging_dir, opts.log_with, logs.default_run_name(opts.log_prefix),
                                     run.options if opts.log_config else None,
                                     tracker_name=opts.resolved("log_tracker_name"),
                                     init_kwargs=build.tracker_init(opts, logs),
                                     wandb_api_key=opts.wandb_api_key) if run.main else None

    def _build_loader(self) -> None:
        from sdtune.console import note as console_note
        from sdtune.data import BucketBatchSampler, make_loader
        from sdtune.data.failures import LoadFailures
        from sdtune.train import logs

        run = self.run
        self.sampler = BucketBatchSampler(self.plan, seed=run.seed, rank=run.rank, world_size=run.world)
        self.loader = make_loader(self.plan, self.sampler, self.cache)
        self.last_batch = self.plan.batches_per_epoch(run.world) - 1
        self.progress = progress = logs.TrainProgress(self.max_steps, initial=self.global_step, disable=not run.main)

        def warn(line: str) -> None:  # on a line of its own above the progress bar, not inside it
            with type(progress.bar).external_write_mode():
                console_note(f"warning: {line}")  # stdout, like every line of ours

        self.failures = LoadFailures(self.plan, self.loader.dataset, strict=self.opts.strict,
                                     warn=warn if run.main else None, before_stop=progress.close)


def _encoder_call(conditioner, text_encoder):
    """The conditioning function on the unwrapped (not DDP) text encoder: a DDP forward on one process
    alone would wait for the others."""
    def encode(captions):
        wrapped, conditioner.text_encoder = conditioner.text_encoder, text_encoder
        try:
            return conditioner.encode(captions)
        finally:
            conditioner.text_encoder = wrapped

    return encode


# The trainers of distributed runs that ended in this process, kept until it exits (see `train`).
_ENDED_DISTRIBUTED: list[Trainer] = []


def train(opts: TrainOptions, target=None) -> TrainResult:
    """Train as `opts` say; `target` (a train.target.TrainingTarget) replaces the one they ask for.

    A distributed run's trainer is not freed when it returns. Freeing it frees the prepared models, and
    with them the last reference to the gloo process group (accelerate's end_training has already
    destroyed the group, but not the object), whose C++ destructor then waits, holding Python's lock,
    for a worker thread that needs that lock to free a tensor: the process hung there, after its final
    save, in about one launch of ten on the test machine (a rank's stack showed the main thread in this
    function's return and a thread without Python frames). The commands end right after (`cli.run_and_exit`
    leaves out the teardown), so the objects go with the process instead."""
    trainer = Trainer(opts, target)
    try:
        return trainer.fit()
    finally:
        run = getattr(trainer, "run", None)
        if run is not None and run.world > 1:
            _ENDED_DISTRIBUTED.append(trainer)
