"""Prompt weights in AUTOMATIC1111's syntax, for `--weighted_captions` and sample prompts.

    (word)      weight x 1.1, nesting multiplies: ((word)) = 1.21
    [word]      weight / 1.1
    (word:1.5)  weight x 1.5
    \\( \\) \\[ \\] \\\\  literal brackets and backslash

An unmatched closing bracket is plain text; a bracket left open weights everything after it, as
in A1111. A1111's `BREAK` (starting a new 75-token window) is handled by the chunking in
`sdtune.text.tokens`, which splits the pieces returned here.

Written here (about 60 lines) because no maintained library exposes this parser without pulling in
a whole inference UI; `compel` uses a different syntax. Pure Python, no torch.
"""

from __future__ import annotations

import re

__all__ = ["parse_weights", "ROUND", "SQUARE"]

ROUND = 1.1
SQUARE = 1 / 1.1

_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_ESCAPABLE = "()[]\\"


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pieces; neighbours with equal weight are merged."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            pieces.append(["".join(buf), 1.0])
            buf.clear()

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            buf.append(text[i + 1])
            i += 2
            continue
        match = _EXPLICIT.match(text, i) if c == ":" and round_open else None
        if match:
            flush()
            scale(round_open.pop(), float(match.group(1)))
            i = match.end()
            continue
        if c == "(":
            flush()
            round_open.append(len(pieces))
        elif c == "[":
            flush()
            square_open.append(len(pieces))
        elif c == ")" and round_open:
            flush()
            scale(round_open.pop(), ROUND)
        elif c == "]" and square_open:
            flush()
            scale(square_open.pop(), SQUARE)
        else:
            buf.append(c)
        i += 1
    flush()
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]
