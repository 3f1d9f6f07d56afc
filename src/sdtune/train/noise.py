"""Noise, timesteps, training targets and the weighted loss: the diffusion objective.

One training step uses it like this (all randomness from the step's `torch.Generator`):

    objective = DiffusionObjective.from_options(opts, model.scheduler_config, model.family.prediction_type)
    noise, timesteps, noisy = objective.noise_batch(latents, generator)
    pred = unet(noisy, timesteps, cond).sample
    loss = objective.loss(pred, objective.target(latents, noise, timesteps), timesteps)

The formulas follow sd-scripts (`train_util.get_noise_noisy_latents_and_timesteps`,
`conditional_loss`, `custom_train_functions`) so a run means the same thing there and here, with two
deliberate differences (docs/training-options.md):

* zero terminal SNR rescales the betas *before* any SNR is computed, so min-SNR, debiased estimation
  and the v-prediction scales see the schedule the model is actually trained on (sd-scripts computes
  its SNR table from the original betas, before the zero-terminal-SNR fix);
* `--huber_scale` acts with every Huber schedule (sd-scripts ignores it with `snr`), and
  min-SNR together with `--scale_v_pred_loss_like_noise_pred` is refused because the v-corrected
  min-SNR weight already contains that scale.

Random numbers are drawn on the CPU from the passed generator and then moved to the latents' device,
so a CPU run and a GPU run with the same seed see the same noise. Draw order per call of
`noise_batch`: noise, [offset strength], [offset noise], [per multires level: ratio, noise],
timesteps, [input-perturbation strength], [input-perturbation noise].

This module imports torch lazily so that building the configs (validation) stays torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sdtune.config import implied_value
from sdtune.errors import UserError
from sdtune.train.options import NoiseLossOptions

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler

PredictionType = Literal["epsilon", "v_prediction"]
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# sd-scripts clamps SNR at 1000 in every weight that divides by it (t = 0 has SNR ~1175 with SD's betas).
SNR_CAP = 1000.0


def _opt(options: Any, name: str, default: Any = None) -> Any:
    """The option's value; when not given, `default` (the value that turns its effect off) or, without
    one, what the option declares its absence to mean."""
    if default is None:
        default = _implied(name)
    value = getattr(options, name, default)
    return default if value is None else value


def _implied(name: str) -> Any:
    return implied_value(NoiseLossOptions, name)


@dataclass(frozen=True)
class NoiseConfig:
    """How the noise and the timesteps of a batch are drawn (sd-scripts' flag names)."""

    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = _implied("multires_noise_discount")
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = _implied("min_timestep")
    max_timestep: int | None = None  # None: the scheduler's num_train_timesteps
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.noise_offset < 0:
            raise UserError(f"must be >= 0, got {self.noise_offset}", where="--noise_offset")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise UserError("needs --noise_offset (it scales the offset by the latents' mean)",
                            where="--adaptive_noise_scale", fix="Add --noise_offset, e.g. 0.05.")
        if self.noise_offset_random_strength and not self.noise_offset:
            raise UserError("needs --noise_offset", where="--noise_offset_random_strength",
                            fix="Add --noise_offset, or drop --noise_offset_random_strength.")
        if self.multires_noise_iterations < 0:
            raise UserError(f"must be >= 0, got {self.multires_noise_iterations}", where="--multires_noise_iterations")
        if not 0 < self.multires_noise_discount <= 1:
            raise UserError(f"must be in (0, 1], got {self.multires_noise_discount}", where="--multires_noise_discount")
        if self.ip_noise_gamma < 0:
            raise UserError(f"must be >= 0, got {self.ip_noise_gamma}", where="--ip_noise_gamma")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise UserError("needs --ip_noise_gamma", where="--ip_noise_gamma_random_strength",
                            fix="Add --ip_noise_gamma, e.g. 0.1, or drop --ip_noise_gamma_random_strength.")
        if self.min_timestep < 0:
            raise UserError(f"must be >= 0, got {self.min_timestep}", where="--min_timestep")
        if self.max_timestep is not None and self.max_timestep < self.min_timestep:
            raise UserError(f"--max_timestep {self.max_timestep} is below --min_timestep {self.min_timestep}",
                            where="--max_timestep", fix="Timesteps are drawn from [min_timestep, max_timestep).")

    @classmethod
    def from_options(cls, options: Any) -> "NoiseConfig":
        """From the typed training options (duck-typed: missing attributes take the defaults)."""
        discount = getattr(options, "multires_noise_discount", None)
        if discount is not None and not getattr(options, "multires_noise_iterations", None):
            raise UserError("has no effect without --multires_noise_iterations", where="--multires_noise_discount",
                            fix="Add --multires_noise_iterations, e.g. 6, or drop --multires_noise_discount.")
        return cls(
            noise_offset=float(_opt(options, "noise_offset", 0.0)),
            noise_offset_random_strength=bool(_opt(options, "noise_offset_random_strength", False)),
            adaptive_noise_scale=getattr(options, "adaptive_noise_scale", None),
            multires_noise_iterations=int(_opt(options, "multires_noise_iterations", 0)),
            multires_noise_discount=float(_opt(options, "multires_noise_discount")),
            ip_noise_gamma=float(_opt(options, "ip_noise_gamma", 0.0)),
            ip_noise_gamma_random_strength=bool(_opt(options, "ip_noise_gamma_random_strength", False)),
            min_timestep=int(_opt(options, "min_timestep")),
            max_timestep=getattr(options, "max_timestep", None),
            zero_terminal_snr=bool(_opt(options, "zero_terminal_snr", False)),
        )

    def timestep_range(self, num_train_timesteps: int) -> tuple[int, int]:
        """[low, high) of the drawn timesteps; low == high means always `low`."""
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if high > num_train_timesteps:
            raise UserError(f"{high} is beyond the model's {num_train_timesteps} training timesteps",
                            where="--max_timestep", fix=f"Use at most {num_train_timesteps}.")
        if self.min_timestep >= num_train_timesteps:
            raise UserError(f"{self.min_timestep} is beyond the model's last timestep {num_train_timesteps - 1}",
                            where="--min_timestep")
        if self.min_timestep == high == num_train_timesteps:
            raise UserError(f"--min_timestep = --max_timestep = {high} leaves no valid timestep", where="--max_timestep",
                            fix=f"Timesteps go from 0 to {num_train_timesteps - 1}.")
        return self.min_timestep, high


@dataclass(frozen=True)
class LossConfig:
    """What the U-Net is trained to predict and how the per-sample loss is weighted."""

    prediction_type: PredictionType = "epsilon"
    loss_type: str = _implied("loss_type")
    huber_schedule: str = _implied("huber_schedule")
    huber_c: float = _implied("huber_c")
    huber_scale: float = _implied("huber_scale")
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction type {self.prediction_type!r} is not supported for training",
                            fix="sdtune trains epsilon or v-prediction models (--v_parameterization).")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"unknown loss {self.loss_type!r}", where="--loss_type", fix=f"Use one of {', '.join(LOSS_TYPES)}.")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(f"unknown schedule {self.huber_schedule!r}", where="--huber_schedule",
                            fix=f"Use one of {', '.join(HUBER_SCHEDULES)}.")
        if not self.huber_c > 0:
            raise UserError(f"must be > 0, got {self.huber_c}", where="--huber_c")
        if not self.huber_scale > 0:
            raise UserError(f"must be > 0, got {self.huber_scale}", where="--huber_scale")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise UserError(f"must be > 0, got {self.min_snr_gamma}", where="--min_snr_gamma", fix="5 is the usual value.")
        v_pred = self.prediction_type == "v_prediction"
        if self.scale_v_pred_loss_like_noise_pred:
            if not v_pred:
                raise UserError("only applies to v-prediction models", where="--scale_v_pred_loss_like_noise_pred",
                                fix="Drop it, or train a v-prediction model (--v2 --v_parameterization).")
            if self.min_snr_gamma is not None:
                raise UserError(
                    "--min_snr_gamma already weights v-prediction by min(SNR, gamma)/(SNR+1), which contains the "
                    "SNR/(SNR+1) of --scale_v_pred_loss_like_noise_pred; both together scale the loss twice "
                    "(sd-scripts does that silently)", where="--scale_v_pred_loss_like_noise_pred",
                    fix="Drop --scale_v_pred_loss_like_noise_pred.")
        if self.v_pred_like_loss is not None:
            if v_pred:
                raise UserError("adds a v-prediction-like term to an epsilon loss; the model already predicts v",
                                where="--v_pred_like_loss", fix="Drop --v_pred_like_loss.")
            if not self.v_pred_like_loss > 0:
                raise UserError(f"must be > 0, got {self.v_pred_like_loss}", where="--v_pred_like_loss")

    @classmethod
    def from_options(cls, options: Any, prediction_type: str) -> "LossConfig":
        """From the typed options; the prediction type comes from the model family (after --v_parameterization)."""
        loss_type = _opt(options, "loss_type")
        if loss_type not in ("huber", "smooth_l1"):
            for name in ("huber_schedule", "huber_c", "huber_scale"):
                if getattr(options, name, None) is not None:
                    raise UserError(f"only acts with --loss_type huber or smooth_l1 (this run uses {loss_type})",
                                    where=f"--{name}", fix=f"Drop --{name} or set --loss_type huber.")
        return cls(
            prediction_type=prediction_type,  # type: ignore[arg-type]
            loss_type=loss_type,
            huber_schedule=_opt(options, "huber_schedule"),
            huber_c=float(_opt(options, "huber_c")),
            huber_scale=float(_opt(options, "huber_scale")),
            min_snr_gamma=getattr(options, "min_snr_gamma", None),
            scale_v_pred_loss_like_noise_pred=bool(_opt(options, "scale_v_pred_loss_like_noise_pred", False)),
            v_pred_like_loss=getattr(options, "v_pred_like_loss", None),
            debiased_estimation_loss=bool(_opt(options, "debiased_estimation_loss", False)),
        )

    @property
    def weighted(self) -> bool:
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss
                    or self.debiased_estimation_loss)


