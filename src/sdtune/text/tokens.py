"""Chunked tokenisation: prompts of 75, 150 or 225 tokens as 1, 2 or 3 CLIP windows of 77.

CLIP's text encoder sees 77 positions: BOS, 75 content tokens, and an end. A prompt of up to 75·n
content tokens is cut into n chunks of 75, and each chunk is wrapped as

    BOS, its content tokens, EOS, then the family's padding up to 77

SD1's pad token is EOS itself (49407), so an SD1 chunk reads BOS c… EOS EOS…; SD2's is "!" (0), so
an SD2 chunk reads BOS c… EOS 0 0…, and an empty chunk BOS EOS 0…. These are the exact rows that
sd-scripts' `_get_input_ids` produces, so models trained with sd-scripts see
the same conditioning here. Tokens beyond 75·n are cut and counted (`TokenBatch.lengths`).

Content ids come from `sdtune.text.clean`: the caption is cleaned as CLIP cleans it (ftfy, whitespace,
lower case) and encoded with the tokenizer's BPE table, whatever transformers version is installed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from sdtune.errors import UserError
from sdtune.families import Family
from sdtune.text.clean import CLEANING, clean_caption, clip_bpe
from sdtune.text.weighting import parse_weights

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK", "WINDOW", "ALLOWED_LENGTHS", "TokenBatch", "ChunkedTokenizer", "check_max_token_length"]

log = logging.getLogger(__name__)

CHUNK = 75  # content tokens per window
WINDOW = CHUNK + 2  # BOS + content + end: CLIP's 77 positions
ALLOWED_LENGTHS = (75, 150, 225)
# A1111's BREAK (weighted prompts): the text after it starts a new 75-token window. In content ids
# it is this marker, never a real token id.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
BREAK_ID = -1


def check_max_token_length(value: int | None) -> int:
    """sd-scripts' `--max_token_length` (None means 75) as a validated token count."""
    if value is None:
        return CHUNK
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_LENGTHS:
        raise UserError(f"max_token_length must be 75, 150 or 225 (got {value!r})", where="--max_token_length",
                        fix="CLIP reads prompts in windows of 75 tokens; pick 1, 2 or 3 windows.")
    return value


@dataclass
class TokenBatch:
    """Token ids of a batch of prompts, ready for `TextConditioner.encode`."""

    ids: "torch.Tensor"  # (B, n, 77) int64
    # (B, n, 77) float32 per-token weights (1.0 at BOS/EOS/padding); None without weighted captions.
    weights: "torch.Tensor | None"
    # Content tokens of each prompt before cutting; more than 75·n means it was cut.
    lengths: list[int]

    @property
    def n_chunks(self) -> int:
        return int(self.ids.shape[1])

    @property
    def truncated(self) -> list[bool]:
        limit = self.n_chunks * CHUNK
        return [length > limit for length in self.lengths]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device) -> "TokenBatch":
        weights = None if self.weights is None else self.weights.to(device)
        return TokenBatch(self.ids.to(device), weights, list(self.lengths))

    @staticmethod
    def cat(batches: Sequence["TokenBatch"]) -> "TokenBatch":
        """Join per-sample batches (e.g. in a DataLoader's collate function)."""
        import torch

        if not batches:
            raise ValueError("no token batches to join")
        if len({b.n_chunks for b in batches}) != 1 or len({b.weights is None for b in batches}) != 1:
            raise ValueError("token batches with different chunk counts or weighting cannot be joined")
        weights = None if batches[0].weights is None else torch.cat([b.weights for b in batches])
        return TokenBatch(torch.cat([b.ids for b in batches]), weights, [n for b in batches for n in b.lengths])


