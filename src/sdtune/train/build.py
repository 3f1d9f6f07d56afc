"""Building what a training run needs, in the order the trainer asks for it.

`start` checks the outputs and the resume state and makes the accelerator; `load_data` reads the
model and plans the data (the data first: it is cheap, and the likelier mistakes are there), splits
off the validation set and fills the latent cache; `build_text` makes the one conditioning path
shared with sampling. Each returns a small record, so the trainer reads as the training itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from sdtune.train.options import LoggingOptions, TrainOptions


@dataclass
class RunContext:
    """The run's process-wide facts."""

    opts: TrainOptions
    accelerator: Any
    weights: Any  # train.weights.Weights
    note: Callable[[str], None]  # prints on the main process only
    seed: int
    options: dict[str, Any]  # the public options (without secrets): for states, summary and tracker
    resume_record: dict[str, Any] | None
    length_changed: str | None  # the note when the resumed run's length changed
    started: float
    lock: Any = None  # train.world.OutputLock on the main process: no second training writes to the folder

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self):
        return self.accelerator.device

    @property
    def compute_dtype(self):
        """The forward pass's precision (the mixed-precision dtype, else float32)."""
        from sdtune.train.setup import weight_dtype

        return weight_dtype(self.accelerator)


@dataclass
class DataParts:
    model: Any  # sdtune.model.SDModel, float32 as loaded
    plan: Any  # DatasetPlan of the training images
    held_out: list  # validation samples
    objective: Any  # DiffusionObjective
    validator: Any  # validation.Validator on the main process when images are held out, else None
    cache: Any  # LatentCache or None
    vae: Any  # the VAE's compute copy when images are encoded at every step, else None
    dataset: dict[str, Any]  # the plan's fingerprint, stored in states


@dataclass
class TextParts:
    conditioner: Any  # TextConditioner
    caption_options: list  # CaptionOptions per subset
    text_cache: Any  # TextEmbeddingCache or None


def start(opts: TrainOptions) -> RunContext:
    from sdtune.config import public_options
    from sdtune.console import note as console_note, setup_console
    from sdtune.train import state, world
    from sdtune.train.preflight import check_outputs
    from sdtune.train.setup import make_accelerator
    from sdtune.train.weights import Weights

    if os.environ.get("RANK", "0") == "0":  # one process tries (another's clean-up would race with it)
        check_outputs(opts)  # an unwritable output stops the run now, not at the first save
    setup_console(opts.console_log_level, opts.console_log_file, opts.console_log_simple)
    started = time.time()
    accelerator = make_accelerator(opts, console_note)
    # the processes are the ones the launcher started, and no other training writes to the folder
    lock = world.start(accelerator, opts, deepspeed=opts.deepspeed)
    if accelerator.num_processes > 1:
        console_note(world.describe(accelerator))  # every process: a wrong world shows in any log
    note = console_note if accelerator.is_main_process else (lambda *a, **k: None)
    options = public_options(opts)
    try:
        resume_record = state.read_state(opts.resume) if opts.resume else None
        length_changed = None
        if resume_record:  # refuse a mismatched resume before any expensive work
            state.check_compatible(resume_record, options, opts.resume_allow_changes, opts.resume)
            if length_changed := state.length_change_note(resume_record, options):
                note(f"note: {length_changed}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return RunContext(opts, accelerator, Weights(accelerator), note, opts.effective_seed, options, resume_record,
                      length_changed, started, lock)


