"""The fused backward pass (--fused_backward_pass): each parameter is stepped as soon as its gradient
is complete, and that gradient is freed at once, so the gradients of the whole model never coexist.

    check_options(opts)                         # one-line refusal where it cannot act
    fused = attach(optimizer, opts.max_grad_norm, num_processes)   # after accelerator.prepare
    ...
    accelerator.backward(loss)                  # the parameters are updated during this call
    if not fused: clip; optimizer.step()
    lr_scheduler.step()

How a parameter is stepped alone: the optimizer's `param_groups` are swapped, for the length of one
`step()`, for a copy of the parameter's group that holds only it. AdamW (torch), AdamW8bit
(bitsandbytes) and Adafactor (transformers) keep all their state per parameter and read their group
only for hyper-parameters (the learning rate the schedule set included), so one step of each
parameter alone is the step they take over all of them. The optimizer's step hooks run on that
single-parameter step too, so --full_bf16's stochastic rounding applies (one tensor at a time).

--max_grad_norm: as in sd-scripts, each parameter's gradient is clipped to that norm on its own (the
norm of the whole gradient is never known before the first parameters are stepped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtune.errors import UserError

if TYPE_CHECKING:
    import torch

WHERE = "--fused_backward_pass"
# optimizers whose state and update are per parameter (see above), lower-cased sd-scripts names
SUPPORTED = ("adamw", "adamw8bit", "adafactor")


def check_options(optimizer: str, gradient_accumulation_steps: int, mixed_precision: str) -> None:
    """Refuse the option where it cannot act: called from the option validation (no torch import)."""
    if optimizer.lower() not in SUPPORTED:
        raise UserError(f"the fused backward pass steps one parameter at a time, which {optimizer} does not support",
                        where=WHERE, fix="Use --optimizer_type AdamW, AdamW8bit or Adafactor, or drop the flag.")
    if gradient_accumulation_steps > 1:
        raise UserError("the fused backward pass steps during every backward pass, so gradients cannot be "
                        "accumulated", where=WHERE, fix="Drop --gradient_accumulation_steps (or set it to 1).")
    if mixed_precision == "fp16":
        raise UserError("the fused backward pass cannot unscale float16 gradients one parameter at a time",
                        where=WHERE, fix="Use --mixed_precision bf16 or no.")


class FusedBackward:
    """The hooks on every trained parameter; `remove()` detaches them."""

    def __init__(self, optimizer: Any, max_grad_norm: float):
        from sdtune.train.optim import _unwrap

        self.inner = _unwrap(optimizer)
        self.max_grad_norm = max_grad_norm
        self.handles = []
        for index, group in enumerate(self.inner.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))

    def _hook(self, index: int):
        def step(p: "torch.Tensor") -> None:
            self.step_param(p, index)
        return step

    def step_param(self, p: "torch.Tensor", index: int) -> None:
        import torch

        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        # the group by its index: loading a state (resume) replaces the group dicts
        inner, groups = self.inner, self.inner.param_groups
        inner.param_groups = [{**groups[index], "params": [p]}]
        try:
            inner.step()
        finally:
            inner.param_groups = groups
            p.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach(optimizer: Any, max_grad_norm: float, num_processes: int = 1) -> FusedBackward:
    """Hook every trained parameter of `optimizer` (accelerate's wrapper or a plain one)."""
    if num_processes > 1:
        # a parameter's gradient is complete on one process before the processes have averaged it
        raise UserError("the fused backward pass would step before the processes average their gradients",
                        where=WHERE, fix="Train on one process, or drop the flag.")
    return FusedBackward(optimizer, max_grad_norm)