# ---------------------------------------------------------------- scheduler and SNR


def prepare_scheduler(scheduler_config: dict[str, Any], prediction_type: str, zero_terminal_snr: bool) -> "DDPMScheduler":
    """The training DDPMScheduler: the model's betas, rescaled to zero terminal SNR when asked.

    The rescale happens inside the scheduler's constructor (diffusers' `rescale_betas_zero_snr`), so
    `alphas_cumprod` and every SNR derived from it come from the rescaled betas. A source config that
    is already zero-terminal-SNR stays so.
    """
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config["prediction_type"] = prediction_type
    config["rescale_betas_zero_snr"] = bool(zero_terminal_snr or config.get("rescale_betas_zero_snr"))
    return DDPMScheduler.from_config(config)


def snr_table(scheduler: "DDPMScheduler") -> "torch.Tensor":
    """SNR(t) = alpha_bar / (1 - alpha_bar) for every training timestep (float32, CPU); 0 at a zero-SNR end."""
    import torch

    abar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    return (abar / (1.0 - abar)).to(torch.float32)


# ---------------------------------------------------------------- noise and timesteps


def _randn(shape, generator: "torch.Generator", like: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device)


def _rand(generator: "torch.Generator") -> float:
    import torch

    return float(torch.rand((), generator=generator, dtype=torch.float64))


