"""v-prediction or epsilon, from what a full-size SD 2.x U-Net does (the test AUTOMATIC1111's web UI runs).

Most SD 2.x single files carry no prediction marker, and the 768 models among them predict v. The
U-Net is run once on a constant latent (all 0.5) at the last timestep, t = 999, with a two-token
constant context (all 0.5). There the noisy latent is nearly pure noise, so an epsilon model returns
about its input (output - input averages near 0), while a v model returns v = a*eps - s*x0 with
a = sqrt(alpha_bar) ~ 0.07, far from its input. The web UI calls it v-prediction when the mean of
(output - input) is below -1; that threshold was set on the released SD 2.x models, which is why
the probe is used only for U-Nets of exactly that architecture (`detect.py` decides when).

It costs one forward pass on an 8x8 latent plus a float32 copy of the U-Net's weights (as in the web
UI: half-precision attention can overflow on the SD 2.x 768 models); on a busy 2-core CPU, loading a
full-size SD2 file with the probe took 46 s in all.
"""

from __future__ import annotations

PROBE_TIMESTEP = 999
PROBE_VALUE = 0.5
THRESHOLD = -1.0


def is_v_prediction(mean_offset: float) -> bool:
    """The decision on mean(output - input)."""
    return mean_offset < THRESHOLD


def mean_offset(output, latent) -> float:
    return float((output.float() - latent.float()).mean())


def describe(offset: float) -> str:
    v = is_v_prediction(offset)
    return (f"no prediction-type marker; forward probe of the SD2 U-Net (as AUTOMATIC1111): mean(output - input) "
            f"= {offset:.3f} {'<' if v else '>='} {THRESHOLD:g} at t={PROBE_TIMESTEP} -> {'v-prediction' if v else 'epsilon'}")


def run_probe(unet) -> float:
    """mean(output - input) of one forward pass of a diffusers U-Net on the probe's constant inputs,
    in the U-Net's dtype and on its device (the loader gives it a float32 one)."""
    import torch

    from sdtune.model import denoise

    param = next(unet.parameters())
    with torch.no_grad():
        latent = torch.full((1, unet.config.in_channels, 8, 8), PROBE_VALUE, device=param.device, dtype=param.dtype)
        context = torch.full((1, 2, unet.config.cross_attention_dim), PROBE_VALUE, device=param.device, dtype=param.dtype)
        output = denoise(unet, latent, torch.tensor([PROBE_TIMESTEP], device=param.device), context)
    return mean_offset(output, latent)
