"""Text-embedding cache: encode each caption once with a frozen text encoder, reuse across runs.

One safetensors file per distinct caption, `<dir>/<k[:2]>/<k>.safetensors`, where `k` hashes the
caption together with everything else that decides its embedding:

* the tokenizer (its full serialised vocabulary, merges, normaliser and special tokens),
* the text encoder's weights (a hash of every tensor, computed once per cache object),
* clip skip (as the resolved hidden-state index), `max_token_length`, weighted-caption parsing,
* the family's chunk layout (BOS/EOS/pad ids), the output dtype and width,
* the cache format version.

Change any of them and the key changes, so a stale entry is never read; entries are never edited in
place. Files are written to a temporary name and renamed, so a crash leaves no half-written entry.
Like SimpleTuner's text-embed cache (MD5 of caption + model type), but keyed on the weights too, so
a fine-tuned text encoder or another clip skip cannot pick up old embeddings.

Use it only when the text encoder is frozen and captions are cache-compatible
(`CaptionOptions.cache_compatible`); the constructor refuses an encoder with trainable weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from sdtune.atomic import atomic_path
from sdtune.errors import UserError
from sdtune.text.encode import TextConditioner, unwrap_module

if TYPE_CHECKING:
    import torch

__all__ = ["TextEmbeddingCache", "CacheStats", "FORMAT_VERSION", "tensor_hash", "tokenizer_hash"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_TENSOR = "embedding"


@dataclass
class CacheStats:
    hits: int = 0
    written: int = 0


def tensor_hash(module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer (transformers 4): its vocabulary and merges define it
        text = json.dumps([sorted(tokenizer.get_vocab().items()), getattr(tokenizer, "bpe_ranks", None) and
                           sorted(map(str, tokenizer.bpe_ranks.items()))])
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    return hashlib.sha256((text + specials).encode()).hexdigest()


class TextEmbeddingCache:
    """`get(captions)` -> (B, 75·n + 2, width) embeddings, from disk when this exact setup made them."""

    def __init__(self, directory: str | Path, conditioner: TextConditioner):
        encoder = unwrap_module(conditioner.text_encoder)
        if any(p.requires_grad for p in encoder.parameters()):
            raise ValueError("the text-embedding cache needs a frozen text encoder "
                             "(call text_encoder.requires_grad_(False) when it is not trained)")
        self.directory = Path(directory)
        self.conditioner = conditioner
        self.stats = CacheStats()
        self._context: str | None = None

    def context(self) -> str:
        """Hash of everything except the caption; the encoder hash is computed here, once."""
        if self._context is None:
            cond = self.conditioner
            param = next(unwrap_module(cond.text_encoder).parameters())
            parts = {
                "format": FORMAT_VERSION,
                "family": cond.family.name,
                "tokenizer": tokenizer_hash(cond.tokenizer),
                "encoder": tensor_hash(unwrap_module(cond.text_encoder)),
                "clip_skip": cond.layer.clip_skip,
                "hidden_index": cond.layer.hidden_index,
                "chunks": cond.chunker.identity(),
                "dtype": str(param.dtype),
                "width": cond.width,
            }
            self._context = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return self._context

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.context()}\n{caption}".encode()).hexdigest()

    def path(self, caption: str) -> Path:
        key = self.key(caption)
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, captions: Sequence[str]) -> "torch.Tensor":
        """Embeddings for `captions` on the encoder's device and dtype; missing ones are encoded and stored."""
        import torch

        if isinstance(captions, str):
            raise TypeError("pass a list of captions, not a single string")
        param = next(unwrap_module(self.conditioner.text_encoder).parameters())
        found: dict[str, torch.Tensor] = {}
        lengths: dict[str, int] = {}
        for caption in dict.fromkeys(captions):
            entry = self._load(caption)
            if entry is not None:
                found[caption], lengths[caption] = entry
                self.stats.hits += 1
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            for caption, (embedding, length) in zip(missing, self._encode_and_store(missing)):
                found[caption], lengths[caption] = embedding, length
        self.conditioner.record_lengths([lengths[c] for c in captions])
        return torch.stack([found[c] for c in captions]).to(device=param.device, dtype=param.dtype)

    def precompute(self, captions: Iterable[str], batch_size: int = 64, progress: bool = True) -> CacheStats:
        """Encode every caption not cached yet, in batches, with a progress bar."""
        from tqdm.auto import tqdm

        todo = [c for c in dict.fromkeys(captions) if not self.path(c).is_file()]
        stats = CacheStats(hits=0, written=0)
        with tqdm(total=len(todo), desc="caching text embeddings", unit="caption", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                part = todo[start:start + batch_size]
                self._encode_and_store(part)
                stats.written += len(part)
                bar.update(len(part))
        return stats

    # ---------------------------------------------------------------------------------------

    def _encode_and_store(self, captions: list[str]) -> list[tuple["torch.Tensor", int]]:
        import torch

        cond = self.conditioner
        batch = cond.chunker(captions)  # not counted here: `get` counts each use
        with torch.no_grad():
            embeddings = cond.encode(batch)
        out = []
        for caption, embedding, length in zip(captions, embeddings, batch.lengths):
            self._write(caption, embedding, length)
            out.append((embedding, length))
        return out

    def _write(self, caption: str, embedding: "torch.Tensor", length: int) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.path(caption)
        metadata = {"format": f"sdtune-text-embedding-{FORMAT_VERSION}", "caption": caption, "tokens": str(length),
                    "clip_skip": str(self.conditioner.layer.clip_skip),
                    "max_token_length": str(self.conditioner.max_token_length)}
        try:
            with atomic_path(path) as tmp:
                save_file({_TENSOR: embedding.detach().to("cpu").contiguous()}, str(tmp), metadata=metadata)
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UserError(f"cannot write the text-embedding cache ({reason})", where=str(path.parent),
                            fix="Pass --cache_dir DIR on writable storage, or free disk space or make this folder "
                                "writable (a cache whose entries are all present is only read).") from None
        self.stats.written += 1

    def _load(self, caption: str) -> tuple["torch.Tensor", int] | None:
        from safetensors import safe_open

        path = self.path(caption)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                embedding = fh.get_tensor(_TENSOR)
            if meta.get("caption") != caption:
                raise ValueError("caption differs from the key (hash collision or edited file)")
            expected = (self.conditioner.sequence_length, self.conditioner.width)
            if tuple(embedding.shape) != expected:
                raise ValueError(f"shape {tuple(embedding.shape)} is not {expected}")
            return embedding, int(meta.get("tokens", "0"))
        except Exception as exc:  # a damaged entry is re-made, never trusted
            log.warning("ignoring damaged text-embedding cache entry %s (%s); re-encoding", path, exc)
            return None
