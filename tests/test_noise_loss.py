"""Noise, timesteps, targets and loss weights against formulas written out here (or diffusers' own
`compute_snr`), on tiny tensors. Each option has a test that fails if the option were ignored."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import compute_snr

from sdtune.errors import UserError
from sdtune.families import SD1, SD2_V
from sdtune.train.noise import (
    DiffusionObjective,
    LossConfig,
    NoiseConfig,
    prepare_scheduler,
    sample_noise,
    sample_timesteps,
)

SCHED = json.loads((SD1.asset_dir / "scheduler" / "scheduler_config.json").read_text())
T = 1000


def ref_alphas_cumprod(zero_terminal_snr=False):
    """SD's scaled-linear betas, and Lin et al. 2023 Algorithm 1 for zero terminal SNR, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        s = abar.sqrt()
        first, last = s[0].clone(), s[-1].clone()
        s = (s - last) * first / (first - last)
        abar = s**2
    return abar


def ref_snr(zero_terminal_snr=False):
    abar = ref_alphas_cumprod(zero_terminal_snr)
    return abar / (1 - abar)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def objective(prediction_type="epsilon", zero_terminal_snr=False, **loss):
    return DiffusionObjective(SCHED, NoiseConfig(zero_terminal_snr=zero_terminal_snr),
                              LossConfig(prediction_type=prediction_type, **loss))


# ---------------------------------------------------------------- scheduler / zero terminal SNR


def test_scheduler_matches_sd_betas():
    sched = prepare_scheduler(SCHED, "epsilon", zero_terminal_snr=False)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ref_alphas_cumprod(), atol=1e-6, rtol=1e-5)


def test_zero_terminal_snr_rescales_before_the_snr_table():
    obj = objective(zero_terminal_snr=True)
    abar = ref_alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(obj.scheduler.alphas_cumprod.double(), abar, atol=1e-6, rtol=1e-5)
    assert float(obj.scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-9)
    # the SNR the weights use is the one of the rescaled schedule (sd-scripts uses the original: its bug)
    t = torch.arange(T)
    ref = DiffusionObjective(SCHED, NoiseConfig(), LossConfig()).scheduler
    ref.betas, ref.alphas_cumprod = None, abar.float()
    torch.testing.assert_close(obj.snr, compute_snr(ref, t), rtol=1e-4, atol=1e-9)
    assert obj.snr[-1] == 0 and ref_snr(False)[-1] > 4e-3


def test_zero_terminal_snr_changes_min_snr_weights_to_the_rescaled_schedule():
    t = torch.tensor([500, 900, 999])
    pred, tgt = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    obj = objective("v_prediction", zero_terminal_snr=True, min_snr_gamma=5.0)
    snr = ref_snr(True)[t]
    expected = ((pred - tgt) ** 2).mean((1, 2, 3)) * (snr.clamp(max=5.0) / (snr + 1)).float()
    torch.testing.assert_close(obj.per_sample_loss(pred, tgt, t), expected, rtol=1e-4, atol=1e-7)
    assert obj.per_sample_loss(pred, tgt, t)[-1] == 0  # SNR 0 at the end: min(0, 5)/(0+1)


def test_zero_terminal_snr_epsilon_weights_stay_finite():
    obj = objective("epsilon", zero_terminal_snr=True, min_snr_gamma=5.0, debiased_estimation_loss=True)
    t = torch.tensor([998, 999])
    out = obj.per_sample_loss(torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), t)
    assert torch.isfinite(out).all()
    assert any("epsilon" in n for n in obj.notes)


# ---------------------------------------------------------------- noise


def test_plain_noise_is_the_generators_normal_draw_and_leaves_the_global_rng_alone():
    latents = torch.randn(2, 4, 8, 8)
    state = torch.random.get_rng_state()
    noise = sample_noise(latents, gen(3), NoiseConfig())
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(noise, torch.randn(2, 4, 8, 8, generator=gen(3)))


def test_noise_offset():
    latents = torch.randn(2, 4, 8, 8)
    noise = sample_noise(latents, gen(4), NoiseConfig(noise_offset=0.3))
    g = gen(4)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, eps + 0.3 * offset)


