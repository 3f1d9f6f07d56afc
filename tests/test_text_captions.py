"""Caption assembly and augmentation (sdtune.text.captions) and prompt-weight parsing."""

import os
import random
import subprocess
import sys

import pytest

from sdtune.errors import UserError
from sdtune.text import CaptionOptions, build_caption, parse_weights, process_caption

TAGS = "1girl, solo, red hair, blue eyes, smile, outdoors, tree, sky, cloud, day"


def opts(**kw):
    return CaptionOptions.from_dict(kw)


def run(text, o, epoch=1, index=0, seed=7, **kw):
    return process_caption(text, o, seed=seed, epoch=epoch, index=index, **kw)


def split(text, sep=","):
    return [t.strip() for t in text.split(sep)]


# -- options ------------------------------------------------------------------------------------


def test_defaults_are_sd_scripts_effective_defaults():
    o = CaptionOptions()
    assert (o.caption_separator, o.keep_tokens, o.keep_tokens_separator, o.token_warmup_min, o.token_warmup_step) == (
        ",", 0, "", 1, 0)
    assert o.caption_prefix is None and o.secondary_separator is None and not o.shuffle_caption
    assert o.is_static and o.cache_compatible


def test_from_dict_rejects_unknown_and_bad_values():
    with pytest.raises(UserError, match="did you mean 'keep_tokens'"):
        CaptionOptions.from_dict({"keep_token": 1}, where="dataset.toml [[datasets.subsets]] 1")
    with pytest.raises(UserError, match="caption_dropout_rate"):
        CaptionOptions.from_dict({"caption_dropout_rate": 1.5})
    with pytest.raises(UserError, match="keep_tokens"):
        CaptionOptions.from_dict({"keep_tokens": -1})
    with pytest.raises(UserError, match="caption_separator"):
        CaptionOptions.from_dict({"caption_separator": " "})
    # None means "not set", as in sd-scripts' config precedence.
    assert CaptionOptions.from_dict({"caption_separator": None}).caption_separator == ","


@pytest.mark.parametrize("kw, static, cacheable", [
    ({}, True, True),
    ({"caption_prefix": "sks"}, True, True),
    ({"shuffle_caption": True}, False, False),
    ({"caption_tag_dropout_rate": 0.1}, False, False),
    ({"enable_wildcard": True}, False, False),
    ({"token_warmup_step": 100}, False, False),
    ({"caption_dropout_rate": 0.1}, False, True),
    ({"caption_dropout_every_n_epochs": 3}, False, True),
])
def test_static_and_cache_compatible(kw, static, cacheable):
    o = opts(**kw)
    assert (o.is_static, o.cache_compatible) == (static, cacheable)


# -- assembly ------------------------------------------------------------------------------------


def test_build_caption_joins_caption_and_tags():
    assert build_caption("a cat", "cat, animal", opts()) == "a cat, cat, animal"
    assert build_caption("a cat", "cat; animal", opts(caption_separator=";")) == "a cat; cat; animal"
    assert build_caption(None, "cat", opts()) == "cat"
    assert build_caption("a cat", "", opts()) == "a cat"
    assert build_caption(None, None, opts()) == ""
    # With wildcards every non-empty line (alternative) gets the tags.
    assert build_caption("a cat\n\na dog", "pet", opts(enable_wildcard=True)) == "a cat, pet\n\na dog, pet"
    # Without wildcards only the first line is trained on: it must carry the tags too.
    assert run(build_caption("a cat\na dog", "pet", opts()), opts()) == "a cat, pet"


def test_prefix_and_suffix_are_their_own_tags():
    o = opts(caption_prefix="sks", caption_suffix="best quality")
    assert run("1girl, solo", o) == "sks, 1girl, solo, best quality"
    # Written with the separator already: not doubled.
    o = opts(caption_prefix="masterpiece,", caption_suffix=", hires")
    assert run("1girl", o) == "masterpiece, 1girl, hires"
    # Shuffling sees the prefix as a tag of its own (sd-scripts merges "sks 1girl").
    o = opts(caption_prefix="sks", shuffle_caption=True, keep_tokens=1)
    for epoch in range(1, 6):
        tags = split(run("1girl, solo, smile", o, epoch=epoch))
        assert tags[0] == "sks" and sorted(tags[1:]) == ["1girl", "smile", "solo"]


def test_only_first_line_without_wildcards():
    assert run("first line\nsecond line", opts()) == "first line"


# -- randomness ----------------------------------------------------------------------------------


def test_shuffle_is_deterministic_differs_by_epoch_and_leaves_global_rng_alone():
    o = opts(shuffle_caption=True)
    state = random.getstate()
    first = [run(TAGS, o, epoch=e) for e in range(1, 11)]
    assert random.getstate() == state
    random.seed(12345)  # the global RNG must not matter
    assert [run(TAGS, o, epoch=e) for e in range(1, 11)] == first
    assert len(set(first)) >= 9  # 10! orders: epochs essentially never repeat
    for text in first:
        assert sorted(split(text)) == sorted(split(TAGS))
    assert run(TAGS, o, index=1) != run(TAGS, o, index=0)
    assert run(TAGS, o, seed=8) != run(TAGS, o, seed=7)


