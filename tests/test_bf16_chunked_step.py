"""--full_bf16's optimizer step, one chunk of parameters at a time: the same weights as stepping the
whole model in float32 and rounding afterwards, without the whole model's float32 transient."""

import pytest
import torch

from sdtune.train.memory_count import LiveBytes
from sdtune.train.optim import add_bf16_stochastic_rounding, build_optimizer, round_stochastic_bf16

SHAPES = [(64, 48), (48,), (32, 16, 3, 3), (16,), (3000,), (40, 40)]  # 3000 < bitsandbytes' 4096: 32-bit state


def _start(seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen) * 0.1).to(torch.bfloat16) for s in SHAPES] for _ in range(3)]
    return init, grads


def _reference(name, args, init, grads, seed):
    """Whole-model float32 steps, then every weight and its weight-shaped float32 moments rounded to
    bf16 in parameter order: what the step did before it was chunked, written out here."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(t.float()) for t in init]
    opt = build_optimizer(name, [{"params": params, "lr": 1e-2}], 1e-2, args, note=None)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.float()
        opt.step()
        for p in params:
            p.grad = None
            p.data = round_stochastic_bf16(p.data, gen).float()
            state = opt.state[p]
            for key, value in state.items():
                if torch.is_tensor(value) and value.dtype == torch.float32 and value.shape == p.shape:
                    state[key] = round_stochastic_bf16(value, gen).float()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name,args", [("AdamW", ("weight_decay=0.01",)), ("AdamW8bit", ()),
                                       ("Adafactor", ("relative_step=False", "scale_parameter=False")),
                                       ("Adafactor", ())])
def test_chunked_step_equals_the_whole_model_step(name, args):
    init, grads = _start()
    expected = _reference(name, args, init, grads, seed=7)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = build_optimizer(name, [{"params": params, "lr": 1e-2}], 1e-2, args, note=None)
    assert add_bf16_stochastic_rounding(opt, torch.Generator().manual_seed(7), chunk_elements=3000)  # 4 chunks
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, e in zip(params, expected):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.float(), e)  # the same float32 arithmetic and the same draws, in the same order
    assert any(not torch.equal(p, t) for p, t in zip(params, init))


def _step_transient(chunk_elements: int) -> int:
    """Bytes allocated above the steady state during the second bf16 AdamW step of 8 weights of
    65536 elements (the first step creates the moments)."""
    params = [torch.nn.Parameter(torch.zeros(256, 256, dtype=torch.bfloat16)) for _ in range(8)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    add_bf16_stochastic_rounding(opt, torch.Generator().manual_seed(0), chunk_elements=chunk_elements)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        counter = LiveBytes()
        counter.track(params)
        counter.track(p.grad for p in params)
        counter.track(t for s in opt.state.values() for t in s.values())
        with counter:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return counter.peak - _steady(params, opt)


def _steady(params, opt) -> int:
    # bf16 weights, bf16 gradients (still alive when the step starts), bf16 moments, 4-byte step counters
    n = sum(p.numel() for p in params)
    return n * 2 + n * 2 + n * 2 * 2 + 4 * len(params)


def test_chunked_step_has_no_whole_model_transient():
    one = 256 * 256
    chunked = _step_transient(chunk_elements=one)
    whole = _step_transient(chunk_elements=8 * one)
    # the whole model upcast: weight, gradient and both moments gain 2 bytes each per element
    assert whole >= 8 * one * 8
    # one weight at a time: its float32 copies and the rounding's int32 temporaries, about 24 bytes
    # per element of one weight
    assert chunked <= one * 24 + 4096
    assert chunked < whole / 2.5
