"""Optimizers, parameter groups and LR schedules on a tiny module, against update rules and LR
curves written out here."""

import math

import pytest
import torch

from sdtune.errors import UserError
from sdtune.train.optim import (
    build_optimizer,
    build_param_groups,
    eval_weights,
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_optimizer_args,
    resolve_optimizer_name,
)
from sdtune.train.schedules import build_lr_scheduler, resolve_warmup


class Tiny(torch.nn.Module):
    def __init__(self, n=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(n, n, generator=g))
        self.b = torch.nn.Parameter(torch.randn(n, generator=g))


def _grads(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def one_step(name, lr=1e-2, args=(), seed=1, n=8):
    model = Tiny(n)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, build_param_groups(model, learning_rate=lr), lr, list(args), note=None)
    _grads(model, seed)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return opt, before, grads, [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- parameter groups


def test_param_groups_unet_and_text_encoder():
    unet, te = Tiny(), Tiny(4)
    unet.b.requires_grad_(False)
    groups = build_param_groups(unet, te, learning_rate=1e-5, learning_rate_te=3e-6)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("unet", 1e-5, 1), ("text_encoder", 3e-6, 2)]
    assert build_param_groups(unet, te, learning_rate=1e-5)[1]["lr"] == 1e-5  # TE defaults to the U-Net's rate


def test_learning_rate_te_acts_per_group():
    unet, te = Tiny(), Tiny(seed=0)
    opt = build_optimizer("torch.optim.SGD", build_param_groups(unet, te, learning_rate=0.1, learning_rate_te=0.01), 0.1,
                          note=None)
    before_u, before_t = unet.w.detach().clone(), te.w.detach().clone()
    unet.w.grad, te.w.grad = torch.ones(8, 8), torch.ones(8, 8)
    unet.b.grad, te.b.grad = torch.zeros(8), torch.zeros(8)
    opt.step()
    torch.testing.assert_close(before_u - unet.w.detach(), torch.full((8, 8), 0.1))
    torch.testing.assert_close(before_t - te.w.detach(), torch.full((8, 8), 0.01))


def test_learning_rate_te_without_text_encoder_is_refused():
    with pytest.raises(UserError) as err:
        build_param_groups(Tiny(), None, learning_rate=1e-5, learning_rate_te=1e-6)
    assert err.value.where == "--learning_rate_te"


# ---------------------------------------------------------------- update rules


def test_adamw_first_step():
    lr, wd, eps = 1e-2, 0.1, 1e-8
    _, before, grads, after = one_step("AdamW", lr, [f"weight_decay={wd}"])
    for p0, g, p1 in zip(before, grads, after):
        # bias-corrected first step: m_hat = g, v_hat = g^2; decoupled weight decay first
        expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p1, expected)


def test_optimizer_name_is_case_insensitive():
    _, before, grads, after = one_step("adamw", 1e-2)
    torch.testing.assert_close(after[0], before[0] * (1 - 1e-2 * 1e-2) - 1e-2 * grads[0] / (grads[0].abs() + 1e-8))


@pytest.mark.parametrize("momentum, factor", [(None, 1.9), (0.5, 1.5)])
def test_sgd_nesterov(momentum, factor):
    args = [] if momentum is None else [f"momentum={momentum}"]
    _, before, grads, after = one_step("SGDNesterov", 0.1, args)
    for p0, g, p1 in zip(before, grads, after):
        # Nesterov's first step: buf = g, update = g + momentum * buf
        torch.testing.assert_close(p1, p0 - 0.1 * factor * g)


def test_lion_first_step():
    import lion_pytorch  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    lr, wd = 1e-3, 0.5
    _, before, grads, after = one_step("Lion", lr, [f"weight_decay={wd}"])
    for p0, g, p1 in zip(before, grads, after):
        torch.testing.assert_close(p1, p0 * (1 - lr * wd) - lr * torch.sign(g))


@pytest.mark.parametrize("name, states", [("AdamW8bit", 2), ("Lion8bit", 1), ("SGDNesterov8bit", 1)])
def test_bitsandbytes_8bit_states(name, states):
    import bitsandbytes  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    opt, before, _, after = one_step(name, 1e-3, n=64)  # 4096 elements: bnb quantises from there
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert [k for k in state if k.startswith("state") and state[k].dtype == torch.uint8] == [f"state{i + 1}" for i in range(states)]
    assert not torch.equal(before[0], after[0])


def test_use_8bit_adam_matches_adamw_closely():
    import bitsandbytes  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    _, _, _, ref = one_step("AdamW", 1e-3, n=64)
    _, _, _, q = one_step(resolve_optimizer_name(None, use_8bit_adam=True), 1e-3, n=64)
    torch.testing.assert_close(q[0], ref[0], atol=2e-4, rtol=0)


