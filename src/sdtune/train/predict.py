"""The one way the model is asked for a prediction: training, validation and sampling all come here.

`denoise` (from sdtune.model) is the only place that calls the U-Net (or whatever module a training
target puts in its place, e.g. the U-Net with a hypernetwork applied). `Predictor.predict` turns clean latents and their
conditioning into a `Prediction` (what the model said, what it should have said, at which timesteps,
with which per-pixel loss weights); the training step and validation both use it, so they can never
disagree about noise, targets, precision or attention kernels. Sampling calls `denoise` directly,
since a sampler's scheduler decides the noise levels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

from sdtune.model import denoise

if TYPE_CHECKING:
    import torch

    from sdtune.train.noise import DiffusionObjective


@dataclass
class Prediction:
    prediction: "torch.Tensor"  # float32, the model's output
    target: "torch.Tensor"  # float32, what it should have been (noise or v)
    timesteps: "torch.Tensor"
    weights: "torch.Tensor | None" = None  # per-pixel loss weights (alpha masks); None: uniform


class Predictor:
    """The objective's noise and target around one model call, in the run's precision and attention.

    `autocast` is the run's forward-pass context factory (accelerate's, for mixed precision);
    `attention` the attention-kernel context factory (e.g. SDPA restricted to one kernel).
    """

    def __init__(self, objective: "DiffusionObjective", autocast: Callable[[], ContextManager] | None = None,
                 attention: Callable[[], ContextManager] | None = None):
        self.objective = objective
        self.autocast = autocast or contextlib.nullcontext
        self.attention = attention or contextlib.nullcontext

    def predict(self, model, latents: "torch.Tensor", cond: "torch.Tensor", *, generator=None, noise=None,
                timesteps=None, weights=None) -> Prediction:
        """With `generator`, noise and timesteps are drawn from it (training); else the given
        `noise` at the given `timesteps` is used (validation's fixed draws)."""
        objective = self.objective
        if noise is None:
            noise, timesteps, noisy = objective.noise_batch(latents, generator)
        else:
            noisy = objective.scheduler.add_noise(latents, noise, timesteps)
        with self.autocast(), self.attention():
            output = denoise(model, noisy, timesteps, cond)
        return Prediction(output.float(), objective.target(latents, noise, timesteps).float(), timesteps, weights)

    def loss(self, prediction: Prediction) -> "torch.Tensor":
        """The batch's weighted training loss (a scalar)."""
        p = prediction
        return self.objective.loss(p.prediction, p.target, p.timesteps, p.weights)

    def per_sample_loss(self, prediction: Prediction) -> "torch.Tensor":
        p = prediction
        return self.objective.per_sample_loss(p.prediction, p.target, p.timesteps, p.weights)
