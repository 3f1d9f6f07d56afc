"""The CPU optimizer speed-up (train/cpu_speed.py) takes the multi-tensor path and changes no number."""

from __future__ import annotations

import pytest
import torch

from sdtune.train.cpu_speed import prefer_foreach_on_cpu

KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SHAPES = [(3,), (17, 5), (320,), (8, 4, 3, 3), (1001,), (7, 7, 7), (4096,), (1,)]


def _params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _train(opt_params, optimizer, steps=12):
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        for i, p in enumerate(opt_params):  # gradients over 9 orders of magnitude
            scale = 10.0 ** (((step + i) % 10) - 7)
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= 0.9  # a schedule changes the group between steps


@pytest.mark.parametrize("cls,dtype", [(torch.optim.AdamW, torch.float32), (torch.optim.Adam, torch.float32)])
def test_same_weights_and_state_as_the_per_tensor_loop(cls, dtype):
    """torch's per-tensor loop (foreach=False) is the reference; the hooked optimizer must match it to the bit."""
    ref_params, fast_params = _params(dtype), _params(dtype)
    reference = cls(ref_params, foreach=False, **KWARGS)
    fast = cls(fast_params, **KWARGS)
    assert prefer_foreach_on_cpu(fast)
    _train(ref_params, reference)
    _train(fast_params, fast)
    for a, b in zip(ref_params, fast_params):
        assert torch.equal(a, b)
    for a, b in zip(ref_params, fast_params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.state[a][key], fast.state[b][key]), key


def _watched_adamw():
    """A hooked AdamW and the `foreach` of its groups as each step starts (after sdtune's pre-hook)."""
    params = _params(torch.float32)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    assert prefer_foreach_on_cpu(optimizer)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([g["foreach"] for g in opt.param_groups]))
    return params, optimizer, seen


def test_multi_tensor_path_during_the_step_and_state_unchanged():
    params, optimizer, seen = _watched_adamw()
    _train(params, optimizer, steps=2)
    assert seen == [[True], [True]]  # the step ran with foreach=True
    # ... but the saved state records the choice the user made (none), as before
    assert [g["foreach"] for g in optimizer.state_dict()["param_groups"]] == [None]


def test_a_step_that_raises_leaves_neither_the_state_nor_the_next_step_switched():
    params, optimizer, seen = _watched_adamw()
    params[0].grad = torch.ones_like(params[0]).to_sparse()  # AdamW refuses sparse gradients in its step
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert seen == [[True]]  # it raised on the multi-tensor path, after the pre-hook, before the post-hook
    assert [g["foreach"] for g in optimizer.state_dict()["param_groups"]] == [None]
    _train(params, optimizer, steps=1)
    assert seen[-1] == [True] and [g["foreach"] for g in optimizer.param_groups] == [None]


def test_left_alone_when_the_user_chose_or_another_optimizer():
    params = _params(torch.float32)
    assert not prefer_foreach_on_cpu(torch.optim.AdamW(params, lr=1e-3, foreach=False))
    assert not prefer_foreach_on_cpu(torch.optim.SGD(params, lr=1e-3))
    # bfloat16 weights: the multi-tensor path rounds differently there
    assert not prefer_foreach_on_cpu(torch.optim.AdamW(_params(torch.bfloat16), lr=1e-3))


def test_bfloat16_would_differ():
    """Why bfloat16 is left alone: the two paths give different weights (if torch ever makes them
    agree, the restriction can go)."""
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    _train(a, torch.optim.AdamW(a, foreach=False, **KWARGS))
    _train(b, torch.optim.AdamW(b, foreach=True, **KWARGS))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


ROUND_SCRIPT = """
import ctypes, json, resource, sys
from sdtune.train.cpu_speed import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
size, blocks, faults = 1 << 20, 40, []
for _ in range(3):  # one training step's worth of 1 MB tensors, written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ptrs = [libc.malloc(size) for _ in range(blocks)]
    for p in ptrs:
        ctypes.memset(p, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for p in ptrs:
        libc.free(p)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _fault_rounds(mode):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", ROUND_SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    """The same 40 MB allocated again after a free: glibc by default returns it to the kernel, so every
    round touches fresh pages (a page fault per 4 KB page); with keep_freed_memory the third round
    reuses the second's pages."""
    import os

    if not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("glibc only")
    pages = 40 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    plain = _fault_rounds("plain")
    tuned = _fault_rounds("tuned")
    assert tuned["tuned"] is True
    assert plain["faults"][2] > pages // 2  # the problem: each round faults its pages in again
    assert tuned["faults"][2] < pages // 20
