"""The text-embedding cache (sdtune.text.embed_cache): reuse across runs, invalidation, atomic files."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from sdtune.text import TextConditioner, TextEmbeddingCache

CAPTIONS = ["a photo of a cat", "a red dog, outdoors", "a photo of a cat", ""]


@pytest.fixture(scope="module")
def sd1():
    from sdtune.testing import build_tiny_model

    m = build_tiny_model("sd1", seed=2)
    m.text_encoder.requires_grad_(False)
    return m


def conditioner(m, te=None, tokenizer=None, **kw):
    kw.setdefault("max_token_length", 150)
    return TextConditioner(tokenizer or m.tokenizer, te or m.text_encoder, m.family, **kw)


def files(directory):
    return sorted(p for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
def test_entries_are_the_encoder_output_and_are_reused_by_a_new_run(sd1, tmp_path):
    cache = TextEmbeddingCache(tmp_path, conditioner(sd1))
    got = cache.get(CAPTIONS)
    assert cache.stats.written == 3 and cache.stats.hits == 0  # duplicates encoded once
    assert len(files(tmp_path)) == 3 and not list(tmp_path.rglob("*.tmp"))
    # Independent check: the encoder's last layer on each 77-token window, re-assembled by hand.
    tok, te = sd1.tokenizer, sd1.text_encoder
    for caption, emb in zip(CAPTIONS, got):
        ids = tok(caption, add_special_tokens=False).input_ids
        rows = [[49406, *ids[i:i + 75], 49407] + [49407] * (75 - len(ids[i:i + 75])) for i in (0, 75)]
        with torch.no_grad():
            h = te(torch.tensor(rows)).last_hidden_state
        expected = torch.cat([h[0, :1], h[0, 1:76], h[1, 1:76], h[1, 76:]])
        torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    stored = load_file(str(cache.path(CAPTIONS[1])))["embedding"]
    torch.testing.assert_close(stored, got[1], atol=0, rtol=0)

    # A new run: new objects, same folder and setup -> every caption is a hit, nothing is written.
    again = TextEmbeddingCache(tmp_path, conditioner(sd1))
    mtimes = [p.stat().st_mtime_ns for p in files(tmp_path)]
    torch.testing.assert_close(again.get(CAPTIONS), got, atol=0, rtol=0)
    assert again.stats.hits == 3 and again.stats.written == 0
    assert [p.stat().st_mtime_ns for p in files(tmp_path)] == mtimes


@pytest.mark.slow
def test_any_key_part_change_makes_a_new_entry(sd1, tmp_path):
    base = TextEmbeddingCache(tmp_path, conditioner(sd1))
    base_emb = base.get(["a photo of a cat"])
    changed_te = copy.deepcopy(sd1.text_encoder)
    with torch.no_grad():
        changed_te.final_layer_norm.bias.add_(0.01)
    changed_tok = copy.deepcopy(sd1.tokenizer)
    changed_tok.add_tokens(["<sks-token>"])
    variants = {
        "clip_skip": conditioner(sd1, clip_skip=2),
        "max_token_length": conditioner(sd1, max_token_length=225),
        "weights": conditioner(sd1, te=changed_te),
        "tokenizer": conditioner(sd1, tokenizer=changed_tok),
        "weighted": conditioner(sd1, weighted=True),
    }
    paths = {base.path("a photo of a cat")}
    for name, cond in variants.items():
        cache = TextEmbeddingCache(tmp_path, cond)
        emb = cache.get(["a photo of a cat"])
        assert cache.stats.written == 1 and cache.stats.hits == 0, name
        paths.add(cache.path("a photo of a cat"))
        with torch.no_grad():
            torch.testing.assert_close(emb, cond.encode(["a photo of a cat"]), atol=1e-6, rtol=1e-6)
        if name in ("clip_skip", "weights"):
            assert not torch.allclose(emb, base_emb), name
    assert len(paths) == len(variants) + 1
    # The unchanged setup still finds its own entry.
    assert TextEmbeddingCache(tmp_path, conditioner(sd1)).get(["a photo of a cat"]) is not None


@pytest.mark.slow
def test_family_layout_is_part_of_the_key(sd1, tmp_path):
    from sdtune.testing import build_tiny_model

    sd2 = build_tiny_model("sd2", seed=2)
    sd2.text_encoder.load_state_dict(sd1.text_encoder.state_dict())  # same weights, other padding
    sd2.text_encoder.requires_grad_(False)
    a = TextEmbeddingCache(tmp_path, conditioner(sd1, clip_skip=2))
    b = TextEmbeddingCache(tmp_path, conditioner(sd2, clip_skip=3))  # the same hidden layer
    assert a.path("x") != b.path("x")


@pytest.mark.slow
def test_damaged_entry_is_re_encoded(sd1, tmp_path, caplog):
    cache = TextEmbeddingCache(tmp_path, conditioner(sd1))
    good = cache.get(["a cat"])
    cache.path("a cat").write_bytes(b"not a safetensors file")
    fresh = TextEmbeddingCache(tmp_path, conditioner(sd1))
    torch.testing.assert_close(fresh.get(["a cat"]), good, atol=0, rtol=0)
    assert fresh.stats.written == 1 and "damaged" in caplog.text
    assert load_file(str(cache.path("a cat")))["embedding"].shape == good.shape[1:]


def test_precompute_then_truncation_is_still_reported(sd1, tmp_path):
    cond = conditioner(sd1, max_token_length=75)
    cache = TextEmbeddingCache(tmp_path, cond)
    long_caption = " ".join(["cat"] * 90)
    stats = cache.precompute(["a", long_caption, "a"], batch_size=1, progress=False)
    assert stats.written == 2
    assert cond.truncation_report().total == 0  # precomputing is not training use
    cache.get([long_caption, "a"])
    report = cond.truncation_report()
    assert (report.count, report.total, report.longest) == (1, 2, 90)
    assert cache.stats.hits == 2


@pytest.mark.slow
def test_refuses_a_trainable_encoder(sd1, tmp_path):
    te = copy.deepcopy(sd1.text_encoder).requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        TextEmbeddingCache(tmp_path, conditioner(sd1, te=te))