def sample_noise(latents: "torch.Tensor", generator: "torch.Generator", cfg: NoiseConfig) -> "torch.Tensor":
    """Gaussian noise for `latents`, with offset noise and multires (pyramid) noise as configured."""
    import torch.nn.functional as F

    noise = _randn(latents.shape, generator, latents)
    if cfg.noise_offset:
        strength: Any = cfg.noise_offset * _rand(generator) if cfg.noise_offset_random_strength else cfg.noise_offset
        if cfg.adaptive_noise_scale is not None:
            # larger offset for images whose latents are far from zero mean (per image and channel)
            mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs()
            strength = (strength + cfg.adaptive_noise_scale * mean).clamp(min=0.0)
        noise = noise + strength * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents)
    if cfg.multires_noise_iterations:
        b, c, h, w = noise.shape
        for i in range(cfg.multires_noise_iterations):
            # a random 2..4x downscale per level rather than always 2x (sd-scripts' pyramid noise);
            # level 0 has ratio 1, i.e. a second full-resolution noise, as sd-scripts does
            ratio = 2.0 + 2.0 * _rand(generator)
            hn, wn = max(1, int(h / ratio**i)), max(1, int(w / ratio**i))
            level = _randn((b, c, hn, wn), generator, latents)
            noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * cfg.multires_noise_discount**i
            if hn == 1 or wn == 1:
                break
        noise = noise / noise.std()  # one std over the whole batch, as sd-scripts
    return noise.to(latents.dtype)


