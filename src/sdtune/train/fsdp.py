"""FSDP2 through accelerate: what a launch may ask for, what cannot act under it, and the full weights.

The user selects FSDP on `accelerate launch` (`--use_fsdp --fsdp_version 2`, or an accelerate config
file with `fsdp_version: 2`); accelerate passes it on in the environment (ACCELERATE_USE_FSDP,
FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD, ...) and builds its plugin from there. `check_launch`
runs before the Accelerator is made (from `world.accelerator_handlers`) and refuses in one line what
sdtune cannot train under: no CUDA GPU (accelerate runs FSDP on GPUs only), FSDP1 (accelerate's
default version, deprecated in torch), and the options that cannot act on sharded weights.

The trained modules go into one module (accelerate shards one model per `prepare` call) which the
training step calls through (`weights.FSDPCall`). `Weights.gathered` gives every process whole
copies of the trained modules (`whole_copies`), so that the main process alone can save and run
forward passes (validation, samples) without a collective inside; see its docstring.
"""

from __future__ import annotations

import os

from sdtune.errors import UserError

_WHERE = "accelerate launch --use_fsdp"


def check_launch(opts, env=None, cuda: bool | None = None) -> None:
    """Refuse, in one line, an FSDP launch sdtune cannot train under (`opts`: TrainOptions)."""
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise UserError("FSDP was requested, but accelerate runs FSDP on CUDA GPUs only and this machine has none "
                        "(on a CPU it would quietly train plain data parallel)", where=_WHERE,
                        fix="Launch plain data parallel here (drop --use_fsdp), or run on GPUs.")
    version = env.get("FSDP_VERSION", "1").strip() or "1"
    if version != "2":
        raise UserError(f"sdtune trains under FSDP2 only, and this launch selects FSDP version {version} "
                        "(accelerate's default; torch deprecates FSDP1)", where=_WHERE,
                        fix="Add --fsdp_version 2 to accelerate launch (or fsdp_version: 2 to its config file).")
    check_training(opts)


def check_training(opts) -> None:
    """Refuse the training options that cannot act on FSDP's sharded weights, each with its reason."""
    optimizer = opts.effective_optimizer.lower()
    refusals = [
        (opts.hypernetwork_module, "--hypernetwork_module", "a hypernetwork trains a few small layers beside a frozen "
         "model: FSDP has nothing worth sharding there", "Drop --use_fsdp."),
        (opts.fused_backward_pass, "--fused_backward_pass", "FSDP reduces each gradient to its shard after the "
         "backward pass, so the optimizer cannot step each whole parameter inside it", "Drop one of them."),
        (opts.full_bf16 or opts.full_fp16, "--full_bf16" if opts.full_bf16 else "--full_fp16", "accelerate keeps "
         "float32 weights under FSDP mixed precision (it casts the trained weights up before sharding)",
         "Use --mixed_precision bf16 (or fp16) alone."),
        (opts.ema, "--ema", "no process holds the whole U-Net at a step, so there is nothing to average",
         "Drop --ema, or train without FSDP."),
        ("schedulefree" in optimizer, "--optimizer_type", "a schedule-free optimizer swaps averaged weights in and "
         "out, which sdtune does not do on sharded weights", "Use another optimizer, or drop --use_fsdp."),
        ("8bit" in optimizer or "paged" in optimizer, "--optimizer_type", "bitsandbytes' 8-bit and paged "
         "optimizers do not step FSDP's sharded weights (DTensors)", "Use AdamW or another torch optimizer."),
        (opts.torch_compile, "--torch_compile", "compiling a module that FSDP shards afterwards is not supported by "
         "sdtune", "Drop --torch_compile."),
    ]
    for refused, where, why, fix in refusals:
        if refused:
            raise UserError(f"does not work under FSDP: {why}", where=where, fix=fix)


def whole_copies(root, device) -> list:
    """Whole, unsharded copies of the trained modules in FSDP's sharded `root` (one per module, in
    order), on every process. A collective: all processes call it.

    FSDP's own modules cannot serve: their state_dict() always returns the shards (a hook reshards
    them first), and a forward pass through them gathers weights from every process, so the main
    process could neither save nor sample alone. Torch's full state dict all-gathers the weights in
    their own precision (float32 under mixed precision, not FSDP's lower-precision compute copies);
    each copy is a plain module of the same class holding them, dropped when `Weights.gathered` ends.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True))
    copies = []
    for index, part in enumerate(root.parts):
        prefix = f"parts.{index}."
        copies.append(plain_copy(part, {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)},
                                 device))
    return copies


def plain_copy(module, state: dict, device):
    """A module of `module`'s own class (not FSDP's subclass) and config, holding `state`."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with torch.device(device):
        copy = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
    copy.load_state_dict(state)
    if hasattr(module, "attn_processors"):  # the attention the run chose (xformers, sliced, ...)
        copy.set_attn_processor(module.attn_processors)
    return copy.train(module.training).requires_grad_(False)