def load_data(run: RunContext) -> DataParts:
    import dataclasses

    import torch

    from sdtune.checkpoint import load_vae
    from sdtune.train import state, validation
    from sdtune.train.noise import DiffusionObjective
    from sdtune.train.setup import compute_copy

    opts, note, device = run.opts, run.note, run.device
    model, plan = model_and_plan(opts, run.seed, torch.float32, run.main)  # float32 master weights
    if opts.vae:  # as sd-scripts: it caches, encodes, samples and is saved in place of the model's own
        model = dataclasses.replace(model, vae=load_vae(opts.vae, like=model.vae, dtype=torch.float32))
        note(f"vae: {opts.vae} (for the latents, the samples and the saved model)")
    plan, held_out = validation.split_plan(plan, opts.validation_split, opts.effective_validation_seed)
    validation.check_options(opts, held_out)
    plan.check_fill(run.world, opts.gradient_accumulation_steps)
    # the objective owns the (possibly rescaled) noise schedule
    objective = DiffusionObjective.from_options(opts, model.scheduler_config, model.family.prediction_type)
    for line in objective.notes:
        note(f"note: {line}")
    vae_dtype = torch.float32 if opts.no_half_vae or device.type == "cpu" else run.compute_dtype
    model.vae.requires_grad_(False).eval()
    # a compute copy only where images are encoded at every step or for validation; cached latents
    # are encoded from the model's own VAE below
    needs_vae = not opts.caches_latents or (held_out and run.main)
    vae = compute_copy(model.vae, device, vae_dtype) if needs_vae else None
    validator = None
    if held_out and run.main:  # the other processes wait while the main one validates
        validator = validation.Validator(plan, held_out, objective, max_batches=opts.max_validation_steps,
                                         seed=opts.effective_validation_seed)
        validator.encode_images(vae, device, model.vae.config.scaling_factor, strict=opts.strict)
        note(validator.describe())
    cache = None
    if opts.caches_latents:
        shard = run.world > 1 and opts.cache_latents_to_disk
        # from the model's own full-precision VAE, with the cache's own precision rule (float16 on a
        # GPU unless --no_half_vae), exactly as `sdtune cache` encodes: its entries are then reused
        # and the latents never come from weights rounded twice (e.g. bf16, then fp16)
        cache = _latent_cache(run, plan, model.vae, device, shard)
        plan = cache.plan
        if vae is model.vae:
            vae.to("cpu")
        vae = None  # a compute copy leaves the accelerator; sampling uses the model's own VAE
    note(plan.summary(run.world, opts.gradient_accumulation_steps))
    dataset = state.dataset_fingerprint(plan)
    record = run.resume_record
    if record and not state.check_dataset(record, dataset, opts.resume_allow_changes, opts.resume):
        note("note: the dataset changed since the state was saved; the resumed epoch's order differs")
    return DataParts(model, plan, held_out, objective, validator, cache, vae, dataset)


def _latent_cache(run: RunContext, plan, vae, device, shard: bool):
    """The latent cache; with `shard` each process checks and encodes only its share of the entries
    and the processes exchange where their entries are, so that on shared storage none reads the
    others' files."""
    from sdtune.data.latent_cache import LatentCache, ensure_latent_cache
    from sdtune.train.weights import raise_together

    if not shard:
        return ensure_latent_cache(plan, vae, device=device, progress=run.main, log=run.note)
    mine, failure = None, None
    try:
        mine = ensure_latent_cache(plan, vae, device=device, rank=run.rank, world_size=run.world,
                                   progress=run.main, log=run.note)
    except Exception as exc:  # a bad image under --strict on one process stops all of them
        failure = exc
    raise_together(failure, run.accelerator)
    from accelerate.utils import gather_object

    shares = gather_object([mine.share()])
    if LatentCache.shares_visible(shares):
        return LatentCache.from_shares(plan, shares, mine.dtype)
    # machine-local copies of the cache: each machine encodes, for itself, what the others wrote elsewhere
    return ensure_latent_cache(plan, vae, device=device, progress=run.main, log=run.note)


def build_text(run: RunContext, data: DataParts, target) -> TextParts:
    """The one path from caption to conditioning, shared with sampling, on the target's encoder."""
    from sdtune.text import CaptionOptions, TextConditioner
    from sdtune.text.encode import clip_skip_note
    from sdtune.train.setup import text_embedding_cache

    opts, model, note = run.opts, data.model, run.note
    conditioner = TextConditioner(model.tokenizer, target.text_encoder, model.family,
                                  max_token_length=opts.max_token_length, clip_skip=opts.clip_skip,
                                  weighted=opts.weighted_captions)
    note(f"text: {conditioner.layer.description}")
    clip_note = clip_skip_note(model.family, model.text_encoder.config.num_hidden_layers, opts.clip_skip)
    if clip_note:
        note(f"note: {clip_note}")
    caption_options = [CaptionOptions.from_dict(s.caption_options, where=f"subset {i + 1}")
                       for i, s in enumerate(data.plan.subsets)]
    if data.validator is not None and not target.trains_text_encoder:
        with run.accelerator.autocast():
            data.validator.encode_captions(conditioner.encode)
    text_cache = None
    if not target.trains_text_encoder:
        text_cache = text_embedding_cache(data.plan, conditioner, caption_options, opts, run.accelerator, note)
    if text_cache is not None:
        target.text_encoder.to("cpu")  # idle from here on; sampling moves it back for the duration
    return TextParts(conditioner, caption_options, text_cache)


def model_and_plan(opts: TrainOptions, seed: int, dtype, verbose: bool):
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


def tracker_init(opts: LoggingOptions, logs) -> dict:
    init = logs.load_tracker_config(opts.log_tracker_config) if opts.log_tracker_config else {}
    if opts.wandb_run_name:
        init.setdefault("wandb", {})["name"] = opts.wandb_run_name
    return init
