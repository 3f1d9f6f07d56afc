"""The sampler names `--sample_sampler` and a prompt's `--ss` accept, and the diffusers scheduler each means.

Plain data, no torch: option validation and prompt-file parsing check names here, and the sampling
module builds the schedulers from the same table.
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import UserError

__all__ = ["SAMPLERS", "SAMPLER_ALIASES", "normalize_sampler"]

# name -> (diffusers scheduler class, extra config). sd-scripts' names (`get_my_scheduler`) first.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD's own scheduler config ships it
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers refuses DPM-Solver (not ++) with a zero final sigma, its default.
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    # Beyond sd-scripts' list: DDPM, UniPC and the Karras-sigma variants A1111 users know.
    "ddpm": ("DDPMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm_2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm_2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a", "dpm++_2m": "dpmsolver++", "dpm++": "dpmsolver++",
                   "dpmsolver++_karras": "dpm++_2m_karras", "dpm++_2s": "dpmsingle", "euler_ancestral": "euler_a"}


def normalize_sampler(name: str, where: str = "--sample_sampler") -> str:
    """The canonical sampler name; accepts sd-scripts' names, `k_` aliases and A1111 spellings."""
    key = "_".join(str(name).strip().lower().split())  # "DPM++ 2M Karras" -> "dpm++_2m_karras"
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        names = ", ".join([*SAMPLERS, *SAMPLER_ALIASES])
        raise UserError(f"unknown sampler {name!r}", where=where, fix=f"Use one of: {names}.")
    return key
