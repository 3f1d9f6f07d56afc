"""Text encoders: original layouts <-> transformers `CLIPTextModel`.

SD1 (CLIP ViT-L/14, `cond_stage_model.transformer.*`) is the Hugging Face layout under a prefix.
Files written by most tools say `...transformer.text_model.embeddings...`; some old ones lack the
`text_model.` part, and transformers >= 5.6 names the model's own keys without it too. We read
both and always write the `text_model.` form, which every UI reads.

SD2 (OpenCLIP ViT-H/14, `cond_stage_model.model.*`) differs: fused `attn.in_proj_{weight,bias}`
(q, k, v stacked in that order), `positional_embedding`, `ln_final`, `ln_1/ln_2`, `mlp.c_fc/c_proj`.
The OpenCLIP tower has one layer more than diffusers' SD2 text encoder (SD2 conditions on the
penultimate layer, so diffusers drops the last), plus `text_projection` and `logit_scale`, which no
SD2 sampler uses. Those tensors travel in `SDModel.passthrough` and are written back unchanged.

When there is nothing to pass through (a Diffusers SD2 source), `fabricate_openclip_extras` writes
a complete OpenCLIP key set so that strict loaders and "missing key" checks in A1111 / ComfyUI /
Forge are satisfied. sd-scripts writes a copy of layer 22 and an all-ones `text_projection`; we write
an *identity* last layer (zero attention and MLP output projections, so the residual stream passes
through unchanged: a tool that wrongly conditions on the last layer gets exactly the penultimate
hidden state SD2 was trained with), an identity `text_projection` and CLIP's initial `logit_scale`.
"""

from __future__ import annotations

import math
import re
from typing import Any

CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

_OPENCLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def hf_key(key: str) -> str:
    """A CLIPTextModel key without the `text_model.` part (transformers < 5.6 had it)."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


# --------------------------------------------------------------------------------------------- SD1


def clip_to_original(sd: dict) -> dict:
    return {f"{CLIP_PREFIX}text_model.{hf_key(k)}": v for k, v in sd.items()}


def clip_from_original(src: dict, wanted: list[str]) -> tuple[dict, set[str]]:
    """(model state dict, used source keys) for the keys a CLIPTextModel wants."""
    out, used = {}, set()
    for key in wanted:
        k = hf_key(key)
        for name in (f"{CLIP_PREFIX}text_model.{k}", f"{CLIP_PREFIX}{k}"):
            if name in src:
                out[key] = src[name]
                used.add(name)
                break
        else:
            raise KeyError(f"{CLIP_PREFIX}text_model.{k}")
    return out, used


# --------------------------------------------------------------------------------------------- SD2


def _openclip_key(k: str) -> str | None:
    """The OpenCLIP name of one CLIPTextModel key, or None for q/k/v (fused separately)."""
    k = hf_key(k)
    if k in _OPENCLIP:
        return _OPENCLIP[k]
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
    if not m:
        raise KeyError(k)
    if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return None
    return f"transformer.resblocks.{m[1]}.{_LAYER[m[2]]}.{m[3]}"


def openclip_to_original(sd: dict, num_layers: int) -> dict:
    import torch

    out = {}
    base = {hf_key(k): k for k in sd}
    for k, v in sd.items():
        name = _openclip_key(k)
        if name is not None:
            out[OPENCLIP_PREFIX + name] = v
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = [sd[base[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"]] for p in "qkv"]
            out[f"{OPENCLIP_PREFIX}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, 0)
    return out


def openclip_from_original(src: dict, wanted: list[str]) -> tuple[dict, set[str]]:
    out, used = {}, set()
    for key in wanted:
        name = _openclip_key(key)
        if name is None:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", hf_key(key))
            name = f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
            fused = src[OPENCLIP_PREFIX + name]
            width, idx = fused.shape[0] // 3, "qkv".index(m[2])
            out[key] = fused[idx * width:(idx + 1) * width]  # a view, not a copy
        else:
            out[key] = src[OPENCLIP_PREFIX + name]
        used.add(OPENCLIP_PREFIX + name)
    return out, used


def fabricate_openclip_extras(original: dict, num_layers: int) -> dict:
    """The OpenCLIP tensors a Diffusers SD2 model lacks (see the module docstring for why these)."""
    import torch

    p = f"{OPENCLIP_PREFIX}transformer.resblocks."
    last = {k[len(f"{p}{num_layers - 1}."):]: v for k, v in original.items() if k.startswith(f"{p}{num_layers - 1}.")}
    out = {}
    for name, v in last.items():
        zero = name.startswith(("attn.out_proj.", "mlp.c_proj."))
        out[f"{p}{num_layers}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    emb = original[OPENCLIP_PREFIX + "token_embedding.weight"]
    out[OPENCLIP_PREFIX + "text_projection"] = torch.eye(emb.shape[1], dtype=emb.dtype)
    out[OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=emb.dtype)
    return out


# --------------------------------------------------------------------------------------------- config


def derive_config(src: dict, base: dict[str, Any], openclip: bool, known_layers: int | None) -> dict[str, Any]:
    """The shipped text-encoder config with widths and depth read from an original state dict."""
    config = dict(base)
    if openclip:
        p = OPENCLIP_PREFIX
        emb, pos = src[p + "token_embedding.weight"], src[p + "positional_embedding"]
        layers = {int(m[1]) for k in src if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
        fc1 = src[p + "transformer.resblocks.0.mlp.c_fc.weight"]
        count = len(layers)
        # Diffusers keeps all but the last OpenCLIP layer; a file already converted by such a
        # tool holds exactly the known count.
        num = known_layers if known_layers is not None and known_layers <= count else count - 1
    else:
        def get(k):
            return src[f"{CLIP_PREFIX}text_model.{k}"] if f"{CLIP_PREFIX}text_model.{k}" in src else src[CLIP_PREFIX + k]
        emb, pos = get("embeddings.token_embedding.weight"), get("embeddings.position_embedding.weight")
        fc1 = get("encoder.layers.0.mlp.fc1.weight")
        num = len({int(m[1]) for k in src if (m := re.search(r"^cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\.", k))})
    config.update(vocab_size=int(emb.shape[0]), hidden_size=int(emb.shape[1]), max_position_embeddings=int(pos.shape[0]),
                  intermediate_size=int(fc1.shape[0]), num_hidden_layers=num)
    return config
