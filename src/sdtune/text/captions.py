"""Caption assembly and per-sample augmentation, with sd-scripts' option names and meaning.

The order of operations follows sd-scripts' `process_caption` (library/train_util.py): prefix and
suffix, whole-caption dropout, wildcards (or first line only), fixed/flex split, token warm-up,
shuffle, tag dropout, re-join, secondary separator. Where sd-scripts is wrong we differ, and
docs/text.md lists each difference:

* shuffled tags are re-joined with the configured `caption_separator`, not a hard-coded ", "
  (kohya-ss/sd-scripts#1304);
* the prefix and suffix are joined with the separator, so a prefix is its own tag instead of
  merging into the first one (sd-scripts joins them with a space: "p" + "a, b" gives the tag
  "p a");
* the `keep_tokens_separator` never reaches the text encoder, even when nothing is shuffled;
* empty tags (from ", ," or a trailing separator) are dropped instead of shuffled around;
* randomness comes from a generator derived from (seed, epoch, index), never the global RNG, so
  two runs and two ranks draw the same augmentation (sd-scripts reseeds the global RNG each epoch,
  and its collate function learns the new epoch one batch late).

Pure Python: no torch import, so config validation can use `CaptionOptions`.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

from pydantic import ValidationError, field_validator

from sdtune.config import Field, Options, suggest
from sdtune.errors import UserError
from sdtune.seeds import caption_rng

__all__ = ["CaptionOptions", "build_caption", "process_caption", "caption_rng"]


class CaptionOptions(Options):
    """sd-scripts' caption keys of a dataset subset, with their effective defaults."""

    caption_prefix: str | None = Field(None, "text put before every caption of the subset")
    caption_suffix: str | None = Field(None, "text put after every caption of the subset")
    shuffle_caption: bool = Field(False, "shuffle the separated tags of each caption every time it is used")
    caption_separator: str = Field(",", "the string that separates tags in a caption")
    keep_tokens: int = Field(0, "keep this many leading tags in place when shuffling or dropping tags", ge=0)
    keep_tokens_separator: str = Field("", "tags before this marker (e.g. |||) are kept in place; a second "
                                           "marker starts a fixed suffix")
    secondary_separator: str | None = Field(None, "a separator inside a tag (e.g. ;;;): the tag moves as one "
                                                  "piece, then the marker becomes caption_separator")
    caption_dropout_rate: float = Field(0.0, "probability of training a sample on the empty caption", ge=0, le=1)
    caption_dropout_every_n_epochs: int = Field(0, "drop every caption in every n-th epoch (epochs count from 1)",
                                                ge=0)
    caption_tag_dropout_rate: float = Field(0.0, "probability of dropping each non-kept tag", ge=0, le=1)
    enable_wildcard: bool = Field(False, "pick a random line of multi-line captions and resolve {a|b|c}")
    token_warmup_min: int = Field(1, "number of tags used at step 0 of token warm-up", ge=0)
    token_warmup_step: float = Field(0, "steps of token warm-up (a value below 1 is a fraction of all "
                                        "training steps)", ge=0)

    @field_validator("caption_separator")
    @classmethod
    def _separator_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("caption_separator must contain a visible character (e.g. ',')")
        return value

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "caption options") -> "CaptionOptions":
        """From a dict of sd-scripts subset keys; None means "not set" (the default applies)."""
        known = set(cls.model_fields)
        for key in values:
            if key not in known:
                raise UserError(f"unknown caption option {key!r}{suggest(key, known)}", where=where,
                                fix=f"Known keys: {', '.join(sorted(known))}.")
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise UserError(f"{key}: {msg} (got {err.get('input')!r})", where=where) from None

    @property
    def tags_active(self) -> bool:
        """Whether captions are split into tags (sd-scripts splits only for these three features)."""
        return self.shuffle_caption or self.token_warmup_step > 0 or self.caption_tag_dropout_rate > 0

    @property
    def is_static(self) -> bool:
        """True when a sample's caption is the same at every step (no randomness of any kind)."""
        return self.cache_compatible and self.caption_dropout_rate == 0 and self.caption_dropout_every_n_epochs == 0

    @property
    def cache_compatible(self) -> bool:
        """True when each sample has at most two captions: its own and, after dropout, "".

        Whole-caption dropout only ever yields "", which a text-embedding cache holds as one more
        entry, so it does not prevent caching; shuffling, tag dropout, warm-up and wildcards do.
        """
        return not (self.tags_active or self.enable_wildcard)


def build_caption(caption: str | None, tags: str | None, opts: CaptionOptions | None = None,
                  separator: str | None = None) -> str:
    """The training text of one metadata entry: `caption`, then `tags`, joined with the separator.

    The tags are appended to every non-empty line of a multi-line caption: with wildcards each line
    is one alternative, and without them only the first line is used (sd-scripts appends the tags
    after the last line, where they are lost). `separator` defaults to `opts.caption_separator`.
    Returns "" when both are missing; the caller decides whether that is an error.
    """
    opts = opts or CaptionOptions()
    sep = _joiner(separator if separator is not None else opts.caption_separator)
    caption = (caption or "").strip()
    tags = (tags or "").strip()
    if not tags:
        return caption
    if not caption:
        return tags
    if "\n" in caption:
        return "\n".join(line + sep + tags if line.strip() else line for line in caption.split("\n"))
    return caption + sep + tags


