"""What sdtune needs from accelerate beyond its everyday public calls, in one place.

Everything else uses accelerate's public API (`Accelerator`, `prepare`, `backward`, `no_sync`,
`save_state` / `load_state`, `sync_gradients`). The two functions here that reach into internals do
so because no public way exists; each says why, so that an accelerate upgrade has one file to check.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

# torch deprecates two collectives that DeepSpeed calls; its FutureWarning comes back dozens of times
# in a ZeRO-3 run (Python forgets which warnings it has shown whenever code changes the warning
# filters), about code the user neither owns nor can change
_DEEPSPEED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def fresh_accelerator_state() -> None:
    """Forget the precision and accumulation settings of an earlier Accelerator in this process.

    accelerate keeps them in process-wide singletons and refuses a second Accelerator with other
    values; a second run in one process (tests, notebooks) must start afresh. accelerate offers no
    public reset (its own tests call these private ones). The distributed state (PartialState) is
    kept: the process group outlives a run.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


@contextlib.contextmanager
def micro_batch(accelerator, models, closes_step: bool) -> Iterator[None]:
    """One micro-batch of gradient accumulation, closing the optimizer step when `closes_step`.

    `Accelerator.accumulate` counts micro-batches itself and closes a step every
    gradient_accumulation_steps of them, or at the end of a dataloader prepared by accelerate. Ours
    is not prepared (the bucket sampler shards it), yet an epoch's last batch must close its step (as
    sd-scripts' prepared loader does), so the caller decides, and this does what `accumulate` does
    with that decision, through public API only: the prepared optimizer and scheduler step only when
    `sync_gradients` is true, and `no_sync` keeps DDP from reducing gradients in between.
    """
    accelerator.sync_gradients = closes_step
    with contextlib.ExitStack() as stack:
        if not closes_step:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def deepspeed_accelerator(opts, precision: str):
    """The Accelerator for a DeepSpeed run: accelerate's plugin from sdtune's flags and, on a machine
    without a GPU, the gloo backend named (never `cpu=True`, which makes accelerate drop DeepSpeed; and
    without a named backend every process believes it is alone)."""
    from accelerate import Accelerator

    from sdtune.train.world import Launch, accelerator_handlers
    from sdtune.train.zero import deepspeed_plugin, process_group_backend

    world = Launch.from_env().processes
    plugin = deepspeed_plugin(opts, train_batch_size=opts.train_batch_size,
                              gradient_accumulation_steps=opts.gradient_accumulation_steps,
                              max_grad_norm=opts.max_grad_norm, mixed_precision=precision, full_fp16=opts.full_fp16,
                              world_size=world)
    handlers = accelerator_handlers(opts, backend=process_group_backend(world))
    warnings.filterwarnings("ignore", message=_DEEPSPEED_COLLECTIVES, category=FutureWarning)
    fresh_accelerator_state()
    return Accelerator(gradient_accumulation_steps=opts.gradient_accumulation_steps, mixed_precision=precision,
                       deepspeed_plugin=plugin, kwargs_handlers=handlers)


def allow_fp16_gradients(accelerator) -> None:
    """--full_fp16: let accelerate's gradient scaler unscale float16 gradients.

    torch's GradScaler refuses float16 gradients because it assumes float32 master weights; with
    --full_fp16 there are none by choice. Neither torch nor accelerate has a public switch for it, so
    the scaler's private unscale method is wrapped (sd-scripts patches the scaler the same way).
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    def _unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = _unscale_grads_
