"""The CPU optimizer speed-up (train/cpu_speed.py): torch's fused kernel by default, within a few units of
the last place of the per-tensor loop; with `fused=False`, the multi-tensor path, the loop's bits."""

from __future__ import annotations

import pytest
import torch

from sdtune.train.cpu_speed import fast_cpu_step

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


def _pair(cls, **kwargs):
    """torch's per-tensor loop (foreach=False, sd-scripts' step on the CPU) and sdtune's optimizer, trained alike."""
    ref_params, fast_params = _params(torch.float32), _params(torch.float32)
    reference = cls(ref_params, foreach=False, **KWARGS)
    fast = cls(fast_params, **kwargs, **KWARGS)
    path = fast_cpu_step(fast)
    _train(ref_params, reference)
    _train(fast_params, fast)
    return path, reference, fast, ref_params, fast_params


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_off_takes_the_multi_tensor_path_with_the_loops_bits(cls):
    path, reference, fast, ref_params, fast_params = _pair(cls, fused=False)
    assert path == "foreach"
    for a, b in zip(ref_params, fast_params):
        assert torch.equal(a, b)
    for a, b in zip(ref_params, fast_params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.state[a][key], fast.state[b][key]), key


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_the_default_fused_kernel_stays_within_rounding_of_the_loop(cls):
    path, reference, fast, ref_params, fast_params = _pair(cls)
    assert path == "fused"
    # another order of float32 operations: a few units in the last place (2**-23 = 1.2e-7) of each
    # weight's size after 12 steps, not the same bits (if torch ever makes them equal, say so in the docs)
    differs = False
    for a, b in zip(ref_params, fast_params):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * a.abs().max().item())
        differs |= not torch.equal(a, b)
    for a, b in zip(ref_params, fast_params):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fast.state[b][key], reference.state[a][key], rtol=1e-5, atol=0)
        assert torch.equal(fast.state[b]["step"], reference.state[a]["step"])
    assert differs


def _watched_adamw(**kwargs):
    """A hooked AdamW and the `fused` and `foreach` of its groups as each step starts (after sdtune's pre-hook)."""
    params = _params(torch.float32)
    optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
    path = fast_cpu_step(optimizer)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([(g["fused"], g["foreach"])
                                                                     for g in opt.param_groups]))
    return params, optimizer, seen, path


@pytest.mark.parametrize("kwargs,during", [({}, (True, None)), ({"fused": False}, (False, True))])
def test_the_path_is_taken_during_the_step_and_the_state_records_the_users_choice(kwargs, during):
    params, optimizer, seen, _ = _watched_adamw(**kwargs)
    _train(params, optimizer, steps=2)
    assert seen == [[during], [during]]
    # ... but the saved state records the choice the user made, as before
    chosen = (kwargs.get("fused"), None)
    assert [(g["fused"], g["foreach"]) for g in optimizer.state_dict()["param_groups"]] == [chosen]
    assert [(g["fused"], g["foreach"]) for g in optimizer.param_groups] == [chosen]


def test_a_step_that_raises_leaves_neither_the_state_nor_the_next_step_switched():
    params, optimizer, seen, _ = _watched_adamw()
    params[0].grad = torch.ones_like(params[0]).to_sparse()  # AdamW refuses sparse gradients in its step
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert seen == [[(True, None)]]  # it raised on the fused path, after the pre-hook, before the post-hook
    assert [g["fused"] for g in optimizer.state_dict()["param_groups"]] == [None]
    _train(params, optimizer, steps=1)
    assert seen[-1] == [(True, None)] and [g["fused"] for g in optimizer.param_groups] == [None]


def test_left_alone_when_the_user_chose_or_another_optimizer():
    params = _params(torch.float32)
    assert fast_cpu_step(torch.optim.AdamW(params, lr=1e-3, foreach=False)) is None
    assert fast_cpu_step(torch.optim.AdamW(params, lr=1e-3, fused=True)) is None
    assert fast_cpu_step(torch.optim.SGD(params, lr=1e-3)) is None
    # bfloat16 weights: even the multi-tensor path rounds differently there
    assert fast_cpu_step(torch.optim.AdamW(_params(torch.bfloat16), lr=1e-3)) is None


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
