"""What differs between SD 1.x, SD 2.x base and SD 2.x 768-v, as data.

Code asks the family (`family.prediction_type`, `family.pad_token`, ...) instead of testing
`if v2:` in many places. Each family has a folder of shipped Diffusers-format component configs and
tokenizer files under `sdtune/assets/<name>/` (no weights). This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sdtune.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    v2: bool
    prediction_type: Literal["epsilon", "v_prediction"]
    resolution: int
    modelspec_architecture: str
    # "clip": HF CLIPTextModel layout (cond_stage_model.transformer.*) — SD1.
    # "openclip": OpenCLIP layout (cond_stage_model.model.*, fused qkv) — SD2.
    text_encoder_layout: Literal["clip", "openclip"]
    pad_token: str
    assets: str  # folder under sdtune/assets

    @property
    def asset_dir(self) -> Path:
        """A Diffusers-format pipeline folder without weights: configs and tokenizer."""
        return ASSETS / self.assets

    def with_prediction_type(self, prediction_type: str) -> "Family":
        """The same architecture trained for another target (e.g. a v-prediction SD 1.5 fine-tune)."""
        if prediction_type == self.prediction_type:
            return self
        for fam in FAMILIES.values():
            if fam.v2 == self.v2 and fam.prediction_type == prediction_type:
                return fam
        suffix = "-v" if prediction_type == "v_prediction" else "-eps"
        return replace(self, name=self.name + suffix, title=f"{self.title} ({prediction_type})", prediction_type=prediction_type)

    @property
    def v_parameterization(self) -> bool:
        return self.prediction_type == "v_prediction"


SD1 = Family("sd1", "Stable Diffusion 1.x", False, "epsilon", 512, "stable-diffusion-v1", "clip", "<|endoftext|>", "sd1")
SD2 = Family("sd2", "Stable Diffusion 2.x base (512, epsilon)", True, "epsilon", 512, "stable-diffusion-v2-512", "openclip", "!", "sd2")
SD2_V = Family("sd2-v", "Stable Diffusion 2.x 768-v (v-prediction)", True, "v_prediction", 768, "stable-diffusion-v2-768-v", "openclip", "!", "sd2-v")

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SD2_V)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}", fix=f"Use one of: {', '.join(FAMILIES)}.") from None


def family_from_flags(v2: bool, v_parameterization: bool) -> Family:
    """sd-scripts' `--v2` / `--v_parameterization` pair as a family."""
    if not v2:
        # SD 1.x with v-prediction exists (community fine-tunes); sd-scripts allows it with a warning.
        return SD1.with_prediction_type("v_prediction") if v_parameterization else SD1
    return SD2_V if v_parameterization else SD2