def test_adafactor_relative_step_ignores_learning_rate():
    a = one_step("Adafactor", 1e-6)[3]
    b = one_step("Adafactor", 1e-2)[3]
    torch.testing.assert_close(a[0], b[0])


def test_adafactor_without_relative_step_uses_learning_rate():
    args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    _, before, _, a = one_step("Adafactor", 1e-3, args)
    _, _, _, b = one_step("Adafactor", 2e-3, args)
    torch.testing.assert_close(b[0] - before[0], 2 * (a[0] - before[0]))


def test_adafactor_relative_step_refuses_schedules_and_te_rate():
    opt = one_step("Adafactor")[0]
    with pytest.raises(UserError, match="relative_step"):
        build_lr_scheduler("cosine", opt, total_steps=10, note=None)
    sched = build_lr_scheduler("constant", opt, total_steps=10, note=None)
    assert sched.get_last_lr()[0] > 0  # Adafactor's own step size, for logging
    groups = build_param_groups(Tiny(), Tiny(), learning_rate=1e-5, learning_rate_te=1e-6)
    with pytest.raises(UserError) as err:
        build_optimizer("Adafactor", groups, 1e-5, note=None)
    assert err.value.where == "--learning_rate_te"


def test_prodigy_steps_and_warns_about_a_low_learning_rate():
    import prodigyopt  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    notes = []
    model = Tiny()
    opt = build_optimizer("Prodigy", build_param_groups(model, learning_rate=1e-5), 1e-5, ["d_coef=2.0"], note=notes.append)
    assert type(opt).__name__ == "Prodigy" and opt.param_groups[0]["d_coef"] == 2.0
    assert any("1.0" in n for n in notes)
    _, before, _, after = one_step("Prodigy", 1.0)
    assert not torch.equal(before[0], after[0])


def test_class_paths_and_bare_torch_names():
    assert type(one_step("torch.optim.RAdam")[0]) is torch.optim.RAdam
    assert type(one_step("Adagrad", args=["lr_decay=0.1"])[0]).__name__ == "Adagrad"


@pytest.mark.parametrize("name, match", [("AdamX", "did you mean 'AdamW'"), ("nosuchpkg.Opt", "cannot import"),
                                         ("torch.nn.Linear", "not a torch optimizer"), ("DAdaptAdam", "pip install dadaptation")])
def test_bad_optimizer_names(name, match):
    # dadaptation is deliberately not a dependency: its optimizers must say how to install it.
    with pytest.raises(UserError, match=match) as err:
        build_optimizer(name, build_param_groups(Tiny(), learning_rate=1e-3), 1e-3, note=None)
    assert err.value.where == "--optimizer_type"


def test_resolve_optimizer_name():
    assert resolve_optimizer_name(None) == "AdamW"
    assert resolve_optimizer_name(None, use_8bit_adam=True) == "AdamW8bit"
    assert resolve_optimizer_name(None, use_lion_optimizer=True) == "Lion"
    with pytest.raises(UserError):
        resolve_optimizer_name("Lion", use_8bit_adam=True)
    with pytest.raises(UserError):
        resolve_optimizer_name(None, True, True)


# ---------------------------------------------------------------- --optimizer_args


def test_parse_optimizer_args():
    assert parse_optimizer_args(["betas=0.9,0.99", "weight_decay=1e-2", "decouple=true", "foreach=False", "mode=fast",
                                 "eps=None"]) == {"betas": (0.9, 0.99), "weight_decay": 0.01, "decouple": True,
                                                  "foreach": False, "mode": "fast", "eps": None}


@pytest.mark.parametrize("items", [["weight_decay"], ["=1"], ["a=1", "a=2"], ["lr=1"], ["x=1e-2)"]])
def test_bad_optimizer_args(items):
    with pytest.raises(UserError) as err:
        parse_optimizer_args(items)
    assert err.value.where == "--optimizer_args"


def test_optimizer_args_act_and_unknown_ones_are_refused():
    opt = one_step("AdamW", args=["betas=(0.5,0.6)"])[0]
    assert opt.param_groups[0]["betas"] == (0.5, 0.6)
    with pytest.raises(UserError, match="AdamW accepts: .*weight_decay") as err:
        one_step("AdamW", args=["weight_dekay=0.1"])
    assert err.value.where == "--optimizer_args"
    with pytest.raises(UserError):
        one_step("AdamW", args=["betas=(2.0,0.9)"])  # the optimizer's own ValueError


# ---------------------------------------------------------------- schedule-free


