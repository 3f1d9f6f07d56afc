"""The loaded model: the components of one Stable Diffusion checkpoint and what travels with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtune.families import Family

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class SDModel:
    family: Family
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizer"
    # Noise-scheduler config (betas, timesteps, prediction type), from the source or the family's assets.
    scheduler_config: dict[str, Any]
    # Original-layout tensors that no component owns (SD2's last OpenCLIP layer, text_projection,
    # logit_scale, ...): written back unchanged so load -> save reproduces the source.
    passthrough: dict[str, "torch.Tensor"] = field(default_factory=dict)
    # Where it came from and why the family was chosen (printed for the user).
    source: str | None = None
    detection: str = ""

    def noise_scheduler(self):
        """A DDPMScheduler for training with this model's betas and prediction type."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config["prediction_type"] = self.family.prediction_type
        return DDPMScheduler.from_config(config)


def denoise(model, noisy, timesteps, cond):
    """The one call of the U-Net: its output for noisy latents at `timesteps` under the conditioning `cond`.

    Training, validation, sampling and the family probe all come here, so a model with extra inputs
    or a wrapper (DDP, a training target's module, e.g. a U-Net with a hypernetwork) is handled in
    one place. `model` is a diffusers-style denoiser whose output has `.sample`; the caller chooses
    the precision context.
    """
    return model(noisy, timesteps, encoder_hidden_states=cond).sample