def sample_timesteps(batch_size: int, generator: "torch.Generator", cfg: NoiseConfig, num_train_timesteps: int = 1000,
                     device: Any = None) -> "torch.Tensor":
    """Integer timesteps, uniform in [min_timestep, max_timestep); constant when the two are equal."""
    import torch

    low, high = cfg.timestep_range(num_train_timesteps)
    if low == high:
        t = torch.full((batch_size,), low, dtype=torch.long)
    else:
        t = torch.randint(low, high, (batch_size,), generator=generator, dtype=torch.long)
    return t.to(device) if device is not None else t


def noisy_latents(scheduler: "DDPMScheduler", latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor",
                  generator: "torch.Generator", cfg: NoiseConfig) -> "torch.Tensor":
    """x_t from the latents and the noise; input perturbation (ip_noise_gamma) changes only this input,
    the target keeps the unperturbed noise (Ning et al. 2023)."""
    if cfg.ip_noise_gamma:
        gamma = cfg.ip_noise_gamma * _rand(generator) if cfg.ip_noise_gamma_random_strength else cfg.ip_noise_gamma
        noise = noise + gamma * _randn(latents.shape, generator, latents).to(noise.dtype)
    return scheduler.add_noise(latents, noise, timesteps.to(latents.device))


def target(scheduler: "DDPMScheduler", latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor",
           prediction_type: str) -> "torch.Tensor":
    """What the U-Net should output: the noise (epsilon) or v = sqrt(abar)*noise - sqrt(1-abar)*latents."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
    raise UserError(f"prediction type {prediction_type!r} is not supported for training")


# ---------------------------------------------------------------- loss


def huber_c(timesteps: "torch.Tensor", snr: "torch.Tensor", cfg: LossConfig, num_train_timesteps: int) -> "torch.Tensor":
    """Per-sample Huber threshold c_t (float32, on the timesteps' device)."""
    import torch

    t = timesteps.detach().to("cpu")
    if cfg.huber_schedule == "constant":
        c = torch.full(t.shape, cfg.huber_c, dtype=torch.float32)
    elif cfg.huber_schedule == "exponential":
        # from 1 at t=0 down to huber_c at t=T
        c = torch.exp(math.log(cfg.huber_c) * t.to(torch.float32) / num_train_timesteps)
    else:
        # sigma_t = sqrt((1-abar)/abar) = 1/sqrt(SNR): c -> 1 at low noise, -> huber_c at high noise
        sigma = 1.0 / snr[t].to(torch.float64).sqrt()
        c = ((1.0 - cfg.huber_c) / (1.0 + sigma) ** 2 + cfg.huber_c).to(torch.float32)
    return (c * cfg.huber_scale).to(timesteps.device)


def elementwise_loss(pred: "torch.Tensor", tgt: "torch.Tensor", cfg: LossConfig, c: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The unreduced loss in float32; `c` is the per-sample Huber threshold for huber / smooth_l1."""
    import torch.nn.functional as F

    pred, tgt = pred.float(), tgt.float()
    if cfg.loss_type == "l2":
        return F.mse_loss(pred, tgt, reduction="none")
    if cfg.loss_type == "l1":
        return F.l1_loss(pred, tgt, reduction="none")
    if c is None:
        raise ValueError("huber / smooth_l1 need the per-sample threshold c")
    c = c.float().view(-1, *([1] * (pred.dim() - 1)))
    pseudo = ((pred - tgt) ** 2 + c**2).sqrt() - c
    return 2 * c * pseudo if cfg.loss_type == "huber" else 2 * pseudo


def apply_mask(loss: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    """The element-wise loss times the mask, area-resized to the loss's size when it differs (sd-scripts'
    masked loss). The mean over the elements comes after, so a half-transparent image counts half:
    transparent latents contribute neither loss nor gradient."""
    import torch.nn.functional as F

    mask = mask.to(loss.device, loss.dtype)
    if mask.dim() == loss.dim() - 1:
        mask = mask.unsqueeze(1)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


def loss_weights(snr_t: "torch.Tensor", cfg: LossConfig, snr_floor: float = 0.0) -> "torch.Tensor | None":
    """Per-sample weights in sd-scripts' order (min-SNR, v-pred scale, v-pred-like term, debiased); None if unweighted.

    `snr_floor` (the smallest positive SNR of the schedule) keeps the weights that divide by SNR finite
    at a zero-terminal-SNR step, where SNR is exactly 0.
    """
    import torch

    if not cfg.weighted:
        return None
    v_pred = cfg.prediction_type == "v_prediction"
    snr = snr_t.to(torch.float32)
    capped = snr.clamp(min=snr_floor, max=SNR_CAP)
    w = torch.ones_like(snr)
    if cfg.min_snr_gamma:
        gamma = float(cfg.min_snr_gamma)
        if v_pred:
            w = w * torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
        else:
            # min(SNR, gamma)/SNR, written so SNR = 0 gives its limit 1 instead of 0/0
            w = w * (gamma / snr).clamp(max=1.0)
    if cfg.scale_v_pred_loss_like_noise_pred:
        w = w * capped / (capped + 1)
    if cfg.v_pred_like_loss:
        # loss + loss / scale * v_pred_like_loss, scale = SNR/(SNR+1)
        w = w * (1 + cfg.v_pred_like_loss * (capped + 1) / capped)
    if cfg.debiased_estimation_loss:
        w = w * (1 / (capped + 1) if v_pred else 1 / capped.sqrt())
    return w


class DiffusionObjective:
    """The training scheduler plus the noise and loss settings: everything a step needs besides the U-Net."""

    def __init__(self, scheduler_config: dict[str, Any], noise: NoiseConfig, loss: LossConfig):
        self.noise_cfg = noise
        self.loss_cfg = loss
        self.scheduler = prepare_scheduler(scheduler_config, loss.prediction_type, noise.zero_terminal_snr)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        noise.timestep_range(self.num_train_timesteps)  # fail now, not at the first step
        self.snr = snr_table(self.scheduler)
        positive = self.snr[self.snr > 0]
        self.snr_floor = float(positive.min()) if len(positive) else 0.0
        self.notes: list[str] = []
        if self.scheduler.config.rescale_betas_zero_snr and loss.prediction_type == "epsilon":
            self.notes.append("--zero_terminal_snr with an epsilon-prediction model: at the last timestep the input "
                              "is pure noise and the target equals the input, so that step teaches nothing; zero "
                              "terminal SNR is meant for v-prediction (--v_parameterization)")
            if loss.debiased_estimation_loss:
                self.notes.append(f"--debiased_estimation_loss weights by 1/sqrt(SNR), which reaches "
                                  f"{1 / math.sqrt(self.snr_floor):.0f} near the zero-SNR end of the schedule")

    @classmethod
    def from_options(cls, options: Any, scheduler_config: dict[str, Any], prediction_type: str) -> "DiffusionObjective":
        return cls(scheduler_config, NoiseConfig.from_options(options), LossConfig.from_options(options, prediction_type))

    @property
    def prediction_type(self) -> str:
        return self.loss_cfg.prediction_type

    def noise_batch(self, latents: "torch.Tensor", generator: "torch.Generator"):
        """(noise, timesteps, noisy_latents) for one batch; `noise` is the one the target uses."""
        noise = sample_noise(latents, generator, self.noise_cfg)
        timesteps = sample_timesteps(latents.shape[0], generator, self.noise_cfg, self.num_train_timesteps, latents.device)
        return noise, timesteps, noisy_latents(self.scheduler, latents, noise, timesteps, generator, self.noise_cfg)

    def target(self, latents: "torch.Tensor", noise: "torch.Tensor", timesteps: "torch.Tensor") -> "torch.Tensor":
        return target(self.scheduler, latents, noise, timesteps, self.prediction_type)

    def per_sample_loss(self, pred: "torch.Tensor", tgt: "torch.Tensor", timesteps: "torch.Tensor",
                        mask: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The weighted loss of each sample, shape (batch,), float32; `mask` weights its elements (alpha_mask)."""
        cfg = self.loss_cfg
        c = huber_c(timesteps, self.snr, cfg, self.num_train_timesteps) if cfg.loss_type in ("huber", "smooth_l1") else None
        loss = elementwise_loss(pred, tgt, cfg, c)
        if mask is not None:
            loss = apply_mask(loss, mask)
        loss = loss.mean(dim=tuple(range(1, loss.dim())))
        w = loss_weights(self.snr[timesteps.detach().to("cpu")], cfg, self.snr_floor)
        return loss if w is None else loss * w.to(loss.device)

    def loss(self, pred: "torch.Tensor", tgt: "torch.Tensor", timesteps: "torch.Tensor",
             mask: "torch.Tensor | None" = None) -> "torch.Tensor":
        """The batch loss: the mean of the weighted per-sample losses."""
        return self.per_sample_loss(pred, tgt, timesteps, mask).mean()