def process_caption(text: str, opts: CaptionOptions, *, seed: int, epoch: int, index: int, step: int = 0,
                    max_steps: int | None = None) -> str:
    """The caption one sample is trained on at (epoch, step); "" when it is dropped.

    `epoch` counts from 1 as in sd-scripts (so `caption_dropout_every_n_epochs = 2` drops
    epochs 2, 4, ...). `index` identifies the sample in the dataset; `step` is the global
    optimisation step (token warm-up); `max_steps` is needed only when `token_warmup_step` is a
    fraction below 1.
    """
    if epoch < 1:
        raise ValueError(f"epoch counts from 1 (got {epoch})")
    rng = caption_rng(seed, epoch, index)
    # Per line, so that every wildcard alternative gets the prefix and suffix (sd-scripts adds them
    # to the whole text: only the first line gets the prefix and only the last one the suffix).
    lines = text.split("\n")
    text = "\n".join(_add_prefix_suffix(line, opts) if line.strip() or len(lines) == 1 else line for line in lines)

    # Draw the dropout number even when the epoch rule decides, so later draws do not depend on it.
    dropped = rng.random() < opts.caption_dropout_rate
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        dropped = True
    if dropped:
        return ""

    text = _resolve_wildcards(text, rng) if opts.enable_wildcard else text.split("\n")[0]
    text = _arrange_tags(text, opts, rng, step, max_steps)
    if opts.secondary_separator:
        text = text.replace(opts.secondary_separator, opts.caption_separator)
    return text.strip()


# ---------------------------------------------------------------------------------------------


def _joiner(separator: str) -> str:
    """What goes between two tags: the separator and one space (", " for ","), unless it has one."""
    return separator if separator[-1:].isspace() else separator + " "


def _add_prefix_suffix(text: str, opts: CaptionOptions) -> str:
    sep = opts.caption_separator.strip()
    joiner = _joiner(opts.caption_separator)
    if opts.caption_prefix:
        prefix = opts.caption_prefix.strip()
        if not text:
            text = prefix.removesuffix(sep).rstrip()
        # A prefix the user already ended with the separator ("masterpiece,") needs only a space.
        elif prefix.endswith(sep):
            text = prefix + " " + text
        else:
            text = prefix + joiner + text
    if opts.caption_suffix:
        suffix = opts.caption_suffix.strip()
        if not text:
            text = suffix.removeprefix(sep).lstrip()
        elif suffix.startswith(sep):
            text = text.rstrip() + suffix
        else:
            text = text.rstrip() + joiner + suffix
    return text


_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")


def _resolve_wildcards(text: str, rng: random.Random) -> str:
    """One random line of a multi-line caption, then each {a|b|c} replaced by one of its options."""
    lines = [line for line in text.split("\n") if line.strip()] or [""]
    line = lines[rng.randrange(len(lines))] if len(lines) > 1 else lines[0]
    # "{{" and "}}" are literal braces: park them on characters that cannot occur in the text.
    left, right = "\x00", "\x01"
    line = line.replace("{{", left).replace("}}", right)
    line = _BRACE_GROUP.sub(lambda m: _pick(m.group(1).split("|"), rng), line)
    return line.replace(left, "{").replace(right, "}")


def _pick(options: list[str], rng: random.Random) -> str:
    return options[rng.randrange(len(options))]


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _arrange_tags(text: str, opts: CaptionOptions, rng: random.Random, step: int, max_steps: int | None) -> str:
    sep = opts.caption_separator
    marker = opts.keep_tokens_separator
    if not opts.tags_active:
        if marker and marker in text:
            # Nothing moves, but the marker is ours, not the text encoder's.
            return _joiner(sep).join(_split_tags(text.replace(marker, sep), sep))
        return text

    fixed_suffix: list[str] = []
    if marker and marker in text:
        fixed_part, flex_part = text.split(marker, 1)
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
            fixed_suffix = _split_tags(suffix_part.replace(marker, sep), sep)
        fixed, flex = _split_tags(fixed_part, sep), _split_tags(flex_part, sep)
    else:
        tags = _split_tags(text, sep)
        fixed, flex = tags[: opts.keep_tokens], tags[opts.keep_tokens:]

    warmup = opts.token_warmup_step
    if 0 < warmup < 1:
        if not max_steps:
            raise ValueError("token_warmup_step below 1 is a fraction of max_steps; pass max_steps")
        warmup = math.floor(warmup * max_steps)
    if warmup and step < warmup:
        keep = math.floor(step * (len(flex) - opts.token_warmup_min) / warmup) + opts.token_warmup_min
        flex = flex[: max(keep, 0)]

    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return _joiner(sep).join(fixed + flex + fixed_suffix)
