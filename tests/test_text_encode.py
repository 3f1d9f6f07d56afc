"""Chunked tokenisation and encoding (sdtune.text.tokens / encode) against computations written here.

The reference re-implements sd-scripts' procedure as its source reads (tokenise to 75·n + 2
with padding, slice windows, patch SD2's chunk ends) and calls the tiny text encoder on each chunk
by hand, so it shares no code with the implementation under test.
"""

import subprocess
import sys

import pytest
import torch

from sdtune.errors import UserError
from sdtune.text import CaptionOptions, TextConditioner, TokenBatch, process_caption

BOS, EOS = 49406, 49407
WORDS = ["cat", "dog", "red", "blue", "tree", "sky", "photo", "of", "a", "girl"]  # one token each
SIZES = [0, 1, 74, 75, 76, 150, 224, 225, 300]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request):
    from sdtune.testing import build_tiny_model

    m = build_tiny_model(request.param, seed=1)
    m.text_encoder.requires_grad_(False)
    return m


def caption_of(n_tokens):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_tokens))


def reference_chunks(tokenizer, pad, caption, n):
    """sd-scripts' `TokenizeStrategy._get_input_ids` (library/strategy_base.py), re-written here."""
    length = 75 * n + 2
    full = tokenizer(caption, padding="max_length", max_length=length, truncation=True).input_ids
    assert full[-1] in (EOS, pad) and len(full) == length
    if n == 1:
        return [full]
    chunks = []
    for i in range(1, length - 2, 75):
        chunk = [full[0]] + full[i:i + 75] + [full[-1]]
        if pad != EOS:
            if chunk[-2] not in (EOS, pad):
                chunk[-1] = EOS
            if chunk[1] == pad:
                chunk[1] = EOS
        chunks.append(chunk)
    return chunks


def reference_hidden(te, chunks, clip_skip_index=None):
    """Each chunk (a row of 77 ids) through the encoder as its own sequence; optionally
    hidden_states[index] and then the final layer norm, by hand."""
    with torch.no_grad():
        out = te(torch.tensor(chunks), output_hidden_states=True)
        if clip_skip_index is None:
            return list(out.last_hidden_state)
        ln = te.final_layer_norm
        h = out.hidden_states[clip_skip_index]
        return list(torch.nn.functional.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps))


def reference_embedding(states):
    if len(states) == 1:
        return states[0]
    return torch.cat([states[0][:1]] + [s[1:76] for s in states] + [states[-1][76:]])


def pad_of(model):
    return 0 if model.family.v2 else EOS


@pytest.mark.slow
@pytest.mark.parametrize("max_len", [75, 150, 225])
def test_chunks_and_embeddings_match_reference(model, max_len):
    n = max_len // 75
    tok, te = model.tokenizer, model.text_encoder
    captions = [caption_of(k) for k in SIZES]
    for k, c in zip(SIZES, captions):
        assert len(tok(c, add_special_tokens=False).input_ids) == k
    cond = TextConditioner(tok, te, model.family, max_token_length=max_len)
    batch = cond.tokenize(captions)
    assert batch.ids.shape == (len(SIZES), n, 77)
    assert batch.lengths == SIZES
    with torch.no_grad():
        got = cond.encode(batch)
    assert got.shape == (len(SIZES), 75 * n + 2, te.config.hidden_size) and got.dtype == torch.float32
    all_chunks = [reference_chunks(tok, pad_of(model), caption, n) for caption in captions]
    states = reference_hidden(te, [ch for chunks in all_chunks for ch in chunks])
    for b, chunks in enumerate(all_chunks):
        assert batch.ids[b].tolist() == chunks, f"{SIZES[b]} tokens"
        expected = reference_embedding(states[b * n:(b + 1) * n])
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)
    report = cond.truncation_report()
    cut = [k for k in SIZES if k > max_len]
    assert (report.count, report.total, report.longest) == (len(cut), len(SIZES), 300)
    assert (str(len(cut)) in str(report)) and ("300" in str(report))


@pytest.mark.slow
def test_padding_layouts_written_out(model):
    cond = TextConditioner(model.tokenizer, model.text_encoder, model.family, max_token_length=150)
    ids = cond.tokenize(["a photo of a cat", caption_of(80)]).ids
    content = [320, 1125, 539, 320, 2368]
    if model.family.v2:  # SD2: "!" (0) pads, EOS right after the last real token of each chunk
        assert ids[0, 0].tolist() == [BOS, *content, EOS] + [0] * 70
        assert ids[0, 1].tolist() == [BOS, EOS] + [0] * 75
        assert ids[1, 0, -1].item() == EOS and ids[1, 1, 6].item() == EOS and ids[1, 1, 7:].tolist() == [0] * 70
    else:  # SD1: EOS pads
        assert ids[0, 0].tolist() == [BOS, *content] + [EOS] * 71
        assert ids[0, 1].tolist() == [BOS] + [EOS] * 76
        assert ids[1, 0, -1].item() == EOS and ids[1, 1, 6:].tolist() == [EOS] * 71


