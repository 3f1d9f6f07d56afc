"""Faster training steps on the CPU.

torch's Adam and AdamW take their per-tensor Python loop on the CPU unless told otherwise (the
multi-tensor path is the default only on GPUs): ~10 operator calls per weight tensor (686 in an SD
U-Net), each a pass over the tensor. Over float32 CPU weights sdtune steps them on torch's fused
kernel instead (`fused=True`): one pass per tensor, ~3x faster, the step 1.3x faster on the CPU
fixture. Its arithmetic rounds differently in the last bit (after 20 steps ~1e-7 of a weight), so
weights are not bit-identical to sd-scripts' any more; with `--optimizer_args fused=False` sdtune
takes the multi-tensor path (`foreach`), which runs the very same element-wise kernels as the loop
from C++ and gives sd-scripts' weights to the bit.

The choice is made for the length of each step by step hooks, not in the parameter groups, so the
saved optimizer state (which records `foreach` and `fused`) stays what the user chose and a resumed
or GPU run decides for itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FAST_STEP = ("Adam", "AdamW")  # torch.optim classes whose fused and foreach paths are checked here

# glibc's mallopt parameters (malloc.h) and the values set for a training process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 256 << 20   # freed memory kept for reuse instead of being handed back to the kernel
HEAP_UP_TO_BYTES = 32 << 20    # blocks up to this size come from the reusable heap (glibc's own ceiling)


def fast_cpu_step(optimizer: "torch.optim.Optimizer") -> str | None:
    """Step `optimizer` on torch's fused kernel when it is torch's Adam/AdamW over float32 CPU tensors
    and neither `foreach` nor `fused` was chosen; on the multi-tensor path (the loop's bits) when only
    `fused=False` was. Returns the path taken, "fused" or "foreach", or None when left alone."""
    import torch

    if type(optimizer) not in (getattr(torch.optim, n) for n in FAST_STEP):
        return None
    groups = optimizer.param_groups
    if any(g.get("foreach") is not None or g.get("fused") or g.get("differentiable") for g in groups):
        return None
    # float32 plain tensors only: with bfloat16 weights even the multi-tensor path rounds unlike the
    # loop (measured), and sharded (FSDP) weights are left to torch's own choice
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) or p.device.type != "cpu" or p.dtype != torch.float32
           for g in groups for p in g["params"]):
        return None
    key = "foreach" if any(g.get("fused") is False for g in groups) else "fused"
    switched: list[dict] = []

    def restore(*_):
        while switched:
            switched.pop()[key] = None

    def before(opt, args, kwargs):
        restore()  # a step that raised skipped the post-hook: its groups are still switched
        for group in opt.param_groups:  # the fused backward pass steps a one-parameter copy of a group
            if group.get(key) is None:
                group[key] = True
                switched.append(group)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(restore)
    optimizer.register_state_dict_pre_hook(restore)  # a state saved after such a step records None too
    return key


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed memory for the next step instead of returning it to the kernel.

    A training step frees and allocates the same tensors again (gradients, the multi-tensor AdamW's
    denominators, the activations the backward pass saves). glibc hands freed memory back to the kernel
    once more than about twice the largest block seen so far lies free at the top of its heap (for the
    tiny U-Net's 0.6 MB weights: about 1 MB), so every step's allocations touch fresh pages again, and
    each fresh page costs a page fault (measured on the CPU fixture: ~9,500 per step, 7,100 of them in
    AdamW's square roots). Keeping up to KEEP_FREED_BYTES at the top of the heap, and taking blocks up
    to HEAP_UP_TO_BYTES from it, reuses the pages. Only the allocator's bookkeeping changes, no number.
    Process-wide and not undone (the process ends with the run); glibc on Linux only. Returns whether
    it was applied."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        glibc = None
    if not glibc:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # the threshold first: setting any of them ends glibc's own adjustment of both
    return mallopt(_M_MMAP_THRESHOLD, HEAP_UP_TO_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
