"""Caption text cleaning before BPE, the same on every transformers version.

CLIP's tokenizers clean text before BPE: `ftfy.fix_text` (curly quotes to straight ones, ligatures
such as "ﬁ" split, full-width "ＡＢＣ" to ASCII, HTML entities such as "&amp;" unescaped when the
text has no "<", mojibake repaired, NFC), whitespace runs (spaces, tabs, newlines) collapsed to one
space, then lower-casing. transformers 4's Python `CLIPTokenizer` does exactly this when ftfy is
installed, and that is what sd-scripts tokenizes with; transformers 5's tokenizer (and
`CLIPTokenizerFast`) only lower-cases and collapses whitespace, so a curly quote or a ligature would
become other ids. sdtune cleans here, and `clip_bpe` builds a BPE that does nothing else, so a
caption gives the same ids whichever transformers is installed.

OpenAI's and OpenCLIP's own tokenizers additionally run `html.unescape` twice after ftfy; that only
matters for doubly escaped entities ("&amp;amp;") or text containing "<", and sd-scripts does not do
it either.
"""

from __future__ import annotations

import functools
import json
import re

from sdtune.errors import UserError

__all__ = ["clean_caption", "clip_bpe", "CLEANING"]

# Part of the text-embedding cache key: a change of the cleaning must re-encode cached captions.
CLEANING = "ftfy.fix_text+whitespace+lower"

# Runs of Unicode White_Space, what CLIP's `regex`-module `\s+` matches: Python's own `\s` also
# matches the C0 separators \x1c-\x1f, which are not White_Space (ftfy removes them anyway).
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
# CLIP's word split (as in OpenAI's simple_tokenizer): the two markers, English contractions,
# letter runs, single digits, and runs of anything else that is not whitespace.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=65536)
def clean_caption(text: str) -> str:
    """ftfy's fix, whitespace collapsed and stripped, lower-cased (in this order, as CLIP does)."""
    import ftfy

    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


def _vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE table of a CLIP tokenizer, fast (`backend_tokenizer`) or Python (transformers 4)."""
    not_clip = UserError(f"{type(tokenizer).__name__} is not a CLIP BPE tokenizer", where="tokenizer",
                         fix="Use the model's CLIP tokenizer (vocab.json and merges.txt).")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())["model"]
        if model.get("type") != "BPE" or "merges" not in model:
            raise not_clip
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges
    ranks = getattr(tokenizer, "bpe_ranks", None)
    encoder = getattr(tokenizer, "encoder", None)
    if ranks is None or encoder is None:
        raise not_clip
    return dict(encoder), [pair for pair, _ in sorted(ranks.items(), key=lambda item: item[1])]


def _own_plain_bpe(tokenizer, settings: dict):
    """The fast tokenizer's own BPE model when it already is the one `clip_bpe` would build from its table
    (same settings, no dropout, no byte fallback), else None. Sharing it saves copying its ~49,000-entry
    vocabulary and merges out through JSON and back (a few tenths of a second at every start); the
    model is only read, never changed."""
    from tokenizers import models

    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not isinstance(model, models.BPE):
        return None
    plain = {**settings, "dropout": None, "byte_fallback": False, "ignore_merges": False}
    missing = object()
    return model if all(getattr(model, k, missing) == v for k, v in plain.items()) else None


def clip_bpe(tokenizer, special: list[str]):
    """A `tokenizers.Tokenizer` with the tokenizer's CLIP BPE table that only splits and encodes.

    Input is `clean_caption`'s output. `special` (BOS and EOS) are the only added tokens: a caption
    that spells "<|endoftext|>" gets that id, as in CLIP; any other special token of the tokenizer
    (SD2's pad "!") stays ordinary text. No normalizer: the cleaning is ours, so a newer
    transformers or Unicode table in the Rust normalizer cannot change it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    try:
        import ftfy  # noqa: F401  (used by clean_caption; checked here so a missing install fails early)
    except ImportError:
        raise UserError("the ftfy package is not installed; sdtune needs it to clean captions as CLIP does",
                        where="text cleaning", fix="pip install ftfy (it is one of sdtune's dependencies).") from None
    unk = tokenizer.unk_token
    settings = dict(continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                    unk_token=str(unk) if unk is not None else None)
    bpe = _own_plain_bpe(tokenizer, settings)
    if bpe is None:
        vocab, merges = _vocab_and_merges(tokenizer)
        bpe = models.BPE(vocab=vocab, merges=merges, **settings)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        # bytes to BPE symbols only: the split above is CLIP's whole word split
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return backend
