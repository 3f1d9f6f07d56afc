"""U-Net: original LDM layout (`model.diffusion_model.*`) <-> diffusers `UNet2DConditionModel`.

The key map is computed from the model's config (levels, layers per block, which levels have
attention), not hard-coded for SD's 320/640/1280 U-Net, so tiny test models and real ones go
through the same code. The names inside a transformer block are the same in both layouts; only
the block addressing and the resnet names differ.

Projection layout: SD1 stores `proj_in`/`proj_out` as 1x1 convolutions, SD2 as linear layers.
Loading keeps whatever the file has (the diffusers config follows the tensor's rank), and saving
writes the family's native rank, so a Diffusers SD2 model with conv projections (as sd-scripts
writes them) becomes the linear layout A1111 / ComfyUI expect. The reshape is a view: bit-exact.
"""

from __future__ import annotations

import re
from typing import Any

PREFIX = "model.diffusion_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    if head not in _RESNET:
        raise KeyError(tail)
    return f"{_RESNET[head]}.{rest}"


def to_original_key(key: str, config: dict[str, Any]) -> str:
    """The original-layout name (without prefix) of one diffusers U-Net parameter."""
    per = config["layers_per_block"] + 1  # input/output blocks per level
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    for d, o in _TOP.items():
        if key.startswith(d + "."):
            return o + key[len(d):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * per + j
        return f"input_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"input_blocks.{idx}.1.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, tail = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet_tail(tail)}" if kind == "resnets" else f"middle_block.1.{tail}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * per + j
        return f"output_blocks.{idx}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"output_blocks.{idx}.1.{tail}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + per - 1}.{2 if up_attn[i] else 1}.{m[2]}"
    raise KeyError(key)


def is_projection(key: str) -> bool:
    return bool(re.search(r"attentions\.\d+\.proj_(in|out)\.weight$", key))


def to_native_rank(tensor, v2: bool):
    """SD2's projections as linear (2-D) weights, SD1's as 1x1 convs (4-D); a view, not a copy."""
    if v2 and tensor.ndim == 4:
        return tensor[:, :, 0, 0]
    if not v2 and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def derive_config(sd: dict, base: dict[str, Any]) -> dict[str, Any]:
    """The shipped config `base` with the widths and block layout read from an original state dict."""
    p = PREFIX
    config = dict(base)
    inputs = sorted({int(k[len(p):].split(".")[1]) for k in sd if k.startswith(p + "input_blocks.")})
    ops = sorted(i for i in inputs if f"{p}input_blocks.{i}.0.op.weight" in sd)
    per = ops[0] if ops else len(inputs)  # first downsampler sits at index layers_per_block + 1
    levels = len(inputs) // per
    layers = per - 1
    channels, down, up = [], [], []
    for i in range(levels):
        first = 1 + i * per
        channels.append(int(sd[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        down.append("CrossAttnDownBlock2D" if f"{p}input_blocks.{first}.1.proj_in.weight" in sd else "DownBlock2D")
        up.append("CrossAttnUpBlock2D" if f"{p}output_blocks.{i * per}.1.proj_in.weight" in sd else "UpBlock2D")
    attn = [k for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    proj = [k for k in sd if k.startswith(p) and k.endswith(".proj_in.weight")]
    blocks = {int(m[1]) for k in sd if (m := re.search(r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.", k))}
    config.update(
        block_out_channels=channels, layers_per_block=layers, down_block_types=down, up_block_types=up,
        in_channels=int(sd[p + "input_blocks.0.0.weight"].shape[1]), out_channels=int(sd[p + "out.2.weight"].shape[0]),
    )
    if attn:
        config["cross_attention_dim"] = int(sd[attn[0]].shape[1])
        config["use_linear_projection"] = sd[proj[0]].ndim == 2
        config["transformer_layers_per_block"] = max(blocks) + 1 if blocks else 1
    if f"{p}middle_block.1.proj_in.weight" not in sd:
        raise KeyError("a middle block without cross-attention is not a Stable Diffusion 1.x/2.x U-Net")
    if p + "label_emb.0.0.weight" in sd:
        raise KeyError("label_emb (class-conditioned U-Net, e.g. SD x4 upscaler / unCLIP) is not supported")
    return config