def test_schedule_free_eval_weights_for_sampling_and_saving():
    import schedulefree  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    model = Tiny()
    opt = build_optimizer("AdamWScheduleFree", build_param_groups(model, learning_rate=1e-2), 1e-2, note=None)
    assert is_schedule_free(opt) and not is_schedule_free(torch.optim.AdamW(Tiny().parameters()))
    for seed in range(3):  # the optimizer is in train mode already: step() would raise otherwise
        _grads(model, seed)
        opt.step()
    train_w = model.w.detach().clone()
    z = opt.state[model.w]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0]
    with eval_weights(opt):
        # y = (1 - beta1) * z + beta1 * x  =>  x = (y - (1 - beta1) * z) / beta1
        torch.testing.assert_close(model.w.detach(), (train_w - (1 - beta1) * z) / beta1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.w.detach(), train_w, rtol=1e-5, atol=1e-6)


def test_schedule_free_through_accelerate_wrapper():
    import schedulefree  # noqa: F401 - a dev dependency: missing means a broken set-up, not a skip
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = Tiny()
    opt = build_optimizer("AdamWScheduleFree", build_param_groups(model, learning_rate=1e-2), 1e-2, note=None)
    try:
        wrapped = Accelerator(cpu=True).prepare(opt)
        for seed in range(3):  # after one step the averaged and the training point still coincide
            _grads(model, seed)
            wrapped.step()
        train_w = model.w.detach().clone()
        optimizer_eval_mode(wrapped)
        assert not torch.allclose(model.w, train_w)
        optimizer_train_mode(wrapped)
        torch.testing.assert_close(model.w.detach(), train_w, rtol=1e-5, atol=1e-6)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests build their own Accelerator


def test_eval_mode_is_a_no_op_for_ordinary_optimizers():
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    w = model.w.detach().clone()
    with eval_weights(opt):
        assert torch.equal(model.w, w)


# ---------------------------------------------------------------- learning-rate schedules


def ref_multiplier(name, k, W, N, cycles=1, power=1.0, lr_end=1e-7):
    """The LR multiplier after k optimizer steps, from the schedules' definitions (optimizer steps)."""
    if name == "constant":
        return 1.0
    if k < W:
        return k / max(1, W)
    if name == "constant_with_warmup":
        return 1.0
    progress = (k - W) / max(1, N - W)
    if name == "linear":
        return max(0.0, 1 - progress)
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if name == "polynomial":
        return lr_end if k > N else (1 - lr_end) * (1 - progress) ** power + lr_end
    raise AssertionError(name)


def lr_curve(name, processes, warmup, total, **kw):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_lr_scheduler(name, opt, warmup=warmup, total_steps=total, num_processes=processes, note=None, **kw)
    out = []
    for _ in range(total + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        for _ in range(processes):  # what accelerate's prepared scheduler does per optimizer step
            sched.step()
    return out


CASES = [("constant", 0, {}), ("constant_with_warmup", 3, {}), ("linear", 3, {}), ("cosine", 0.25, {}),
         ("cosine_with_restarts", 3, {"num_cycles": 2}), ("polynomial", 0.25, {"power": 2.0})]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("name, warmup, kw", CASES)
def test_lr_schedule_curves(name, warmup, kw, processes):
    total = 12
    W = 3 if warmup else 0  # 3 steps given as a count, or as 0.25 of 12
    curve = lr_curve(name, processes, warmup, total, **kw)
    ref = [ref_multiplier(name, k, W, total, kw.get("num_cycles", 1), kw.get("power", 1.0)) for k in range(total + 1)]
    assert curve == pytest.approx(ref, abs=1e-9)


def test_num_cycles_and_power_act():
    assert lr_curve("cosine_with_restarts", 1, 0, 12, num_cycles=2) != pytest.approx(lr_curve("cosine_with_restarts", 1, 0, 12))
    assert lr_curve("polynomial", 1, 0, 12, power=2.0) != pytest.approx(lr_curve("polynomial", 1, 0, 12))


def test_resolve_warmup():
    assert resolve_warmup(0, 100) == 0
    assert resolve_warmup(10, 100) == 10 and resolve_warmup(10.0, 100) == 10
    assert resolve_warmup(0.05, 100) == 5 and resolve_warmup("5%", 100) == 5 and resolve_warmup(0.059, 100) == 5


@pytest.mark.parametrize("name, kw, where", [
    ("constant", dict(warmup=5), "--lr_warmup_steps"),
    ("linear", dict(warmup=200), "--lr_warmup_steps"),
    ("linear", dict(warmup=2.5), "--lr_warmup_steps"),
    ("cosine", dict(num_cycles=2), "--lr_scheduler_num_cycles"),
    ("linear", dict(power=2.0), "--lr_scheduler_power"),
    ("exponential", {}, "--lr_scheduler"),
])
def test_schedule_refusals(name, kw, where):
    opt = torch.optim.SGD(Tiny().parameters(), lr=1.0)
    with pytest.raises(UserError) as err:
        build_lr_scheduler(name, opt, total_steps=100, note=None, **kw)
    assert err.value.where == where
