"""From per-label probabilities to a tag line: thresholds, MCut, ordering and tag editing.

Shared by the WD14 and DeepDanbooru taggers; pure numpy, no model code. Label names are edited once
when the model is loaded (underscores, replacements), so `--undesired_tags` and
`--always_first_tags` are written the way tags appear in the output, as in sd-scripts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from sdtune.errors import UserError

# selected_tags.csv categories (SmilingWolf taggers).
GENERAL, CHARACTER, RATING = 0, 4, 9
CATEGORY_NAMES = {GENERAL: "general", CHARACTER: "character", RATING: "rating"}

# Emoticons whose underscore is part of the face. sd-scripts keeps any tag of 3 characters or less;
# the SmilingWolf reference keeps this list, which also has longer faces such as "(o)_(o)".
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})

# A character tag written as "name_(series)"; --character_tag_expand splits it in two.
_CHARACTER_SERIES = re.compile(r"^(?P<name>.+?)[_ ]\((?P<series>[^()]+)\)$")


@dataclass(frozen=True)
class Label:
    """One model output: its name as it will be written, the CSV name, and its category."""

    name: str
    raw: str
    category: int


@dataclass(frozen=True)
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.35
    general_mcut: bool = False
    character_mcut: bool = False
    undesired_tags: tuple[str, ...] = ()
    always_first_tags: tuple[str, ...] = ()
    character_tags_first: bool = False
    character_tag_expand: bool = False
    remove_underscore: bool = False
    tag_replacement: tuple[tuple[str, str], ...] = ()
    rating: str = "none"  # "none", "first" or "last"
    order: str = "label"  # "label" (model order, as sd-scripts) or "probability" (descending)
    caption_separator: str = ", "
    _undesired: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise UserError(f"threshold must be a number >= 0, got {value!r}", where=f"--{name}",
                                fix="Use a probability such as 0.35 (a value above 1 turns the category off).")
        if self.rating not in ("none", "first", "last"):
            raise UserError(f"unknown rating placement {self.rating!r}", where="rating")
        if self.order not in ("label", "probability"):
            raise UserError(f"unknown tag order {self.order!r}", where="--tag_order",
                            fix="Use label or probability.")
        if not self.caption_separator.strip():
            raise UserError("the separator must contain a non-space character", where="--caption_separator",
                            fix='Use e.g. ", ".')
        object.__setattr__(self, "_undesired", frozenset(self.undesired_tags))


def split_tag_list(text: str | None, separator: str) -> tuple[str, ...]:
    """"a, b ,c" -> ("a", "b", "c"): split on the separator without its spaces, as sd-scripts does."""
    if not text:
        return ()
    sep = separator.strip() or ","
    return tuple(t.strip() for t in text.split(sep) if t.strip())


def parse_tag_replacement(text: str | None) -> tuple[tuple[str, str], ...]:
    """"src,dst;src2,dst2" with "\\," and "\\;" for literal commas and semicolons."""
    if not text:
        return ()
    pairs = []
    for chunk in _split_escaped(text):
        if not any(part.strip() for part in chunk):
            continue
        if len(chunk) != 2 or not chunk[0].strip() or not chunk[1].strip():
            shown = ",".join(chunk)
            raise UserError(f"cannot read the pair {shown!r}", where="--tag_replacement",
                            fix=r'Write "source,target;source2,target2"; escape a literal comma or semicolon as \, or \;.'
                                " To drop a tag, use --undesired_tags.")
        pairs.append((chunk[0].strip(), chunk[1].strip()))
    return tuple(pairs)


def _split_escaped(text: str) -> list[list[str]]:
    """One pass over the text: ";" ends a pair, "," ends a field, a backslash escapes either."""
    pairs: list[list[str]] = [[]]
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in ",;\\":
            current.append(text[i + 1])
            i += 2
            continue
        if ch in ",;":
            pairs[-1].append("".join(current))
            current = []
            if ch == ";":
                pairs.append([])
        else:
            current.append(ch)
        i += 1
    pairs[-1].append("".join(current))
    return pairs


def remove_underscore(tag: str) -> str:
    """"long_hair" -> "long hair"; emoticons such as "^_^" keep theirs."""
    if len(tag) <= 3 or tag in KAOMOJI:
        return tag
    return tag.replace("_", " ")


def prepare_labels(raw: list[tuple[str, int]], options: TagOptions) -> tuple[list[Label], list[str]]:
    """Apply --remove_underscore and --tag_replacement to the model's labels.

    A replacement source matches a label by its written name or by its CSV name, so both
    "long_hair,x" and "long hair,x" work with --remove_underscore. Returns the labels and the
    replacement sources that matched nothing (the caller warns: usually a typo).
    """
    replacements = dict(options.tag_replacement)
    used: set[str] = set()
    labels = []
    for name, category in raw:
        written = remove_underscore(name) if options.remove_underscore else name
        for key in (written, name):
            if key in replacements:
                used.add(key)
                written = replacements[key]
                break
        labels.append(Label(written, name, category))
    unmatched = [src for src, _ in options.tag_replacement if src not in used]
    return labels, unmatched


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al., 2012): the middle of the largest gap between
    consecutive sorted probabilities. Returns +inf (nothing selected) for fewer than two values."""
    if probs.size < 2:
        return float("inf")
    ordered = np.sort(probs.astype(np.float64))[::-1]
    gaps = ordered[:-1] - ordered[1:]
    t = int(np.argmax(gaps))
    return float((ordered[t] + ordered[t + 1]) / 2)


