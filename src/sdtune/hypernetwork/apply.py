"""Putting a hypernetwork into a diffusers U-Net, for every attention backend at once.

A hypernetwork changes the context from which an attention layer forms its keys and values: for
each attention layer (self-attention `attn1`, whose context is the block's normalised hidden
states, and cross-attention `attn2`, whose context is the text embedding), the input of `to_k`
becomes c + f_K(c) * m and that of `to_v` c + f_V(c) * m, where c is the context and the module pair
is the one for c's width (none for that width: unchanged). The queries are untouched.

Every diffusers attention processor sdtune uses (torch SDPA, the classic one, xformers, sliced)
computes `attn.to_k(context)` and `attn.to_v(context)` with the very context the web UI transforms,
so the hypernetwork is applied by forward pre-hooks on those two projections, not by a processor of
its own: whichever processor runs (and whatever SDPA kernel `--mem_eff_attn` selects) sees the
transformed context, and no attention code is written twice. Hooks change no parameter name, so
the U-Net's state dict stays as it is. Processors that fuse the projections (one `to_kv` matrix)
would bypass the hooks and are refused. Attaching a second hypernetwork chains it after the first,
as the web UI chains them.
"""

from __future__ import annotations

from sdtune.errors import UserError
from sdtune.hypernetwork.module import Hypernetwork


class Attachment:
    """One hypernetwork's hooks in one U-Net; `detach()` (or leaving a `with` block) removes them."""

    def __init__(self, hypernetwork: Hypernetwork, handles: list, layer_names: list[str]):
        self.hypernetwork = hypernetwork
        self.layer_names = layer_names
        self._handles = handles

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attention_layers(unet) -> list[tuple[str, object]]:
    """(name, module) of every attention layer of the U-Net (attn1 and attn2 of each transformer block)."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


def attention_widths(unet) -> set[int]:
    """The context widths the U-Net's attention layers see (SD1: 320, 640, 1280 and 768)."""
    return {m.to_k.in_features for _name, m in attention_layers(unet)}


def attach(unet, hypernetwork: Hypernetwork) -> Attachment:
    """Apply `hypernetwork` in every attention layer of `unet` until the returned Attachment is detached.

    Its `multiplier` is read at every call, so it can be changed while attached; 0 gives the U-Net's
    own output exactly (the hooks then pass the context on untouched)."""
    layers = attention_layers(unet)
    if not layers:
        raise UserError("the U-Net has no attention layers to apply a hypernetwork to")
    handles, names = [], []
    for name, attn in layers:
        if getattr(attn, "fused_projections", False):
            for handle in handles:
                handle.remove()
            raise UserError(f"attention layer {name} uses fused key/value projections, which a hypernetwork "
                            "cannot reach", fix="Unfuse them (unet.unfuse_qkv_projections()) before applying it.")
        handles.append(attn.to_k.register_forward_pre_hook(_hook(hypernetwork.context_k)))
        handles.append(attn.to_v.register_forward_pre_hook(_hook(hypernetwork.context_v)))
        names.append(name)
    return Attachment(hypernetwork, handles, names)


def _hook(transform):
    def pre_hook(_module, args):
        return (transform(args[0]), *args[1:])

    return pre_hook


def trainable_parameters(hypernetwork: Hypernetwork, *frozen) -> list:
    """Freeze every module in `frozen` (U-Net, text encoder, VAE) and return the hypernetwork's
    parameters, which alone require gradients (in the web UI's order: widths, K then V, layers)."""
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)
    hypernetwork.requires_grad_(True)
    return list(hypernetwork.parameters())
