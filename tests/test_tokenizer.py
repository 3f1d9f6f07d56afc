"""The shipped CLIP tokenizer files are the real CLIP BPE table.

Expected ids come from independent sources: OpenAI's reference tokenizer and public test suites of
other CLIP tokenizer implementations (see shared/reference/environment-facts.md §2a).
"""

import hashlib

import pytest
from transformers import CLIPTokenizer

from sdtune.families import FAMILIES

KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "don't stop 42 times": [49406, 847, 713, 1691, 275, 273, 1661, 49407],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_known_ids(family):
    tok = CLIPTokenizer.from_pretrained(FAMILIES[family].asset_dir / "tokenizer")
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    for text, ids in KNOWN.items():
        if family != "sd1" and "!" in text:
            continue  # see test_sd2_pad_token_quirk
        assert tok(text).input_ids == ids, text


def test_sd2_pad_token_quirk():
    # Like the real HF SD2 tokenizer, ours registers "!" as the pad token, so a literal "!" in the
    # text becomes id 0 instead of OpenCLIP's "!</w>" = 256. sdtune.text therefore tokenizes content
    # without the tokenizer's padding; this test documents why.
    sd2 = CLIPTokenizer.from_pretrained(FAMILIES["sd2"].asset_dir / "tokenizer")
    assert sd2("Hello, world!").input_ids == [49406, 3306, 267, 1002, 0, 49407]


def test_padding_differs_between_sd1_and_sd2():
    sd1 = CLIPTokenizer.from_pretrained(FAMILIES["sd1"].asset_dir / "tokenizer")
    sd2 = CLIPTokenizer.from_pretrained(FAMILIES["sd2"].asset_dir / "tokenizer")
    assert sd1("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]
    assert sd2("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]


def test_files_match_the_published_rebuild():
    # sha256 prefixes/suffixes of the files rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz,
    # as recorded in environment-facts.md §2a.
    for family in FAMILIES.values():
        vocab = hashlib.sha256((family.asset_dir / "tokenizer" / "vocab.json").read_bytes()).hexdigest()
        merges = hashlib.sha256((family.asset_dir / "tokenizer" / "merges.txt").read_bytes()).hexdigest()
        assert vocab.startswith("3f0c4f7d") and vocab.endswith("fb69"), vocab
        assert merges.startswith("9fd691f7") and merges.endswith("051a"), merges