def test_noise_offset_random_strength():
    latents = torch.randn(2, 4, 8, 8)
    noise = sample_noise(latents, gen(5), NoiseConfig(noise_offset=0.3, noise_offset_random_strength=True))
    g = gen(5)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    offset = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, eps + 0.3 * u * offset)
    assert 0 < u < 1


def test_adaptive_noise_scale():
    latents = torch.randn(2, 4, 8, 8) + torch.tensor([2.0, -1.0, 0.0, 0.5]).view(1, 4, 1, 1)
    noise = sample_noise(latents, gen(6), NoiseConfig(noise_offset=0.1, adaptive_noise_scale=-0.2))
    g = gen(6)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    strength = (0.1 - 0.2 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    torch.testing.assert_close(noise, eps + strength * offset)
    assert (strength == 0).any() and (strength > 0).any()  # the clamp at 0 is exercised


def test_multires_noise_written_out():
    latents = torch.zeros(2, 4, 16, 12)
    cfg = NoiseConfig(multires_noise_iterations=3, multires_noise_discount=0.5)
    noise = sample_noise(latents, gen(7), cfg)
    g = gen(7)
    expected = torch.randn(2, 4, 16, 12, generator=g)
    for i in range(3):
        r = 2 + 2 * float(torch.rand((), generator=g, dtype=torch.float64))
        h, w = max(1, int(16 / r**i)), max(1, int(12 / r**i))
        low = torch.randn(2, 4, h, w, generator=g)
        expected = expected + torch.nn.Upsample(size=(16, 12), mode="bilinear")(low) * 0.5**i
    expected = expected / expected.std()
    torch.testing.assert_close(noise, expected)


def test_multires_noise_adds_low_frequencies():
    latents = torch.zeros(8, 4, 32, 32)
    plain = sample_noise(latents, gen(8), NoiseConfig())
    pyramid = sample_noise(latents, gen(8), NoiseConfig(multires_noise_iterations=6, multires_noise_discount=0.8))
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # the spatial mean of white noise has variance 1/(32*32); pyramid noise carries far more
    assert plain.mean((2, 3)).var() < 3 / 1024 < 10 * 3 / 1024 < pyramid.mean((2, 3)).var()


def test_noise_keeps_the_latents_dtype():
    latents = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    assert sample_noise(latents, gen(), NoiseConfig(noise_offset=0.1, multires_noise_iterations=2)).dtype == torch.bfloat16


# ---------------------------------------------------------------- timesteps


def test_timesteps_default_cover_0_to_999():
    t = sample_timesteps(20000, gen(9), NoiseConfig())
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999


def test_min_and_max_timestep():
    t = sample_timesteps(5000, gen(10), NoiseConfig(min_timestep=200, max_timestep=300))
    assert t.min() == 200 and t.max() == 299
    t = sample_timesteps(4, gen(10), NoiseConfig(min_timestep=250, max_timestep=250))
    assert t.tolist() == [250] * 4


@pytest.mark.parametrize("kw", [dict(max_timestep=1001), dict(min_timestep=1000), dict(min_timestep=1000, max_timestep=1000)])
def test_timestep_range_beyond_the_schedule_is_refused(kw):
    with pytest.raises(UserError, match="timestep"):
        DiffusionObjective(SCHED, NoiseConfig(**kw), LossConfig())


def test_max_below_min_timestep_is_refused():
    with pytest.raises(UserError, match="--max_timestep"):
        NoiseConfig(min_timestep=500, max_timestep=100)


# ---------------------------------------------------------------- noisy input and targets


def test_noise_batch_epsilon_and_v_targets():
    latents = torch.randn(3, 4, 8, 8, generator=gen(11))
    for prediction_type in ("epsilon", "v_prediction"):
        obj = objective(prediction_type)
        noise, t, noisy = obj.noise_batch(latents, gen(12))
        g = gen(12)
        eps = torch.randn(3, 4, 8, 8, generator=g)
        t_ref = torch.randint(0, T, (3,), generator=g)
        assert torch.equal(t, t_ref)
        torch.testing.assert_close(noise, eps)
        a = ref_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)
        expected = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * latents
        torch.testing.assert_close(obj.target(latents, noise, t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_perturbs_the_input_only(random_strength):
    latents = torch.randn(2, 4, 8, 8, generator=gen(13))
    obj = DiffusionObjective(SCHED, NoiseConfig(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=random_strength),
                             LossConfig())
    noise, t, noisy = obj.noise_batch(latents, gen(14))
    g = gen(14)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    torch.randint(0, T, (2,), generator=g)
    gamma = 0.2 * float(torch.rand((), generator=g, dtype=torch.float64)) if random_strength else 0.2
    extra = torch.randn(2, 4, 8, 8, generator=g)
    a = ref_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * (eps + gamma * extra), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obj.target(latents, noise, t), eps)  # the target keeps the unperturbed noise


def test_v2_family_trains_v_prediction_from_its_config():
    sched = json.loads((SD2_V.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    obj = DiffusionObjective.from_options(SimpleNamespace(), sched, SD2_V.prediction_type)
    latents, noise, t = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999])
    a = ref_alphas_cumprod()[999].item()
    torch.testing.assert_close(obj.target(latents, noise, t), torch.full_like(latents, -math.sqrt(1 - a)))


# ---------------------------------------------------------------- loss types


def _pair():
    return torch.randn(4, 4, 8, 8, generator=gen(15)), torch.randn(4, 4, 8, 8, generator=gen(16))


T4 = torch.tensor([0, 10, 500, 999])


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_l2_l1(loss_type):
    pred, tgt = _pair()
    obj = objective(loss_type=loss_type)
    d = pred - tgt
    expected = (d**2 if loss_type == "l2" else d.abs()).mean((1, 2, 3))
    torch.testing.assert_close(obj.per_sample_loss(pred, tgt, T4), expected)
    torch.testing.assert_close(obj.loss(pred, tgt, T4), expected.mean())


def _huber_c(schedule, c, scale):
    if schedule == "constant":
        return torch.full((4,), c * scale, dtype=torch.float64)
    if schedule == "exponential":
        return torch.exp(math.log(c) * T4.double() / T) * scale
    abar = ref_alphas_cumprod()[T4]
    sigma = ((1 - abar) / abar).sqrt()
    return ((1 - c) / (1 + sigma) ** 2 + c) * scale


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_and_smooth_l1_with_each_schedule(loss_type, schedule):
    pred, tgt = _pair()
    obj = objective(loss_type=loss_type, huber_schedule=schedule, huber_c=0.2, huber_scale=1.5)
    c = _huber_c(schedule, 0.2, 1.5).view(-1, 1, 1, 1)
    d = (pred - tgt).double()
    elem = 2 * ((d**2 + c**2).sqrt() - c)
    if loss_type == "huber":
        elem = c * elem
    torch.testing.assert_close(obj.per_sample_loss(pred, tgt, T4), elem.mean((1, 2, 3)).float(), rtol=1e-5, atol=1e-6)


def test_huber_c_acts():
    pred, tgt = _pair()
    a = objective(loss_type="huber", huber_schedule="constant", huber_c=0.1).loss(pred, tgt, T4)
    b = objective(loss_type="huber", huber_schedule="constant", huber_c=0.5).loss(pred, tgt, T4)
    assert not torch.isclose(a, b)


# ---------------------------------------------------------------- loss weights


def _weights(obj, t):
    pred, tgt = torch.ones(len(t), 4, 2, 2), torch.zeros(len(t), 4, 2, 2)  # unweighted loss = 1 per sample
    return obj.per_sample_loss(pred, tgt, t).double()


T5 = torch.tensor([0, 1, 100, 500, 999])


def _snr(t):
    ref = DiffusionObjective(SCHED, NoiseConfig(), LossConfig()).scheduler
    return compute_snr(ref, t).double()  # diffusers' own SNR as the reference


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma(prediction_type):
    snr = _snr(T5)
    denom = snr if prediction_type == "epsilon" else snr + 1
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / denom
    torch.testing.assert_close(_weights(objective(prediction_type, min_snr_gamma=5.0), T5), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation(prediction_type):
    snr = _snr(T5).clamp(max=1000)
    expected = 1 / snr.sqrt() if prediction_type == "epsilon" else 1 / (snr + 1)
    torch.testing.assert_close(_weights(objective(prediction_type, debiased_estimation_loss=True), T5), expected, rtol=1e-5, atol=1e-8)


def test_scale_v_pred_loss_like_noise_pred():
    snr = _snr(T5).clamp(max=1000)
    w = _weights(objective("v_prediction", scale_v_pred_loss_like_noise_pred=True), T5)
    torch.testing.assert_close(w, snr / (snr + 1), rtol=1e-5, atol=1e-8)


def test_v_pred_like_loss():
    snr = _snr(T5).clamp(max=1000)
    w = _weights(objective("epsilon", v_pred_like_loss=0.3), T5)
    torch.testing.assert_close(w, 1 + 0.3 / (snr / (snr + 1)), rtol=1e-5, atol=1e-8)


def test_weights_combine_in_sd_scripts_order():
    snr = _snr(T5)
    capped = snr.clamp(max=1000)
    w = _weights(objective("v_prediction", min_snr_gamma=2.0, debiased_estimation_loss=True), T5)
    torch.testing.assert_close(w, torch.minimum(snr, torch.full_like(snr, 2.0)) / (snr + 1) / (capped + 1), rtol=1e-5, atol=1e-9)


def test_weighted_loss_is_the_mean_of_weighted_samples():
    pred, tgt = _pair()
    obj = objective(min_snr_gamma=5.0)
    snr = _snr(T4)
    per = ((pred - tgt) ** 2).mean((1, 2, 3)).double() * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(obj.loss(pred, tgt, T4).double(), per.mean(), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- refusals and options


@pytest.mark.parametrize("kw, where", [
    (dict(prediction_type="epsilon", scale_v_pred_loss_like_noise_pred=True), "--scale_v_pred_loss_like_noise_pred"),
    (dict(prediction_type="v_prediction", scale_v_pred_loss_like_noise_pred=True, min_snr_gamma=5.0),
     "--scale_v_pred_loss_like_noise_pred"),
    (dict(prediction_type="v_prediction", v_pred_like_loss=0.1), "--v_pred_like_loss"),
    (dict(loss_type="l3"), "--loss_type"),
    (dict(loss_type="huber", huber_schedule="cosine"), "--huber_schedule"),
    (dict(min_snr_gamma=0.0), "--min_snr_gamma"),
    (dict(huber_c=0.0), "--huber_c"),
])
def test_loss_config_refuses(kw, where):
    with pytest.raises(UserError) as err:
        LossConfig(**kw)
    assert err.value.where == where


@pytest.mark.parametrize("kw, where", [
    (dict(adaptive_noise_scale=0.1), "--adaptive_noise_scale"),
    (dict(noise_offset_random_strength=True), "--noise_offset_random_strength"),
    (dict(ip_noise_gamma_random_strength=True), "--ip_noise_gamma_random_strength"),
    (dict(multires_noise_discount=0.3), "--multires_noise_discount"),
    (dict(huber_c=0.2), "--huber_c"),
    (dict(loss_type="l1", huber_schedule="snr"), "--huber_schedule"),
    (dict(noise_offset=-0.1), "--noise_offset"),
])
def test_options_that_would_not_act_are_refused(kw, where):
    options = SimpleNamespace(**kw)
    with pytest.raises(UserError) as err:
        DiffusionObjective.from_options(options, SCHED, "epsilon")
    assert err.value.where == where


def test_from_options_reads_every_field():
    opts = SimpleNamespace(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                           multires_noise_iterations=4, multires_noise_discount=0.4, ip_noise_gamma=0.1,
                           ip_noise_gamma_random_strength=True, min_timestep=10, max_timestep=900,
                           zero_terminal_snr=True, loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.3,
                           huber_scale=2.0, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=False,
                           v_pred_like_loss=None, debiased_estimation_loss=True)
    obj = DiffusionObjective.from_options(opts, SCHED, "v_prediction")
    for name in vars(opts):
        cfg = obj.noise_cfg if hasattr(obj.noise_cfg, name) else obj.loss_cfg
        assert getattr(cfg, name) == getattr(opts, name), name
    assert obj.scheduler.config.rescale_betas_zero_snr and obj.prediction_type == "v_prediction"
