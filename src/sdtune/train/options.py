"""The training command's options: sd-scripts' fine_tune.py flag names, typed and validated.

Grouped by area (model, training, noise and loss, saving, EMA, logging); `TrainOptions` combines
them with the dataset options of sdtune.data. No torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from sdtune.config import Field, Options
from sdtune.data.options import DatasetOptions
from sdtune.hypernetwork.options import HypernetworkOptions
# The defaults that the optimizer and schedule builders apply are theirs, declared here by reference,
# so that the builders need not import the options (which import their checks).
from sdtune.train.optim import DEFAULT_OPTIMIZER
from sdtune.train.schedules import DEFAULT_NUM_CYCLES, DEFAULT_POWER, LR_SCHEDULERS
from sdtune.train.zero import DeepSpeedOptions, check_training as check_deepspeed

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
    max_train_steps: int = Field(1600, "number of optimizer steps", group="Training", ge=1, resume="length")
    max_train_epochs: int | None = Field(None, "number of epochs (overrides --max_train_steps)", group="Training", ge=1,
                                         resume="length")
    seed: int | None = Field(None, "random seed: the same seed gives the same run", group="Training", implied=42)
    gradient_accumulation_steps: int = Field(1, "micro-batches per optimizer step", group="Training", ge=1)
    max_grad_norm: float = Field(1.0, "clip the gradient norm to this (0 disables)", group="Training", ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", "mixed precision for the forward pass", group="Training")
    optimizer_type: str | None = Field(
        None, "optimizer: AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, "
        "AdamWScheduleFree, ... or a class path such as torch.optim.RAdam", group="Training", implied=DEFAULT_OPTIMIZER)
    optimizer_args: list[str] = Field([], "optimizer arguments as key=value", group="Training", metavar="K=V")
    use_8bit_adam: bool = Field(False, "same as --optimizer_type AdamW8bit (needs bitsandbytes)", group="Training")
    use_lion_optimizer: bool = Field(False, "same as --optimizer_type Lion (needs lion-pytorch)", group="Training")
    train_text_encoder: bool = Field(False, "also train the text encoder", group="Training")
    learning_rate_te: float | None = Field(None, "learning rate of the text encoder (default: --learning_rate)",
                                           group="Training", gt=0)
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("constant", "learning-rate schedule", group="Training")
    lr_warmup_steps: float | str = Field(0.0, "warm-up: a step count, a fraction < 1 of the steps, or 'N%'", group="Training")
    lr_scheduler_num_cycles: int | None = Field(
        None, "cosine_with_restarts: number of cycles; cosine_with_min_lr, warmup_stable_decay: half-waves of the "
        "cosine", group="Training", ge=1, implied=DEFAULT_NUM_CYCLES)
    lr_scheduler_power: float | None = Field(None, "polynomial: power of the decay", group="Training", gt=0, implied=DEFAULT_POWER)
    lr_decay_steps: float | str | None = Field(
        None, "warmup_stable_decay: decay steps at the end, a step count, a fraction < 1 of the steps, or 'N%'",
        group="Training", implied=0)
    lr_scheduler_timescale: int | None = Field(
        None, "inverse_sqrt: timescale in steps (default: the warm-up steps, or 10000 without warm-up)",
        group="Training", ge=1)
    lr_scheduler_min_lr_ratio: float | None = Field(
        None, "cosine_with_min_lr (required there), warmup_stable_decay: the lowest learning rate as a fraction of "
        "--learning_rate", group="Training", ge=0, le=1)
    lr_scheduler_type: str | None = Field(
        None, "a scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler name (StepLR) or a class path "
        "(mypkg.MySchedule); its steps are optimizer steps", group="Training", metavar="CLASS")
    lr_scheduler_args: list[str] = Field(
        [], "scheduler arguments as key=value: for --lr_scheduler_type, or extra ones of the --lr_scheduler function "
        "(piecewise_constant: step_rules=1:100,0.5:200,0.1)", group="Training", metavar="K=V")
    full_fp16: bool = Field(False, "U-Net (and trained text encoder) weights in float16, with a gradient scaler; needs "
                            "--mixed_precision fp16 and a CUDA GPU", group="Training")
    full_bf16: bool = Field(False, "U-Net (and trained text encoder) weights in bfloat16, updated with stochastic "
                            "rounding; needs --mixed_precision bf16", group="Training")
    fused_backward_pass: bool = Field(False, "step each parameter as soon as its gradient is complete and free that "
                                      "gradient (saves the memory of the whole model's gradients); AdamW, AdamW8bit "
                                      "or Adafactor, no gradient accumulation; --max_grad_norm then clips each "
                                      "parameter's gradient on its own, as in sd-scripts", group="Training")
    torch_compile: bool = Field(False, "compile the U-Net with torch.compile (faster steps after a slower first one)",
                                group="Training")
    dynamo_backend: Literal["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                            "fx2trt", "onnxrt", "tensort", "ipex", "tvm"] | None = Field(
        None, "torch.compile backend for --torch_compile (default inductor; needs a C++ compiler on the CPU)",
        group="Training")
    gradient_checkpointing: bool = Field(False, "recompute activations in the backward pass to save memory", group="Training")
    vram: float | None = Field(None, "with --dry_run: the accelerator's memory in GiB; says whether the run fits and "
                               "the cheapest change that would make it fit", group="Training", gt=0, metavar="GB")
    sdpa: bool = Field(False, "attention through torch's scaled_dot_product_attention (the default anyway)", group="Training")
    xformers: bool = Field(False, "attention through xformers (falls back to torch SDPA, with a note, when not installed)",
                           group="Training")
    diffusers_xformers: bool = Field(False, "same as --xformers, through diffusers' hook", group="Training")
    mem_eff_attn: bool = Field(False, "force SDPA's memory-efficient kernel (CUDA)", group="Training")
    clip_skip: int | None = Field(None, "condition on the text encoder's N-th layer from the end (2 = penultimate)", group="Training", ge=1)
    max_token_length: Literal[75, 150, 225] | None = Field(None, "caption length in tokens: 75, 150 or 225", group="Training")
    weighted_captions: bool = Field(False, "read A1111 weights in captions: (word:1.2), (word), [word]", group="Training")
    ddp_timeout: int | None = Field(None, "minutes a process waits for the others in a collective before the run "
                                    "fails (default: torch's, 30 for gloo, 10 for NCCL)", group="Distributed", ge=1,
                                    resume="may_change")
    ddp_gradient_as_bucket_view: bool = Field(False, "DDP keeps the gradients in its all-reduce buckets (less memory, "
                                              "no copy)", group="Distributed", resume="may_change")
    ddp_static_graph: bool = Field(False, "tell DDP that the graph and the unused parameters are the same at every "
                                   "step (faster; a changing graph gives an error)", group="Distributed", resume="may_change")

    @field_validator("optimizer_args")
    @classmethod
    def _kv(cls, value: list[str]) -> list[str]:
        from sdtune.train.optim import parse_optimizer_args

        parse_optimizer_args(value)
        return value

    @field_validator("lr_scheduler_args")
    @classmethod
    def _scheduler_kv(cls, value: list[str]) -> list[str]:
        from sdtune.train.schedules import parse_scheduler_args

        parse_scheduler_args(value)
        return value

    @model_validator(mode="after")
    def _schedule(self):
        from sdtune.train.schedules import check_schedule_options

        check_schedule_options(self)
        return self

    @model_validator(mode="after")
    def _full_precision(self):
        from sdtune.errors import UserError

        if self.full_fp16 and self.full_bf16:
            raise UserError("--full_fp16 and --full_bf16 contradict each other", fix="Keep one of them.")
        for flag, wanted in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
            if getattr(self, flag) and self.mixed_precision != wanted:
                raise UserError(f"needs --mixed_precision {wanted} (got {self.mixed_precision})", where=f"--{flag}",
                                fix=f"Add --mixed_precision {wanted}.")
        return self

    @model_validator(mode="after")
    def _compile(self):
        from sdtune.train.compiled import check_options

        check_options(self.torch_compile, self.dynamo_backend)
        return self

    @model_validator(mode="after")
    def _fused(self):
        from sdtune.train.fused import check_options
        from sdtune.train.optim import resolve_optimizer_name

        if self.fused_backward_pass:
            check_options(resolve_optimizer_name(self.optimizer_type, self.use_8bit_adam, self.use_lion_optimizer),
                          self.gradient_accumulation_steps, self.mixed_precision)
        return self


class NoiseLossOptions(Options):
    noise_offset: float | None = Field(None, "offset noise strength, e.g. 0.05 (learns overall brightness)", group="Noise and loss", ge=0)
    noise_offset_random_strength: bool = Field(False, "use noise_offset * U(0,1), one draw per batch", group="Noise and loss")
    adaptive_noise_scale: float | None = Field(None, "add this x |mean of the latents| to --noise_offset, per image and channel", group="Noise and loss")
    multires_noise_iterations: int | None = Field(None, "levels of multires (pyramid) noise, e.g. 6", group="Noise and loss", ge=1)
    multires_noise_discount: float | None = Field(None, "weight factor per pyramid level", group="Noise and loss", gt=0,
                                                  le=1, implied=0.3)
    ip_noise_gamma: float | None = Field(None, "input perturbation strength, e.g. 0.1 (the target keeps the plain noise)", group="Noise and loss", ge=0)
    ip_noise_gamma_random_strength: bool = Field(False, "use ip_noise_gamma * U(0,1), one draw per batch", group="Noise and loss")
    min_timestep: int | None = Field(None, "lowest training timestep", group="Noise and loss", ge=0, le=999, implied=0)
    max_timestep: int | None = Field(None, "train timesteps below this (default: the model's training timesteps, 1000)", group="Noise and loss", ge=0, le=1000)
    zero_terminal_snr: bool = Field(False, "rescale the noise schedule to zero SNR at the last step (for v-prediction)", group="Noise and loss")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field("l2", "loss function", group="Noise and loss")
    huber_schedule: Literal["constant", "exponential", "snr"] | None = Field(None, "how the Huber threshold follows the timestep", group="Noise and loss",
        implied="snr")
    huber_c: float | None = Field(None, "Huber threshold", group="Noise and loss", gt=0, implied=0.1)
    huber_scale: float | None = Field(None, "Huber threshold scale", group="Noise and loss", gt=0, implied=1.0)
    min_snr_gamma: float | None = Field(None, "min-SNR loss weighting, e.g. 5", group="Noise and loss", gt=0)
    scale_v_pred_loss_like_noise_pred: bool = Field(False, "v-prediction: weight the loss by SNR/(SNR+1) like an epsilon loss", group="Noise and loss")
    v_pred_like_loss: float | None = Field(None, "epsilon models: add a v-prediction-like loss term of this weight", group="Noise and loss", gt=0)
    debiased_estimation_loss: bool = Field(False, "weight the loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1))", group="Noise and loss")


class RunOptions(Options):
    save_every_n_epochs: int | None = Field(None, "save the model every N epochs", group="Saving", ge=1,
                                            resume="may_change")
    save_n_epoch_ratio: int | None = Field(
        None, "save at least N times over the run: every max(1, epochs // N) epochs (0 = off)", group="Saving", ge=0,
        resume="may_change")
    save_every_n_steps: int | None = Field(None, "save the model every N steps", group="Saving", ge=1,
                                           resume="may_change")
    save_last_n_epochs: int | None = Field(None, "keep only the last N epoch saves", group="Saving", ge=1,
                                           resume="may_change")
    save_last_n_steps: int | None = Field(None, "keep only the step saves of the last N steps", group="Saving", ge=1,
                                          resume="may_change")
    save_state: bool = Field(False, "write the training state (for --resume) next to each save", group="Saving",
                             resume="may_change")
    save_state_on_train_end: bool = Field(False, "write the training state at the end of training", group="Saving",
                                          resume="may_change")
    save_last_n_epochs_state: int | None = Field(None, "keep only the last N epoch states (default: as models)", group="Saving", ge=1,
                                                 resume="may_change")
    save_last_n_steps_state: int | None = Field(None, "keep only the states of the last N steps (default: as models)", group="Saving", ge=1,
                                                resume="may_change")
    resume: str | None = Field(None, "continue from a state folder written by --save_state", group="Saving", metavar="DIR",
                               resume="may_change")
    resume_allow_changes: bool = Field(False, "resume even if options that change training differ", group="Saving",
                                       resume="may_change")
    # where a run starts counting may change: a state saved by a run started with --initial_step resumes without it
    initial_epoch: int | None = Field(
        None, "count epochs from N (1 = the first): training starts at epoch N from its first batch, the step "
        "counter at (N-1) x steps per epoch; the learning-rate schedule starts over unless --resume", group="Saving", ge=1,
        resume="may_change")
    initial_step: int | None = Field(
        None, "count steps from N: training starts at step N, in the epoch that holds it, from that epoch's first "
        "batch (no data is skipped); the learning-rate schedule starts over unless --resume", group="Saving", ge=0,
        resume="may_change")
    ema: bool = Field(False, "keep an exponential moving average of the U-Net weights", group="EMA")
    ema_decay: float = Field(0.9999, "EMA decay per update", group="EMA", gt=0, lt=1)
    ema_update_every: int = Field(1, "update the EMA every N optimizer steps", group="EMA", ge=1)
    ema_cpu: bool = Field(False, "keep the EMA weights in CPU memory", group="EMA")
    save_ema: bool = Field(False, "save the EMA weights as the model (else they are saved beside it as <name>-ema)", group="EMA",
                           resume="may_change")
    validation_split: float = Field(0.0, "hold out this fraction of each subset's images for a validation loss "
                                    "(a dataset's own validation_split wins)", group="Validation", ge=0, lt=1)
    validation_seed: int | None = Field(None, "seed of the validation split and noise (default: --seed)", group="Validation")
    validate_every_n_steps: int | None = Field(None, "compute the validation loss every N optimizer steps", group="Validation", ge=1,
                                               resume="may_change")
    validate_every_n_epochs: int | None = Field(None, "compute the validation loss every N epochs (default: every epoch)",
                                                group="Validation", ge=1, resume="may_change")
    max_validation_steps: int | None = Field(None, "use at most N held-out batches per validation", group="Validation", ge=1,
                                             resume="may_change")


class SamplingOptions(Options):
    sample_every_n_steps: int | None = Field(None, "generate sample images every N optimizer steps (0 = off)", group="Sampling", ge=0,
                                             resume="may_change")
    sample_every_n_epochs: int | None = Field(None, "generate sample images every N epochs (overrides --sample_every_n_steps)", group="Sampling", ge=0,
                                              resume="may_change")
    sample_at_first: bool = Field(False, "generate sample images before the first step", group="Sampling",
                                  resume="may_change")
    sample_prompts: str | None = Field(None, "prompt file for sample images (.txt, .toml or .json)", group="Sampling", metavar="FILE",
                                       resume="may_change")
    sample_sampler: str = Field("ddim", "sampler for sample images (ddim, euler_a, dpmsolver++, dpm++_2m_karras, ...)", group="Sampling",
                                resume="may_change")

    @field_validator("sample_sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        from sdtune.train.samplers import normalize_sampler  # no torch

        return normalize_sampler(value)


class LoggingOptions(Options):
    logging_dir: str | None = Field(None, "write logs here (TensorBoard unless --log_with says otherwise)", group="Logging", metavar="DIR",
                                    resume="may_change")
    log_with: Literal["tensorboard", "wandb", "all"] | None = Field(None, "trackers (default: tensorboard when --logging_dir is given)", group="Logging",
                                                                    resume="may_change")
    log_prefix: str | None = Field(None, "prefix of the run folder under --logging_dir", group="Logging",
                                   resume="may_change")
    log_tracker_name: str | None = Field(None, "TensorBoard subfolder and wandb project", group="Logging",
                                         implied="finetuning")
    log_tracker_config: str | None = Field(None, "TOML with [wandb] / [tensorboard] init arguments", group="Logging", metavar="FILE")
    log_config: bool = Field(False, "record the options (without secrets) in the tracker", group="Logging")
    wandb_run_name: str | None = Field(None, "wandb run name", group="Logging", resume="may_change")
    wandb_api_key: str | None = Field(
        None, "wandb API key (prefer the WANDB_API_KEY environment variable); never written to a file nor printed",
        group="Logging", secret=True)
    console_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = Field(
        None, "hide lines below this level: sdtune's (its notes are warnings), the libraries' and Python warnings",
        group="Logging", resume="may_change", implied="INFO")
    console_log_file: str | None = Field(
        None, "append the log lines to this file instead of the terminal (the progress bar stays)", group="Logging",
        metavar="FILE", resume="may_change")
    console_log_simple: bool = Field(False, "plain log lines: the libraries' on stdout with sdtune's; in "
                                     "--console_log_file the message without time and level", group="Logging",
                                     resume="may_change")


class SavingOptions(Options):
    output_dir: str | None = Field(None, "folder for the trained model", group="Saving", metavar="DIR",
                                   resume="may_change")
    output_name: str | None = Field(None, "file name of the trained model, without extension", group="Saving", implied="last",
                                    resume="may_change")
    save_model_as: Literal["ckpt", "safetensors", "diffusers", "diffusers_safetensors"] = Field(
        "safetensors", "format of the saved model (diffusers* write a folder)", group="Saving", resume="may_change")
    save_precision: Literal["float", "fp16", "bf16"] | None = Field(
        None, "dtype of the saved weights (default: as trained, float32)", group="Saving", resume="may_change")
    use_safetensors: bool = Field(
        False, "sd-scripts' legacy flag: safetensors serialisation (with --save_model_as diffusers: diffusers_safetensors)",
        group="Saving", resume="may_change")
    metadata_title: str | None = Field(None, "ModelSpec title (default: the output name)", group="Saving",
                                       resume="may_change")
    metadata_author: str | None = Field(None, "ModelSpec author", group="Saving", resume="may_change")
    metadata_description: str | None = Field(None, "ModelSpec description", group="Saving", resume="may_change")
    metadata_license: str | None = Field(None, "ModelSpec license", group="Saving", resume="may_change")
    metadata_tags: str | None = Field(None, "ModelSpec tags, comma-separated", group="Saving", resume="may_change")
    metadata_usage_hint: str | None = Field(None, "ModelSpec usage hint (a very short how-to)", group="Saving",
                                            resume="may_change")
    metadata_thumbnail: str | None = Field(None, "ModelSpec thumbnail: an image file (stored as a data URL) or a data "
                                           "URL", group="Saving", metavar="FILE", resume="may_change")
    metadata_merged_from: str | None = Field(None, "ModelSpec: the models this one was merged from", group="Saving",
                                             resume="may_change")
    metadata_trigger_phrase: str | None = Field(None, "ModelSpec trigger phrase", group="Saving", resume="may_change")
    metadata_preprocessor: str | None = Field(None, "ModelSpec preprocessor", group="Saving", resume="may_change")
    metadata_is_negative_embedding: str | None = Field(None, "ModelSpec is_negative_embedding", group="Saving",
                                                       resume="may_change")

    @field_validator("output_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or "\\" in value):
            raise ValueError("must be a plain file name without folders")
        return value

    @field_validator("metadata_thumbnail")
    @classmethod
    def _thumbnail(cls, value: str | None) -> str | None:
        from pathlib import Path

        if value and not value.startswith("data:") and not Path(value).is_file():
            raise ValueError(f"{value} is neither an image file nor a data: URL")
        return value

    def modelspec_fields(self) -> dict[str, str]:
        """The ModelSpec keys the metadata_* options set (a thumbnail file becomes a data URL, as in sd-scripts)."""
        import base64
        import mimetypes

        out = {}
        for key in ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                    "trigger_phrase", "preprocessor", "is_negative_embedding"):
            value = getattr(self, f"metadata_{key}")
            if key == "thumbnail" and value and not value.startswith("data:"):
                mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
                with open(value, "rb") as fh:
                    value = f"data:{mime};base64,{base64.b64encode(fh.read()).decode('ascii')}"
            if value:
                out[f"modelspec.{key}"] = value
        return out

    @property
    def save_format(self) -> str:
        """--save_model_as, with sd-scripts' --use_safetensors folded in."""
        if self.use_safetensors and self.save_model_as == "diffusers":
            return "diffusers_safetensors"
        return self.save_model_as

    def output_path(self, stem: str | None = None):
        from pathlib import Path

        name = stem or self.resolved("output_name")
        return Path(self.output_dir or ".") / (name + SAVE_EXTENSIONS[self.save_format])


