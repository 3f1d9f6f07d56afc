"""From prompts to the U-Net's conditioning: chunked encoding with clip skip and prompt weights.

`TextConditioner` is the one path from a caption to the tensor the U-Net attends to, used by
training and by sample generation alike, so the two can never disagree (sd-scripts' sampler uses
another chunking, padding and weighting than its trainer: up to 3 chunks whatever
--max_token_length says, every chunk's BOS and EOS kept, EOS padding even for SD2, weights
renormalised by their mean).

Encoding (as sd-scripts' trainer does it): each 77-token chunk goes through the text encoder on its
own; the result is re-assembled as the first chunk's BOS state, the 75 content states of every
chunk, and the last chunk's final state: (batch, 75·n + 2, width).

clip skip is numbered as in A1111 and sd-scripts for SD1 (1 = last layer, 2 = penultimate): the
hidden state after layer `L - clip_skip + 1`, then the encoder's final layer norm. For SD2 we count
the layers of the original 24-layer OpenCLIP tower, whose last layer SD 2.x never used and which
the Diffusers text encoder therefore lacks: SD2's default and native conditioning is clip_skip 2,
the Diffusers encoder's last layer; 3 is one layer further back; 1 is refused. sd-scripts counts
from the truncated encoder instead, so its `--v2 --clip_skip 2` silently reaches one layer too deep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from sdtune.errors import UserError
from sdtune.families import Family
from sdtune.text.tokens import CHUNK, ChunkedTokenizer, TokenBatch

if TYPE_CHECKING:
    import torch

__all__ = ["ClipLayer", "resolve_clip_skip", "clip_skip_note", "TextConditioner", "TruncationReport", "unwrap_module"]

log = logging.getLogger(__name__)

# Top layers of the original text tower that a Diffusers text encoder of this layout lacks, and the
# clip skip the family was trained with.
_DROPPED_TOP_LAYERS = {"clip": 0, "openclip": 1}
_NATIVE_CLIP_SKIP = {"clip": 1, "openclip": 2}
_OPENCLIP_FULL_DEPTH = 24  # ViT-H/14's text tower; a Diffusers SD2 encoder keeps 23 of them


@dataclass(frozen=True)
class ClipLayer:
    clip_skip: int  # in the family's numbering, default resolved
    hidden_index: int  # index into the encoder's hidden_states; -1 is its last layer
    description: str  # for the training log

    @property
    def is_last(self) -> bool:
        return self.hidden_index == -1


def resolve_clip_skip(family: Family, num_layers: int, clip_skip: int | None) -> ClipLayer:
    """Which hidden state `clip_skip` means for this family and encoder depth."""
    layout = family.text_encoder_layout
    dropped = _DROPPED_TOP_LAYERS[layout]
    if layout == "openclip" and num_layers == _OPENCLIP_FULL_DEPTH:
        dropped = 0  # an encoder converted with its last block kept
    total = num_layers + dropped
    native = _NATIVE_CLIP_SKIP[layout]
    if clip_skip is None:
        clip_skip = native
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise UserError(f"clip_skip must be a whole number from 1 (got {clip_skip!r})", where="--clip_skip",
                        fix="1 = last layer, 2 = penultimate (as in A1111).")
    if clip_skip <= dropped:
        raise UserError(f"clip_skip {clip_skip} asks for the last layer of {family.title}'s OpenCLIP text tower, "
                        "which SD 2.x never used and its Diffusers text encoder does not contain",
                        where="--clip_skip",
                        fix=f"SD 2.x is conditioned on the penultimate layer, clip_skip {native} (the default); "
                            f"leave --clip_skip unset or use {native} or more. Note that sd-scripts' "
                            f"--v2 --clip_skip 2 is our clip_skip 3.")
    if clip_skip > total:
        raise UserError(f"clip_skip {clip_skip} goes below the first of the text encoder's {total} layers",
                        where="--clip_skip", fix=f"Use a value from {dropped + 1} to {total}.")
    hidden_index = -(clip_skip - dropped)
    layer = total - clip_skip + 1
    note = " (the family's native conditioning)" if clip_skip == native else ""
    description = f"clip_skip {clip_skip}: output of text-encoder layer {layer} of {total}, then the final layer norm{note}"
    return ClipLayer(clip_skip, hidden_index, description)


def clip_skip_note(family: Family, num_layers: int, clip_skip: int | None) -> str | None:
    """For a --clip_skip given with SD 2.x: one line saying which layer it is and what sd-scripts calls it.

    sd-scripts takes `hidden_states[-clip_skip]` of the encoder it loads, which for SD 2.x lacks the
    tower's last layer; the same layer therefore has a number one lower there. None when both count
    alike (SD 1.x, an encoder converted with all 24 layers, or no --clip_skip).
    """
    if clip_skip is None:
        return None
    ours = resolve_clip_skip(family, num_layers, clip_skip)
    theirs = -ours.hidden_index
    if theirs == ours.clip_skip:
        return None
    total = num_layers + ours.clip_skip - theirs
    layer = total - ours.clip_skip + 1
    return (f"--clip_skip {clip_skip} on SD 2.x counts the {total} layers of the original OpenCLIP text tower, as A1111 "
            f"and ComfyUI do: the conditioning is layer {layer} of {total}. sd-scripts counts the {num_layers} layers it "
            f"loads, so it calls this layer --clip_skip {theirs}; an sd-scripts --clip_skip N is sdtune's N + 1 "
            f"(sd-scripts' --clip_skip {clip_skip} would be layer {layer - 1})")


@dataclass(frozen=True)
class TruncationReport:
    count: int  # prompts that were cut
    total: int  # prompts tokenised
    longest: int  # content tokens of the longest prompt seen
    limit: int  # max_token_length

    def __str__(self) -> str:
        if not self.count:
            return f"no prompt was longer than {self.limit} tokens (longest: {self.longest}, of {self.total})"
        hint = ("use --max_token_length 150 or 225 to keep more" if self.limit < 225
                else "shorten them; 225 tokens is the most CLIP conditioning can hold here")
        return (f"{self.count} of {self.total} prompts were longer than {self.limit} tokens and were cut "
                f"(longest: {self.longest} tokens); {hint}")


def unwrap_module(module):
    """The model inside DDP / accelerate / torch.compile wrappers (for attribute access only)."""
    while True:
        inner = getattr(module, "module", None)
        if inner is None:
            inner = getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


class TextConditioner:
    """Prompts or `TokenBatch`es -> conditioning (B, 75·n + 2, width), for training and sampling."""

    def __init__(self, tokenizer, text_encoder, family: Family, *, max_token_length: int | None = 75,
                 clip_skip: int | None = None, weighted: bool = False):
        self.chunker = ChunkedTokenizer(tokenizer, family, max_token_length, weighted)
        self.tokenizer = tokenizer
        # Called for the forward pass (so wrappers like DDP see it); unwrapped for attributes.
        self.text_encoder = text_encoder
        self.family = family
        config = unwrap_module(text_encoder).config
        self.layer = resolve_clip_skip(family, int(config.num_hidden_layers), clip_skip)
        self.width = int(config.hidden_size)
        self._count = self._total = self._longest = 0
        self._warned = False

    @property
    def max_token_length(self) -> int:
        return self.chunker.max_token_length

    @property
    def n_chunks(self) -> int:
        return self.chunker.n_chunks

    @property
    def weighted(self) -> bool:
        return self.chunker.weighted

    @property
    def sequence_length(self) -> int:
        return self.chunker.sequence_length

    # -- tokenisation ------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> TokenBatch:
        """Token ids (B, n, 77) and weights; counts prompts that had to be cut."""
        batch = self.chunker(prompts)
        self.record_truncation(batch)
        return batch

    def record_truncation(self, batch: TokenBatch) -> None:
        """Count cut prompts of a batch tokenised elsewhere (e.g. by `chunker` in a DataLoader worker)."""
        self.record_lengths(batch.lengths)

    def record_lengths(self, lengths: Sequence[int]) -> None:
        """Count prompts by their content-token lengths (the embedding cache reports hits this way)."""
        limit = self.max_token_length
        self._total += len(lengths)
        self._longest = max([self._longest, *lengths])
        cut = [n for n in lengths if n > limit]
        self._count += len(cut)
        if cut and not self._warned:
            self._warned = True
            log.warning("a prompt of %d tokens was cut to %d; more may follow (see the truncation report)",
                        max(cut), limit)

    def truncation_report(self) -> TruncationReport:
        return TruncationReport(self._count, self._total, self._longest, self.max_token_length)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, tokens_or_prompts: TokenBatch | Sequence[str]) -> "torch.Tensor":
        """Conditioning (B, 75·n + 2, width) in the encoder's dtype and device.

        No `torch.no_grad` here: gradients reach the text encoder when it is trained; wrap the
        call yourself when it is frozen.
        """
        import torch

        batch = tokens_or_prompts if isinstance(tokens_or_prompts, TokenBatch) else self.tokenize(tokens_or_prompts)
        if batch.n_chunks != self.n_chunks:
            raise ValueError(f"token batch has {batch.n_chunks} chunks, this conditioner uses {self.n_chunks}")
        if (batch.weights is not None) != self.weighted:
            raise ValueError("token batch weighting does not match the conditioner's")
        inner = unwrap_module(self.text_encoder)
        param = next(inner.parameters())
        b, n, window = batch.ids.shape
        ids = batch.ids.reshape(b * n, window).to(param.device)
        if self.layer.is_last:
            states = self.text_encoder(ids).last_hidden_state
        else:
            hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states
            states = _final_layer_norm(inner)(hidden[self.layer.hidden_index])
        states = states.reshape(b, n, window, states.shape[-1])
        if batch.weights is not None:
            states = _apply_weights(states, batch.weights.to(states.device))
        if n == 1:
            return states[:, 0]
        # First BOS, every chunk's 75 content states, the last chunk's final state.
        content = states[:, :, 1:CHUNK + 1].reshape(b, n * CHUNK, states.shape[-1])
        return torch.cat([states[:, 0, :1], content, states[:, -1, CHUNK + 1:]], dim=1)

    def empty_embedding(self, batch_size: int = 1) -> "torch.Tensor":
        """The empty prompt's conditioning: what caption dropout trains on and CFG uses as uncond."""
        return self.encode([""] * batch_size)


def _final_layer_norm(encoder):
    # transformers >= 5 puts it on CLIPTextModel itself; 4.x under `.text_model`.
    owner = getattr(encoder, "text_model", encoder)
    return owner.final_layer_norm


def _apply_weights(states: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """Scale each token's state by its weight, then restore each chunk's mean (as A1111 does).

    Without the mean restoration a heavily weighted word would also shift the overall magnitude
    of the conditioning; A1111 (and diffusers' long-prompt pipeline) restore it, and users prompt
    the trained model there, so training conditions the way inference will.
    """
    import torch

    if bool((weights == 1).all()):
        return states
    w = weights.to(states.dtype).unsqueeze(-1)
    before = states.float().mean(dim=(2, 3), keepdim=True)
    scaled = states * w
    after = scaled.float().mean(dim=(2, 3), keepdim=True)
    ratio = torch.where(after.abs() > 1e-12, before / after, torch.ones_like(after))
    # Chunks without weights keep their states bit for bit.
    plain = (weights == 1).all(dim=-1, keepdim=True).unsqueeze(-1)
    ratio = torch.where(plain, torch.ones_like(ratio), ratio)
    return scaled * ratio.to(states.dtype)
