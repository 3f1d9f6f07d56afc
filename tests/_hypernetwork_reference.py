"""An independent reading of the web UI's hypernetwork `.pt` file, for the tests.

Written from the file format's description, not from sdtune's hypernetwork package: the layers of
one module are walked by the web UI's rule (per layer-structure step: a Linear, then an activation
unless linear or (last step and not activate_output), then a LayerNorm if is_layer_norm, then a
Dropout if that dropout entry is > 0; each takes one `linear.N` position), evaluated with plain
torch functions, and applied by an attention processor that computes attention by hand with the
keys and values formed from the transformed context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "leakyrelu": F.leaky_relu, "elu": F.elu, "swish": F.hardswish, "tanh": torch.tanh,
               "sigmoid": torch.sigmoid, "softsign": F.softsign, "mish": F.mish, "gelu": F.gelu, "silu": F.silu}


def meta_of(obj: dict) -> dict:
    """The metadata with the web UI's defaults for what is missing."""
    ls = list(obj.get("layer_structure") or [1, 2, 1])
    ds = obj.get("dropout_structure")
    if ds is None:
        if obj.get("use_dropout", False):
            ds = [0] + [0.3] * (len(ls) - 3) + [0.3 if obj.get("last_layer_dropout", False) else 0] + [0]
        else:
            ds = [0] * len(ls)
    return {"ls": ls, "act": obj.get("activation_func") or "linear", "ln": obj.get("is_layer_norm", False),
            "ao": obj.get("activate_output", True), "ds": ds}


def layers(meta: dict, width: int) -> list[tuple[str, int, tuple]]:
    """(kind, position, shapes) of one module's layers."""
    out, pos, ls = [], 0, meta["ls"]
    for i in range(len(ls) - 1):
        a, b = int(width * ls[i]), int(width * ls[i + 1])
        out.append(("linear", pos, ((b, a), (b,))))
        pos += 1
        if meta["act"] != "linear" and (i < len(ls) - 2 or meta["ao"]):
            out.append(("act", pos, ()))
            pos += 1
        if meta["ln"]:
            out.append(("ln", pos, ((b,), (b,))))
            pos += 1
        if meta["ds"][i + 1] > 0:
            out.append(("dropout", pos, ()))
            pos += 1
    return out


def expected_keys(meta: dict, width: int) -> dict[str, tuple]:
    keys = {}
    for _kind, pos, shapes in layers(meta, width):
        if shapes:
            keys[f"linear.{pos}.weight"], keys[f"linear.{pos}.bias"] = shapes
    return keys


def mlp(state: dict, meta: dict, width: int):
    """f(x) of one module, dropout as in evaluation (identity)."""
    state = {k.replace("linear1.", "linear.0.").replace("linear2.", "linear.1."): v for k, v in state.items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(meta, width)
    plan = layers(meta, width)

    def f(x):
        for kind, pos, _shapes in plan:
            w, b = state.get(f"linear.{pos}.weight"), state.get(f"linear.{pos}.bias")
            if kind == "linear":
                x = x @ w.double().T + b.double()
            elif kind == "act":
                x = ACTIVATIONS[meta["act"]](x)
            elif kind == "ln":
                x = F.layer_norm(x, (x.shape[-1],), w.double(), b.double(), eps=1e-5)
        return x

    return f


def read(path) -> dict[int, tuple]:
    """width -> (f_K, f_V) of a hypernetwork file, read with torch's weights-only loader."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    meta = meta_of(obj)
    return {w: (mlp(obj[w][0], meta, w), mlp(obj[w][1], meta, w)) for w in obj if isinstance(w, int)}


class ReferenceProcessor:
    """Attention computed by hand (in float64), with K and V from the hypernetwork-transformed context."""

    def __init__(self, modules: dict[int, tuple], multiplier: float):
        self.modules, self.m = modules, multiplier

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None
        assert hidden_states.ndim == 3 and not attn.residual_connection and attn.rescale_output_factor == 1.0
        x = hidden_states.double()
        context = x if encoder_hidden_states is None else encoder_hidden_states.double()
        ck = cv = context
        if context.shape[-1] in self.modules:
            fk, fv = self.modules[context.shape[-1]]
            ck, cv = context + fk(context) * self.m, context + fv(context) * self.m

        def linear(layer, t):
            return t @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)

        q, k, v = linear(attn.to_q, x), linear(attn.to_k, ck), linear(attn.to_v, cv)
        b, h = q.shape[0], attn.heads
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return linear(attn.to_out[0], out).to(hidden_states.dtype)


def comfyui_mlp(state: dict, obj: dict):
    """f(x) of one module by ComfyUI's rule: a Linear per `*.weight` key, in the dict's order, its
    shape from the tensor; the activation after each but the last (after the last too with
    `activate_output`, which it reads as False when missing). For files without LayerNorm and
    dropout, which it places differently."""
    act = obj.get("activation_func", "linear")
    assert act in ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
    names = [k[:-len(".weight")] for k in state if k.endswith(".weight")]

    def f(x):
        for i, name in enumerate(names):
            x = x @ state[name + ".weight"].double().T + state[name + ".bias"].double()
            if act != "linear" and (i < len(names) - 1 or obj.get("activate_output", False)):
                x = ACTIVATIONS[act](x)
        return x

    return f