class TrainOptions(ModelOptions, DatasetOptions, TrainingOptions, NoiseLossOptions, SavingOptions, RunOptions,
                   SamplingOptions, LoggingOptions, HypernetworkOptions, DeepSpeedOptions):
    """Everything `sdtune train` / `fine_tune.py` accepts."""

    @model_validator(mode="after")
    def _required(self):
        from sdtune.errors import UserError

        if (self.save_ema or self.ema_cpu) and not self.ema:
            raise UserError("--save_ema and --ema_cpu need --ema", fix="Add --ema.")

        if not self.pretrained_model_name_or_path:
            raise UserError("no model given", where="--pretrained_model_name_or_path",
                            fix="Pass a .safetensors/.ckpt file, a Diffusers folder or a hub id.")
        if self.use_safetensors and self.save_model_as == "ckpt":
            raise UserError("--use_safetensors contradicts --save_model_as ckpt", fix="Drop one of them.")
        if not self.output_dir and not self.dry_run:
            raise UserError("no output folder given", where="--output_dir", fix="Pass --output_dir DIR.")
        if self.vram is not None and not self.dry_run:
            raise UserError("--vram only says whether a planned run fits; it does not limit training", where="--vram",
                            fix="Add --dry_run to see the prediction, or drop --vram.")
        if self.vram is not None and self.hypernetwork_module:
            raise UserError("the memory planner predicts full fine-tuning, not hypernetwork training "
                            "(a frozen model and a small network take far less)", where="--vram",
                            fix="Drop --vram; --dry_run lists the hypernetwork's size.")
        if self.initial_step is not None and self.initial_epoch is not None:
            raise UserError("--initial_step and --initial_epoch both set where training starts", where="--initial_epoch",
                            fix="Keep one of them (sd-scripts lets --initial_step win).")
        if self.save_n_epoch_ratio and self.save_every_n_epochs:
            raise UserError("--save_n_epoch_ratio sets the epochs between saves, so --save_every_n_epochs would be "
                            "ignored", where="--save_n_epoch_ratio", fix="Keep one of them.")
        check_deepspeed(self)
        return self

    def initial_position(self, steps_per_epoch: int, max_steps: int, resumed_step: int | None = None):
        """(global step, 0-based epoch, note) where --initial_step / --initial_epoch start training;
        None without them. The epoch is the one holding the step, from its first batch."""
        from sdtune.errors import UserError

        if self.initial_step is None and self.initial_epoch is None:
            return None
        flag = "--initial_step" if self.initial_step is not None else "--initial_epoch"
        step = self.initial_step if self.initial_step is not None else (self.initial_epoch - 1) * steps_per_epoch
        if step >= max_steps:
            raise UserError(f"starts at step {step}, but training ends at step {max_steps}", where=flag,
                            fix="Raise --max_train_steps (or --max_train_epochs), or start earlier.")
        from sdtune.console import plural

        epoch = step // steps_per_epoch
        text = (f"{flag}: counting from step {step}, training epoch {epoch + 1} from its first batch; "
                f"{plural(max_steps - step, 'step')} to go")
        if resumed_step is not None:
            text += f" (the state's own position, step {resumed_step}, is not used)"
        else:
            text += " (the learning-rate schedule starts from its beginning)"
        return step, epoch, text

    def save_every_n_epochs_for(self, epochs: int) -> int | None:
        """--save_every_n_epochs, or sd-scripts' --save_n_epoch_ratio N: every max(1, epochs // N) epochs."""
        if self.save_n_epoch_ratio:
            return max(1, epochs // self.save_n_epoch_ratio)
        return self.save_every_n_epochs

    @property
    def effective_optimizer(self) -> str:
        from sdtune.train.optim import resolve_optimizer_name

        return resolve_optimizer_name(self.optimizer_type, self.use_8bit_adam, self.use_lion_optimizer)

    @property
    def effective_seed(self) -> int:
        return self.resolved("seed")

    @property
    def effective_validation_seed(self) -> int:
        return self.effective_seed if self.validation_seed is None else self.validation_seed