@pytest.mark.slow
def test_same_augmentation_in_another_process():
    """Another interpreter (another run, another rank) with another hash seed draws the same."""
    code = ("from sdtune.text import CaptionOptions, process_caption as p;"
            "o = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, enable_wildcard=True);"
            f"print(repr([p({TAGS + ', {a|b|c}'!r}, o, seed=7, epoch=e, index=3) for e in range(1, 6)]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    o = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, enable_wildcard=True)
    here = [run(TAGS + ", {a|b|c}", o, epoch=e, index=3) for e in range(1, 6)]
    assert out.strip() == repr(here)


def test_separator_survives_shuffling():
    text = "red hair; blue eyes; smile; a, b; sky"
    o = opts(shuffle_caption=True, caption_separator=";")
    for epoch in range(1, 8):
        out = run(text, o, epoch=epoch)
        assert sorted(split(out, ";")) == sorted(split(text, ";"))
        assert out.count(";") == 4 and "; " in out  # re-joined with "; ", commas inside tags kept


def test_keep_tokens_stay_in_front():
    o = opts(shuffle_caption=True, keep_tokens=2)
    for epoch in range(1, 8):
        tags = split(run(TAGS, o, epoch=epoch))
        assert tags[:2] == ["1girl", "solo"] and sorted(tags[2:]) == sorted(split(TAGS)[2:])


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    text = "sks, 1girl ||| red hair, smile, sky, tree ||| masterpiece, best"
    o = opts(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)  # the marker wins
    seen = set()
    for epoch in range(1, 10):
        tags = split(run(text, o, epoch=epoch))
        assert tags[:2] == ["sks", "1girl"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == ["red hair", "sky", "smile", "tree"]
        seen.add(tuple(tags))
    assert len(seen) > 1
    # Without shuffling the marker must still not reach the text encoder (sd-scripts leaves it in).
    assert run(text, opts(keep_tokens_separator="|||")) == "sks, 1girl, red hair, smile, sky, tree, masterpiece, best"


def test_secondary_separator_keeps_a_tag_together():
    o = opts(shuffle_caption=True, secondary_separator=";;;")
    for epoch in range(1, 8):
        out = run("red;;;hair, smile, sky, tree", o, epoch=epoch)
        assert "red,hair" in out and ";;;" not in out


def test_tag_dropout_drops_only_flexible_tags():
    o = opts(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert run(TAGS, o) == "1girl"
    o = opts(caption_tag_dropout_rate=0.5)
    kept = [len(split(run(TAGS, o, index=i))) for i in range(200)]
    assert 0.4 < sum(kept) / (200 * 10) < 0.6
    for i in range(20):  # order is kept when not shuffling
        tags = split(run(TAGS, o, index=i))
        assert tags == [t for t in split(TAGS) if t in tags]


def test_caption_dropout_rate_and_every_n_epochs():
    o = opts(caption_dropout_rate=0.25)
    dropped = sum(run(TAGS, o, index=i) == "" for i in range(400))
    assert 70 < dropped < 130
    o = opts(caption_dropout_every_n_epochs=2)
    assert [run(TAGS, o, epoch=e) == "" for e in range(1, 7)] == [False, True, False, True, False, True]
    assert run(TAGS, opts(caption_dropout_rate=1.0, caption_prefix="sks")) == ""
    with pytest.raises(ValueError, match="epoch"):
        run(TAGS, o, epoch=0)


def test_wildcards():
    o = opts(enable_wildcard=True)
    outs = {run("a {red|green|blue} ball, {{literal}}", o, epoch=e) for e in range(1, 40)}
    assert outs == {f"a {c} ball, {{literal}}" for c in ("red", "green", "blue")}
    lines = {run("first\nsecond\n\nthird", o, epoch=e) for e in range(1, 40)}
    assert lines == {"first", "second", "third"}
    # Prefix and suffix reach every alternative.
    lines = {run("a\nb", opts(enable_wildcard=True, caption_prefix="p", caption_suffix="s"), epoch=e)
             for e in range(1, 30)}
    assert lines == {"p, a, s", "p, b, s"}


def test_token_warmup():
    o = opts(token_warmup_step=10, token_warmup_min=2, keep_tokens=1)
    # step s keeps floor(s * (9 - 2) / 10) + 2 of the 9 flexible tags, after the kept first one.
    for step, n in [(0, 2), (5, 5), (9, 8), (10, 9), (50, 9)]:
        assert split(run(TAGS, o, step=step)) == split(TAGS)[: 1 + n]
    ratio = opts(token_warmup_step=0.5)
    assert len(split(run(TAGS, ratio, step=0, max_steps=20))) == 1
    assert len(split(run(TAGS, ratio, step=10, max_steps=20))) == 10
    with pytest.raises(ValueError, match="max_steps"):
        run(TAGS, ratio, step=0)


# -- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
    ("((cat:1.5))", [("cat", 1.5 * 1.1)]),
    ("( cat : 0.5 )", [(" cat ", 0.5)]),
    ("\\(cat\\) \\[x\\]", [("(cat) [x]", 1.0)]),
    ("cat) dog]", [("cat) dog]", 1.0)]),
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),
    ("[cat:1.5]", [("cat:1.5", 1 / 1.1)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_weights_a1111_syntax(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