class ChunkedTokenizer:
    """Prompts -> `TokenBatch`, following the family's padding. No model needed (picklable for workers)."""

    def __init__(self, tokenizer, family: Family, max_token_length: int | None = 75, weighted: bool = False):
        self.tokenizer = tokenizer
        self.family = family
        self.max_token_length = check_max_token_length(max_token_length)
        self.n_chunks = self.max_token_length // CHUNK
        self.weighted = bool(weighted)
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.convert_tokens_to_ids(family.pad_token)
        unk = tokenizer.unk_token_id
        if self.bos is None or self.eos is None or self.pad is None or (self.pad == unk and family.pad_token != tokenizer.unk_token):
            raise UserError(f"the tokenizer lacks CLIP's special tokens (bos {self.bos}, eos {self.eos}, "
                            f"pad {family.pad_token!r} -> {self.pad})", where="tokenizer",
                            fix=f"Use the {family.title} CLIP tokenizer.")
        if tokenizer.pad_token_id != self.pad:
            # The family decides: SD2 models were trained with "!" padding whatever a copied
            # tokenizer config says, and train and sample must agree.
            log.warning("tokenizer pads with id %s but %s pads with %r (id %s); using the family's padding",
                        tokenizer.pad_token_id, family.title, family.pad_token, self.pad)
        if getattr(tokenizer, "model_max_length", WINDOW) < WINDOW:
            raise UserError(f"tokenizer model_max_length is {tokenizer.model_max_length}, CLIP needs {WINDOW}",
                            where="tokenizer")
        # Content ids come from our own cleaning and BPE, never from the wrapper's pipeline: the
        # wrapper cleans differently in transformers 4 and 5, and SD2's tokenizer registers its pad
        # "!" as a special token, so a literal "!" would become the padding id 0 where OpenCLIP's
        # tokenizer, which SD2 was trained with, gives "!</w>" = 256. Padding is the chunk layout's job.
        self._content_backend = clip_bpe(tokenizer, [tokenizer.bos_token, tokenizer.eos_token])

    @property
    def sequence_length(self) -> int:
        """Length of the encoded sequence the U-Net attends to: 75·n + 2."""
        return self.max_token_length + 2

    def content(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[list[float]] | None]:
        """Token ids without special tokens, and per-token weights when weighting is on."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        prompts = [p if p is not None else "" for p in prompts]
        if not self.weighted:
            return self._ids(prompts), None
        # (text, weight) pieces, a BREAK anywhere in a piece's text becoming its own (None, 1.0) piece
        parsed = []
        for prompt in prompts:
            pieces: list[tuple[str | None, float]] = []
            for text, weight in parse_weights(prompt):
                for k, part in enumerate(_BREAK.split(text)):
                    if k:
                        pieces.append((None, 1.0))
                    pieces.append((part, weight))
            parsed.append(pieces)
        fragment_ids = iter(self._ids([text for pieces in parsed for text, _ in pieces if text is not None]))
        all_ids, all_weights = [], []
        for pieces in parsed:
            ids: list[int] = []
            weights: list[float] = []
            for text, weight in pieces:
                frag = [BREAK_ID] if text is None else next(fragment_ids)
                ids.extend(frag)
                weights.extend([weight] * len(frag))
            all_ids.append(ids)
            all_weights.append(weights)
        return all_ids, all_weights

    @staticmethod
    def _windows(ids: list[int], weights: list[float] | None) -> tuple[list[list[int]], list[list[float]]]:
        """Content ids cut into windows of at most 75: a window is closed when the next token does not
        fit, or at a BREAK (A1111's rule: a BREAK right after a full window adds no empty one; a
        BREAK elsewhere closes the window, empty or not)."""
        windows: list[list[int]] = []
        window_weights: list[list[float]] = []
        current: list[int] = []
        current_w: list[float] = []
        for k, token in enumerate(ids):
            if token == BREAK_ID or len(current) == CHUNK:
                windows.append(current)
                window_weights.append(current_w)
                current, current_w = [], []
                if token == BREAK_ID:
                    continue
            current.append(token)
            current_w.append(1.0 if weights is None else weights[k])
        if current or not windows:
            windows.append(current)
            window_weights.append(current_w)
        return windows, window_weights

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        cleaned = [clean_caption(t) for t in texts]
        return [e.ids for e in self._content_backend.encode_batch(cleaned, add_special_tokens=False)]

    def __call__(self, prompts: Sequence[str]) -> TokenBatch:
        import torch

        all_ids, all_weights = self.content(prompts)
        rows = []
        weight_rows = []
        lengths = []
        for b, ids in enumerate(all_ids):
            windows, window_weights = self._windows(ids, None if all_weights is None else all_weights[b])
            # positions used before cutting: a BREAK's padding counts, so a cut is always reported
            lengths.append(CHUNK * (len(windows) - 1) + len(windows[-1]))
            windows += [[]] * (self.n_chunks - len(windows))  # missing windows are empty
            window_weights += [[]] * (self.n_chunks - len(window_weights))
            sample, sample_w = [], []
            for part, w in zip(windows[:self.n_chunks], window_weights[:self.n_chunks]):
                sample.append([self.bos, *part, self.eos] + [self.pad] * (CHUNK - len(part)))
                sample_w.append([1.0, *w, 1.0] + [1.0] * (CHUNK - len(part)))
            rows.append(sample)
            weight_rows.append(sample_w)
        ids_t = torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.n_chunks, WINDOW)
        weights_t = None
        if all_weights is not None:
            weights_t = torch.tensor(weight_rows, dtype=torch.float32).reshape(len(rows), self.n_chunks, WINDOW)
        return TokenBatch(ids_t, weights_t, lengths)

    def identity(self) -> dict:
        """What, besides the vocabulary, decides the ids of a prompt (for cache keys)."""
        return {"max_token_length": self.max_token_length, "weighted": self.weighted, "bos": self.bos,
                "eos": self.eos, "pad": self.pad, "family_pad": self.family.pad_token, "layout": "bos-content-eos-pad",
                "break": self.weighted, "clean": CLEANING}
