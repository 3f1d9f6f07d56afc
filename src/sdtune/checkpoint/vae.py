"""VAE: original LDM layout (`first_stage_model.*`) <-> diffusers `AutoencoderKL`.

Differences: the decoder's levels are numbered in the opposite order (original `up.0` is the last
diffusers up block), resnet shortcut and output-norm names differ, and the mid-block attention's
q/k/v/proj_out are 1x1 convolutions (4-D) in the original but linear layers (2-D) in diffusers.
The reshape is a view, so the round trip is bit-exact.
"""

from __future__ import annotations

import re
from typing import Any

PREFIX = "first_stage_model."

_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _mid(tail: str) -> str:
    if m := re.fullmatch(r"resnets\.(\d+)\.(.+)", tail):
        return f"mid.block_{int(m[1]) + 1}.{_resnet(m[2])}"
    if m := re.fullmatch(r"attentions\.0\.(.+)", tail):
        for d, o in _ATTN.items():
            if m[1].startswith(d + "."):
                return f"mid.attn_1.{o}{m[1][len(d):]}"
    raise KeyError(tail)


def _resnet(tail: str) -> str:
    return tail.replace("conv_shortcut.", "nin_shortcut.", 1) if tail.startswith("conv_shortcut.") else tail


def to_original_key(key: str, config: dict[str, Any]) -> str:
    levels = len(config["block_out_channels"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(.+)", key):
        return f"{m[1]}.mid.{_mid(m[2])[4:]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise KeyError(key)


def is_attention_matrix(key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key))


def derive_config(sd: dict, base: dict[str, Any]) -> dict[str, Any]:
    p = PREFIX
    levels = sorted({int(m[1]) for k in sd if (m := re.match(re.escape(p) + r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in sd if (m := re.match(re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.", k))}
    layers = max(blocks) + 1
    config = dict(base)
    config.update(
        block_out_channels=[int(sd[f"{p}encoder.down.{i}.block.{layers - 1}.conv2.weight"].shape[0]) for i in levels],
        layers_per_block=layers,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        in_channels=int(sd[p + "encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd[p + "decoder.conv_out.weight"].shape[0]),
        latent_channels=int(sd[p + "post_quant_conv.weight"].shape[0]),
    )
    return config


# --------------------------------------------------------------------------------------------- VAE-only files

# diffusers before 0.14 named the mid-block attention's layers like this; VAE folders and files of
# that time (e.g. stabilityai/sd-vae-ft-mse) still do.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_key(key: str) -> str:
    """A diffusers VAE key with the pre-0.14 attention names replaced by today's."""
    if m := re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", key):
        return f"{m[1]}{_OLD_ATTENTION[m[2]]}.{m[3]}"
    return key


def original_layout(sd: dict) -> tuple[dict, str] | None:
    """The VAE tensors of `sd` with original (LDM) names and no prefix, and the layout they came in.

    Accepts a whole SD checkpoint (`first_stage_model.*`), an original-layout VAE file
    (`encoder.down.0...`, as vae-ft-mse-840000-ema-pruned) or a diffusers-layout one
    (`encoder.down_blocks.0...`, old attention names included). Tensors of neither encoder nor
    decoder (a training loss, EMA bookkeeping) are left out. None when `sd` holds no VAE.
    """
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, "a whole checkpoint's VAE"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))), default=0)
        shape_only = {"block_out_channels": [0] * levels}
        out = {}
        for k, v in sd.items():
            try:
                out[to_original_key(modern_key(k), shape_only)] = v
            except KeyError:
                continue
        return out, "diffusers layout"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}, \
            "original layout"
    return None
