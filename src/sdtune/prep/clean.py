"""`clean_metadata`: sd-scripts' caption and tag clean-up rules (clean_captions_and_tags.py), on tag
lists instead of string tricks, plus removal of exact duplicate tags.

Tags:
  1. underscores become spaces, except in emoticons (same rule as the tagger's --remove_underscore);
  2. DeepDanbooru rating tags ("rating:safe", ...) are dropped;
  3. with several people ("girls"/"boys" in the tags), appearance tags that then cannot be told
     apart are dropped when more than one of a kind is present: hair length, hair cut, eye colour,
     sleeves, hair style, and "<colour> hair" (a single hair-length tag is kept);
  4. a one-word tag is dropped when a longer tag ends in it ("shirt" next to "white shirt");
  5. exact duplicates are dropped (first kept).
Captions: BLIP's generic words become "girl"/"girls" ("anime woman" -> "girl", "people" -> "girls"),
each rule repeated until nothing changes. sd-scripts replaces substrings, which corrupts words
("personal" -> "girlal"); we replace whole words only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdtune.metadata import check_metadata_name, read_metadata, write_metadata
from sdtune.prep.tags import remove_underscore

_HAIR_LENGTH = re.compile(r"(long|short|medium) hair")
_WORD = r"[\w\-]+"
# Kinds of appearance tag that become ambiguous with several people: more than one of a kind -> drop them all.
_MULTI_PERSON = [
    _HAIR_LENGTH,
    re.compile(r"(bob|hime) cut"),
    re.compile(rf"{_WORD} eyes"),
    re.compile(rf"{_WORD} sleeves|sleeveless"),
    re.compile(rf"ponytail|braid|ahoge|twintails|{_WORD} bun|single hair bun|single side bun|two side up|two tails"
               rf"|{_WORD} braid|sidelocks"),
]
_HAIR = re.compile(rf"{_WORD} hair")
_SINGLE_WORD = re.compile(rf"{_WORD}|hair ornament")
_ENDS_IN = r"(?:\w+ )+{}"

# sd-scripts' replacement table, in its order.
CAPTION_REPLACEMENTS = [
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"), ("cartoon women", "girls"),
    ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"), ("woman", "girl"),
    ("women", "girls"), ("people", "girls"), ("person", "girl"), ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"), ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
]
_CAPTION_RULES = [(re.compile(r"\b" + re.escape(src.strip()) + (r"\b\s*" if src.endswith(" ") else r"\b")), dst)
                  for src, dst in CAPTION_REPLACEMENTS]


def clean_tags(text: str, separator: str = ", ") -> str:
    sep = separator.strip() or ","
    tags = [remove_underscore(t.strip()) for t in text.split(sep) if t.strip()]
    tags = [t for t in tags if not t.startswith("rating:")]

    if any("girls" in t or "boys" in t for t in tags):
        for pattern in _MULTI_PERSON:
            if sum(1 for t in tags if pattern.fullmatch(t)) > 1:
                tags = [t for t in tags if not pattern.fullmatch(t)]
        colours = [t for t in tags if _HAIR.fullmatch(t) and not _HAIR_LENGTH.fullmatch(t)]
        if len(colours) > 1:
            tags = [t for t in tags if t not in colours]

    longer = [t for t in tags if " " in t]
    tags = [t for t in tags if not (_SINGLE_WORD.fullmatch(t) and
                                    any(re.fullmatch(_ENDS_IN.format(re.escape(t)), other) for other in longer))]
    unique: list[str] = []
    for t in tags:
        if t not in unique:
            unique.append(t)
    joiner = separator if separator.strip() else ", "
    return joiner.join(unique)


def clean_caption(text: str) -> str:
    for pattern, replacement in _CAPTION_RULES:
        while True:
            new = pattern.sub(replacement, text)
            if new == text:
                break
            text = new
    return text


@dataclass
class CleanResult:
    records: int = 0
    captions_changed: int = 0
    tags_changed: int = 0
    empty: list[str] = None  # keys with neither caption nor tags
    backup: Path | None = None


def clean_metadata(in_json: str | Path, out_json: str | Path, separator: str = ", ") -> CleanResult:
    """Clean every record's "caption" and "tags"; write `out_json` (a .bak is kept if it existed)."""
    meta = read_metadata(in_json)
    out_json = check_metadata_name(out_json, "out_json")
    result = CleanResult(records=len(meta), empty=[])
    for key, record in meta.items():
        if not record.get("caption") and not record.get("tags"):
            result.empty.append(key)
        if isinstance(record.get("tags"), str):
            new = clean_tags(record["tags"], separator)
            result.tags_changed += new != record["tags"]
            record["tags"] = new
        if isinstance(record.get("caption"), str):
            new = clean_caption(record["caption"])
            result.captions_changed += new != record["caption"]
            record["caption"] = new
    result.backup = write_metadata(out_json, meta)
    return result
