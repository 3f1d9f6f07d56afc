"""DeepSpeed ZeRO with sd-scripts' flags: the options, accelerate's DeepSpeed plugin built from them,
and the options that cannot act under it.

`DeepSpeedOptions` is part of `TrainOptions`; `make_accelerator` passes `deepspeed_plugin(...)` and
`world.accelerator_handlers(opts, backend=process_group_backend(world))` (never `cpu=True`, which
makes accelerate drop DeepSpeed), and `world.start(accelerator, opts, deepspeed=True)` checks that
DeepSpeed really runs. The trained modules go into one engine (train/weights.py); frozen parts stay out.

The meanings are sd-scripts' (`--zero_stage` 2 by default, the global batch DeepSpeed checks is
micro batch x accumulation x processes, fp16's initial loss scale 2^0, fp16 master weights only with
ZeRO-2 and CPU optimizer offload); combinations sd-scripts accepts and ignores are refused here.
No torch at module level: the options are read before any model loads.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import model_validator

from sdtune.config import Field, Options
from sdtune.errors import UserError

G_DS = "DeepSpeed"
_TRUE = {"1", "true", "yes", "on"}


class DeepSpeedOptions(Options):
    deepspeed: bool = Field(False, "train under DeepSpeed ZeRO (through accelerate)", group=G_DS)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, "ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also "
                                               "the weights", group=G_DS)
    offload_optimizer_device: Literal["cpu", "nvme"] | None = Field(
        None, "keep the optimizer state (and its step) in CPU memory or on NVMe", group=G_DS)
    offload_optimizer_nvme_path: str | None = Field(None, "NVMe folder for --offload_optimizer_device nvme", group=G_DS,
                                                    metavar="DIR")
    offload_param_device: Literal["cpu", "nvme"] | None = Field(
        None, "ZeRO-3: keep the weights in CPU memory or on NVMe between uses", group=G_DS)
    offload_param_nvme_path: str | None = Field(None, "NVMe folder for --offload_param_device nvme", group=G_DS,
                                                metavar="DIR")
    zero3_init_flag: bool = Field(False, "ZeRO-3: build the trained model already sharded (deepspeed.zero.Init)",
                                  group=G_DS)
    # sd-scripts needs it to save under ZeRO-3 at all; sdtune always gathers the full weights (in the
    # precision they train in, which is what DeepSpeed's "16-bit" gathering means), so command lines
    # that carry it run unchanged
    zero3_save_16bit_model: bool = Field(False, "ZeRO-3: gather the full model (in its training precision) when "
                                                "saving; sdtune always does", group=G_DS)
    fp16_master_weights_and_gradients: bool = Field(
        False, "fp16 master weights and gradients, float32 optimizer state (ZeRO-2 with CPU optimizer offload only)",
        group=G_DS)

    @model_validator(mode="after")
    def _combinations(self):
        given = [name for name, field in DeepSpeedOptions.model_fields.items()
                 if name != "deepspeed" and getattr(self, name) != field.default]
        if given and not self.deepspeed:
            raise UserError("is a DeepSpeed option", where=f"--{given[0]}", fix="Add --deepspeed, or drop it.")
        for device, path in (("offload_optimizer_device", "offload_optimizer_nvme_path"),
                             ("offload_param_device", "offload_param_nvme_path")):
            if (getattr(self, device) == "nvme") != bool(getattr(self, path)):
                raise UserError(f"NVMe offload needs both --{device} nvme and --{path}", where=f"--{device}",
                                fix=f"Give both, or neither (--{device} cpu needs no folder).")
        stage3 = [n for n in ("offload_param_device", "zero3_init_flag", "zero3_save_16bit_model") if getattr(self, n)]
        if stage3 and self.zero_stage != 3:
            raise UserError(f"works with ZeRO stage 3 only (--zero_stage is {self.zero_stage})", where=f"--{stage3[0]}",
                            fix="Add --zero_stage 3, or drop it.")
        if self.offload_optimizer_device and self.zero_stage == 0:
            raise UserError("ZeRO stage 0 shards nothing, so there is no optimizer state to offload",
                            where="--offload_optimizer_device", fix="Use --zero_stage 1, 2 or 3.")
        if self.fp16_master_weights_and_gradients and not (self.zero_stage == 2
                                                            and self.offload_optimizer_device == "cpu"):
            raise UserError("DeepSpeed keeps fp16 master weights only with ZeRO-2 and the optimizer offloaded to the "
                            "CPU (sd-scripts logs this and trains without them)",
                            where="--fp16_master_weights_and_gradients",
                            fix="Add --zero_stage 2 --offload_optimizer_device cpu, or drop it.")
        if self.zero3_init_flag:
            raise UserError("sdtune loads the model whole and shards it when training starts; building it already "
                            "sharded is not supported (it saves memory only while loading)", where="--zero3_init_flag",
                            fix="Drop it; --offload_param_device cpu keeps the sharded weights in CPU memory.")
        return self


def check_training(opts) -> None:
    """Refuse, in one line, the training options that cannot act under DeepSpeed (`opts`: TrainOptions)."""
    if not opts.deepspeed:
        return
    refusals = [
        (opts.hypernetwork_module, "--hypernetwork_module", "a hypernetwork trains a few small layers beside a frozen "
         "model: DeepSpeed has nothing worth sharding there", "Drop --deepspeed."),
        (opts.fused_backward_pass, "--fused_backward_pass", "DeepSpeed steps the optimizer itself, after the whole "
         "backward pass", "Drop one of them (ZeRO-2 also frees the gradients of other processes' shards)."),
        (opts.full_bf16, "--full_bf16", "DeepSpeed keeps float32 master weights behind its bf16 copy, so there is no "
         "bf16 weight update to round stochastically", "Use --mixed_precision bf16 without --full_bf16."),
        (opts.ema and opts.zero_stage == 3, "--ema", "under ZeRO-3 no process holds the whole U-Net at a step, so "
         "there is nothing to average", "Use --zero_stage 2 (or 1), or drop --ema."),
        ("schedulefree" in opts.effective_optimizer.lower(), "--optimizer_type", "DeepSpeed wraps the optimizer, so the "
         "averaged weights of a schedule-free method cannot be switched in for saving and sampling",
         "Use another optimizer, or drop --deepspeed."),
        (opts.offload_optimizer_device and ("8bit" in opts.effective_optimizer.lower()
                                            or "paged" in opts.effective_optimizer.lower()),
         "--offload_optimizer_device", "bitsandbytes' 8-bit and paged optimizers step on the GPU, not on offloaded "
         "CPU weights", "Use AdamW (or another torch optimizer) with offload, or drop the offload."),
    ]
    for refused, where, why, fix in refusals:
        if refused:
            raise UserError(f"does not work under DeepSpeed: {why}", where=where, fix=fix)


def deepspeed_plugin(ds: DeepSpeedOptions, *, train_batch_size: int, gradient_accumulation_steps: int,
                     max_grad_norm: float, mixed_precision: str, full_fp16: bool = False, world_size: int):
    """accelerate's DeepSpeedPlugin for these options, or None without --deepspeed.

    `mixed_precision` is the one the accelerator gets (on a CPU fp16 is already "no"); `world_size`
    the launch's process count (`world.Launch.from_env().processes`).
    """
    if not ds.deepspeed:
        return None
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        raise UserError("ACCELERATE_USE_CPU (or accelerate launch --cpu) makes accelerate drop DeepSpeed without a word",
                        where="--deepspeed", fix="Unset ACCELERATE_USE_CPU; sdtune sets up DeepSpeed on the CPU itself.")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        raise UserError("an accelerate config names a DeepSpeed config file, which would replace sdtune's DeepSpeed "
                        "flags", where="--deepspeed", fix="Remove deepspeed_config_file from the accelerate config; "
                        "set ZeRO up with --zero_stage and the --offload_* flags.")
    _check_launch_agrees(ds)
    if mixed_precision == "fp16" and not _cuda():
        raise UserError("DeepSpeed refuses fp16 on this CPU", where="--deepspeed",
                        fix="Use --mixed_precision bf16 or no.")
    try:
        import deepspeed  # noqa: F401  (accelerate imports it lazily and fails with a traceback)
    except ImportError:
        raise UserError("DeepSpeed is not installed", where="--deepspeed",
                        fix="Install it: pip install 'sdtune[deepspeed]' (its ops compile at first use: needs g++).") \
            from None
    if not _cuda():
        _skip_shared_memory_op()
    from accelerate.utils import DeepSpeedPlugin

    # every field given: the plugin would otherwise fill unset ones from an accelerate config's environment
    plugin = DeepSpeedPlugin(
        zero_stage=ds.zero_stage, gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clipping=max_grad_norm, offload_optimizer_device=ds.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=ds.offload_optimizer_nvme_path or "none",
        offload_param_device=ds.offload_param_device or "none",
        offload_param_nvme_path=ds.offload_param_nvme_path or "none", zero3_init_flag=ds.zero3_init_flag,
        zero3_save_16bit_model=ds.zero3_save_16bit_model)
    config = plugin.deepspeed_config
    # The run's own optimizer steps the offloaded weights: accelerate would otherwise swap any optimizer
    # for DeepSpeed's CPU Adam with only its learning rate and weight decay (a Lion or Adafactor run
    # silently becoming Adam, betas and eps reset), and compile that op at first use.
    config["zero_force_ds_cpu_optimizer"] = False
    config["train_micro_batch_size_per_gpu"] = train_batch_size
    # DeepSpeed checks global = micro batch x accumulation x processes
    config["train_batch_size"] = train_batch_size * gradient_accumulation_steps * world_size
    plugin.set_mixed_precision(mixed_precision)
    if mixed_precision == "fp16":
        config["fp16"]["initial_scale_power"] = 0  # sd-scripts: a scale of 2^0, against early overflows
        if full_fp16 or ds.fp16_master_weights_and_gradients:
            if ds.zero_stage == 2 and ds.offload_optimizer_device == "cpu":
                config["fp16"]["fp16_master_weights_and_grads"] = True
            else:
                raise UserError("--full_fp16 under DeepSpeed needs ZeRO-2 with the optimizer offloaded to the CPU",
                                where="--full_fp16", fix="Add --zero_stage 2 --offload_optimizer_device cpu.")
    return plugin


def _check_launch_agrees(ds: DeepSpeedOptions) -> None:
    """An accelerate launch with --use_deepspeed (or a DeepSpeed config file) passes its ZeRO settings in
    the environment; sdtune's flags set DeepSpeed up, so a launch that says otherwise is refused rather
    than overridden without a word."""
    ours = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": ("--zero_stage", str(ds.zero_stage)),
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("--offload_optimizer_device",
                                                              ds.offload_optimizer_device or "none"),
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("--offload_param_device", ds.offload_param_device or "none")}
    for name, (flag, value) in ours.items():
        launched = os.environ.get(name)
        if launched is not None and launched.strip().lower() != value:
            raise UserError(f"the accelerate launch sets {name}={launched} but sdtune's {flag} is {value}",
                            where=flag, fix=f"Give {flag} {launched}, or launch without --use_deepspeed "
                                            "(sdtune's flags set DeepSpeed up).")


def process_group_backend(world_size: int) -> str | None:
    """The backend DeepSpeed needs named for accelerate (`world.accelerator_handlers(opts, backend=...)`):
    without a GPU gloo, or accelerate tells every process it is alone (and `cpu=True` would drop
    DeepSpeed instead); with GPUs accelerate's own choice (None)."""
    return "gloo" if world_size > 1 and not _cuda() else None


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed on a CPU from compiling its shared-memory communication op.

    Its communication backend builds the op when it starts (~70 s of C++ build on each new machine,
    and a compiler there), but only its tensor-parallel inference all-reduce uses it: ZeRO's training
    collectives go through torch.distributed (gloo here) either way. DeepSpeed keeps which ops this
    machine can build in one module-level table that persists edits (deepspeed.ops.__compatible_ops__);
    marked as not buildable, the op is skipped as on platforms without it. No public switch exists.
    """
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in table:
        table["deepspeed_shm_comm"] = False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