def select_tags(probs: np.ndarray, labels: list[Label], options: TagOptions) -> list[str]:
    """The ordered tag list for one image."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(labels):
        raise ValueError(f"{probs.shape[0]} probabilities for {len(labels)} labels")
    cats = np.array([lab.category for lab in labels])
    general_idx = np.flatnonzero(cats == GENERAL)
    character_idx = np.flatnonzero(cats == CHARACTER)

    general_thr = mcut_threshold(probs[general_idx]) if options.general_mcut else options.general_threshold
    # As in the SmilingWolf reference: MCut for characters never goes below 0.15.
    character_thr = (max(0.15, mcut_threshold(probs[character_idx])) if options.character_mcut
                     else options.character_threshold)

    def pick(idx: np.ndarray, thr: float) -> list[int]:
        chosen = [int(i) for i in idx if probs[i] >= thr]
        if options.order == "probability":
            chosen.sort(key=lambda i: -probs[i])  # stable: ties keep model order
        return chosen

    general = pick(general_idx, general_thr)
    character = pick(character_idx, character_thr)
    ordered = character + general if options.character_tags_first else general + character

    tags: list[str] = []
    for i in ordered:
        for tag in _expand(labels[i], options):
            if tag not in options._undesired and tag not in tags:
                tags.append(tag)

    if options.rating != "none":
        rating_idx = np.flatnonzero(cats == RATING)
        if rating_idx.size:
            best = labels[int(rating_idx[np.argmax(probs[rating_idx])])].name
            if best not in options._undesired and best not in tags:
                tags.insert(0, best) if options.rating == "first" else tags.append(best)

    for tag in reversed(options.always_first_tags):
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def _expand(label: Label, options: TagOptions) -> list[str]:
    if options.character_tag_expand and label.category == CHARACTER:
        m = _CHARACTER_SERIES.match(label.name)
        if m:
            series = m.group("series")
            return [m.group("name"), remove_underscore(series) if options.remove_underscore else series]
    return [label.name]


def merge_with_existing(existing: str, tags: list[str], separator: str) -> list[str]:
    """--append_tags: the file's tags first, then the new ones it lacks."""
    old = list(split_tag_list(existing.strip(), separator))
    seen = set(old)
    return old + [t for t in tags if t not in seen and not seen.add(t)]
