"""Text conditioning: the one path from a caption to the U-Net's conditioning.

    captions.py     CaptionOptions, build_caption, process_caption   (no torch)
    weighting.py    A1111 prompt-weight parsing                       (no torch)
    tokens.py       chunked tokenisation for 75 / 150 / 225 tokens
    encode.py       TextConditioner: chunked encoding, clip skip, weights, truncation report
    embed_cache.py  TextEmbeddingCache for a frozen text encoder

Training and sample generation both call `TextConditioner.encode`. The caption helpers import no
torch, so config validation and `--help` stay fast; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from sdtune.text.captions import CaptionOptions, build_caption, caption_rng, process_caption
from sdtune.text.weighting import parse_weights

_LAZY = {
    "TokenBatch": "sdtune.text.tokens",
    "ChunkedTokenizer": "sdtune.text.tokens",
    "check_max_token_length": "sdtune.text.tokens",
    "TextConditioner": "sdtune.text.encode",
    "TruncationReport": "sdtune.text.encode",
    "ClipLayer": "sdtune.text.encode",
    "resolve_clip_skip": "sdtune.text.encode",
    "TextEmbeddingCache": "sdtune.text.embed_cache",
}

__all__ = ["CaptionOptions", "build_caption", "caption_rng", "process_caption", "parse_weights", *_LAZY]

if TYPE_CHECKING:
    from sdtune.text.embed_cache import TextEmbeddingCache
    from sdtune.text.encode import ClipLayer, TextConditioner, TruncationReport, resolve_clip_skip
    from sdtune.text.tokens import ChunkedTokenizer, TokenBatch, check_max_token_length


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdtune.text' has no attribute {name!r}")