@pytest.mark.slow
def test_clip_skip_is_hidden_state_plus_final_layer_norm(model):
    tok, te, fam = model.tokenizer, model.text_encoder, model.family
    layers = te.config.num_hidden_layers
    captions = [caption_of(12), caption_of(90)]
    # SD1 counts its own layers; SD2 counts the 24-layer OpenCLIP tower whose top layer is absent.
    offset = 1 if fam.v2 else 0
    skips = [2, 3, 4] if fam.v2 else [1, 2, 3]
    results = {}
    for k in skips:
        cond = TextConditioner(tok, te, fam, max_token_length=150, clip_skip=k)
        with torch.no_grad():
            got = cond.encode(captions)
        index = -(k - offset)
        for b, c in enumerate(captions):
            expected = reference_embedding(reference_hidden(te, reference_chunks(tok, pad_of(model), c, 2), index))
            torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)
        results[k] = got
    # The family's default is its native layer: SD1 the last, SD2 the Diffusers encoder's last.
    with torch.no_grad():
        default = TextConditioner(tok, te, fam, max_token_length=150).encode(captions)
    torch.testing.assert_close(default, results[skips[0]], atol=0, rtol=0)
    assert not torch.allclose(results[skips[0]], results[skips[1]])
    # Independently of hidden_states: a copy of the encoder cut after the chosen layer.
    from transformers import CLIPTextConfig, CLIPTextModel

    k = skips[1]
    cfg = CLIPTextConfig(**{**te.config.to_dict(), "num_hidden_layers": layers - (k - offset) + 1})
    cut = CLIPTextModel(cfg)
    cut.load_state_dict(te.state_dict(), strict=False)
    chunks = reference_chunks(tok, pad_of(model), captions[1], 2)
    with torch.no_grad():
        expected = reference_embedding(list(cut(torch.tensor(chunks)).last_hidden_state))
    torch.testing.assert_close(results[k][1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_clip_skip_errors(model):
    tok, te, fam = model.tokenizer, model.text_encoder, model.family
    layers = te.config.num_hidden_layers
    if fam.v2:
        with pytest.raises(UserError, match="never used"):
            TextConditioner(tok, te, fam, clip_skip=1)
        TextConditioner(tok, te, fam, clip_skip=layers + 1)
        with pytest.raises(UserError, match="below the first"):
            TextConditioner(tok, te, fam, clip_skip=layers + 2)
    else:
        TextConditioner(tok, te, fam, clip_skip=layers)
        with pytest.raises(UserError, match="below the first"):
            TextConditioner(tok, te, fam, clip_skip=layers + 1)
    with pytest.raises(UserError, match="whole number"):
        TextConditioner(tok, te, fam, clip_skip=0)


@pytest.mark.parametrize("bad", [76, 100, 300, 0, "150"])
def test_other_lengths_are_refused(model, bad):
    with pytest.raises(UserError, match="75, 150 or 225"):
        TextConditioner(model.tokenizer, model.text_encoder, model.family, max_token_length=bad)


def test_training_and_sampling_paths_agree(model):
    """Trainer: per-sample tokens from the data loader, joined; sampler: a list of prompts."""
    tok, te, fam = model.tokenizer, model.text_encoder, model.family
    prompts = ["a (red:1.3) [cat] on a tree", caption_of(100), "plain prompt"]
    cond = TextConditioner(tok, te, fam, max_token_length=150, clip_skip=3, weighted=True)
    train_batch = TokenBatch.cat([cond.chunker([p]) for p in prompts])
    with torch.no_grad():
        train = cond.encode(train_batch)
        sample = torch.cat([cond.encode([p]) for p in reversed(prompts)][::-1])
        sampler_batch = cond.encode(prompts)
    torch.testing.assert_close(train, sample, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(train, sampler_batch, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_weighted_captions_against_reference(model):
    tok, te, fam = model.tokenizer, model.text_encoder, model.family
    cond = TextConditioner(tok, te, fam, max_token_length=150, weighted=True)
    plain = TextConditioner(tok, te, fam, max_token_length=150)
    prompt = "a (photo:1.5) of a [cat]"
    batch = cond.tokenize([prompt, "a photo of a cat"])
    assert batch.ids[0].tolist() == batch.ids[1].tolist()  # brackets do not reach the tokenizer
    expected_w = [1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1] + [1.0] * 71
    assert batch.weights[0, 0].tolist() == pytest.approx(expected_w)
    assert batch.weights[0, 1].tolist() == [1.0] * 77
    with torch.no_grad():
        got = cond.encode(batch)
        unweighted = plain.encode(["a photo of a cat"])
    # Unweighted prompts are untouched; weighted ones are scaled, then the chunk mean restored (A1111).
    torch.testing.assert_close(got[1], unweighted[0], atol=1e-6, rtol=1e-6)
    chunks = reference_chunks(tok, pad_of(model), "a photo of a cat", 2)
    states = reference_hidden(te, chunks)
    w = torch.tensor(expected_w).unsqueeze(-1)
    # The rule divides by the chunk's mean: with a mean near 0 the reference would be 0/0 and the
    # check empty (the tiny encoders' LayerNorms are randomised for this reason).
    assert abs(states[0].mean().item()) > 1e-3
    scaled = states[0] * w
    states[0] = scaled * (states[0].mean() / scaled.mean())
    torch.testing.assert_close(got[0], reference_embedding(states), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])
    # Without --weighted_captions the brackets are plain text, as in sd-scripts.
    assert plain.tokenize([prompt]).ids[0].tolist() != batch.ids[0].tolist()


@pytest.mark.slow
def test_caption_dropout_conditions_on_the_empty_prompt(model):
    tok, te, fam = model.tokenizer, model.text_encoder, model.family
    dropped = process_caption("1girl, solo", CaptionOptions(caption_dropout_rate=1.0), seed=0, epoch=1, index=0)
    assert dropped == ""
    for max_len in (75, 225):
        cond = TextConditioner(tok, te, fam, max_token_length=max_len)
        with torch.no_grad():
            got = cond.encode([dropped])[0]
        empty = [BOS, EOS] + [pad_of(model)] * 75
        expected = reference_embedding(reference_hidden(te, [empty] * (max_len // 75)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond.empty_embedding(2)[1].detach(), expected, atol=1e-5, rtol=1e-5)
        assert got.abs().sum() > 0


@pytest.mark.slow
def test_gradients_reach_a_trained_encoder(tiny_sd1):
    te = tiny_sd1.text_encoder
    cond = TextConditioner(tiny_sd1.tokenizer, te, tiny_sd1.family, max_token_length=150, clip_skip=2)
    te.requires_grad_(True)
    try:
        te.zero_grad()
        cond.encode(["a photo of a cat"]).square().sum().backward()
        assert te.embeddings.token_embedding.weight.grad.abs().sum() > 0
        assert te.final_layer_norm.weight.grad.abs().sum() > 0
    finally:
        te.zero_grad()


def test_no_torch_import_for_caption_options():
    code = "import sys, sdtune.text; sdtune.text.CaptionOptions(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_sd2_exclamation_mark_is_a_word_not_padding():
    # OpenCLIP (SD2's training tokenizer) encodes "!" as "!</w>" = 256 (OpenAI's reference ids for
    # "Hello, world!", which other CLIP tokenizers' test suites also use); the HF SD2 tokenizer's
    # special pad "!" must not leak in.
    import pickle

    from sdtune.testing import build_tiny_model
    from sdtune.text import TextConditioner

    model = build_tiny_model("sd2")
    chunker = TextConditioner(model.tokenizer, model.text_encoder, model.family).chunker
    ids = chunker(["Hello, world!"]).ids[0, 0, :8].tolist()
    assert ids == [49406, 3306, 267, 1002, 256, 49407, 0, 0]
    assert pickle.loads(pickle.dumps(chunker))(["Hello, world!"]).ids[0, 0, :8].tolist() == ids


@pytest.mark.slow
def test_break_starts_a_new_window_in_weighted_prompts(model):
    """A1111's BREAK, written out: the windows are built here from the tokenizer's ids of each part."""
    tok, fam = model.tokenizer, model.family
    pad = pad_of(model)
    cond = TextConditioner(tok, model.text_encoder, fam, max_token_length=225, weighted=True)

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    def window(content):
        return [BOS, *content, EOS] + [pad] * (75 - len(content))

    full = caption_of(75)
    batch = cond.tokenize(["a photo BREAK of a (cat:1.2)", "BREAK cat", f"{full} BREAK cat", "a BREAK b BREAK c BREAK d",
                           "a break b"])
    assert batch.ids[0].tolist() == [window(ids("a photo")), window(ids("of a cat")), window([])]
    assert batch.weights[0, 1].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.2] + [1.0] * 73)
    assert batch.ids[1].tolist() == [window([]), window(ids("cat")), window([])]  # an empty first window
    # a BREAK right after a full window adds no empty one (A1111)
    assert batch.ids[2].tolist() == [window(ids(full)), window(ids("cat")), window([])]
    # four windows do not fit in three: the fourth is cut and the cut is counted
    assert batch.ids[3].tolist() == [window(ids("a")), window(ids("b")), window(ids("c"))]
    assert batch.lengths[3] == 3 * 75 + 1 and batch.truncated == [False, False, False, True, False]
    assert batch.ids[4, 0].tolist() == window(ids("a break b"))  # only the upper-case keyword
    # without --weighted_captions BREAK is a word, as in sd-scripts
    plain = TextConditioner(tok, model.text_encoder, fam, max_token_length=225)
    assert plain.tokenize(["a photo BREAK of a cat"]).ids[0, 0].tolist() == window(ids("a photo BREAK of a cat"))
