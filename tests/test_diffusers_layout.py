"""Diffusers folders that every reader loads: the text encoder under transformers 4's tensor names and
the tokenizer as vocab.json + merges.txt beside tokenizer.json. (The load in transformers 4.54 and
diffusers 0.32 themselves is scripts/check_diffusers_folder_old_transformers.py; see docs/checkpoints.md.)"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune import checkpoint as ck
from sdtune.cli import main
from sdtune.testing import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    out = {}
    for family in ("sd1", "sd2-v"):
        model = build_tiny_model(family, seed=0)
        out[family, "diffusers"] = ck.save_model(model, root / f"{family}-bin", fmt="diffusers", progress=False)
        single = ck.save_model(model, root / f"{family}.safetensors", fmt="safetensors", progress=False)
        assert main(["convert", str(single), str(root / f"{family}-convert")]) == 0  # diffusers_safetensors
        out[family, "convert"] = root / f"{family}-convert"
        out[family, "model"] = model
    return out


def _text_tensors(folder):
    te = folder / "text_encoder"
    if (te / "model.safetensors").is_file():
        return load_file(te / "model.safetensors")
    return torch.load(te / "pytorch_model.bin", weights_only=True)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
@pytest.mark.parametrize("how", ["diffusers", "convert"])
def test_text_encoder_names_are_transformers_4s_and_load_without_missing_keys(folders, family, how):
    folder, model = folders[family, how], folders[family, "model"]
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    fresh = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    # transformers 4's CLIPTextModel names every tensor text_model.<...>; 5.6+ drops that level
    expected = {k if k.startswith("text_model.") else f"text_model.{k}" for k in fresh.state_dict()}
    assert set(_text_tensors(folder)) == expected
    loaded, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    ids = model.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model.text_encoder(ids).last_hidden_state,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_tokenizer_has_vocab_and_merges_beside_tokenizer_json(folders, family, tmp_path):
    folder, model = folders[family, "convert"], folders[family, "model"]
    tok = folder / "tokenizer"
    assert TOKENIZER_FILES <= {p.name for p in tok.iterdir()}
    # the BPE tables equal the shipped ones (rebuilt from OpenAI's own file by scripts/make_tokenizer.py)
    shipped = model.family.asset_dir / "tokenizer"
    assert json.loads((tok / "vocab.json").read_text()) == json.loads((shipped / "vocab.json").read_text())
    assert (tok / "merges.txt").read_text().splitlines() == (shipped / "merges.txt").read_text().splitlines()
    special = json.loads((tok / "special_tokens_map.json").read_text())
    assert special["pad_token"] == ("!" if model.family.v2 else "<|endoftext|>")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and "local_files_only" not in config
    # a reader that only knows vocab.json + merges.txt gets the same ids
    slow_only = tmp_path / "tok"
    shutil.copytree(tok, slow_only)
    (slow_only / "tokenizer.json").unlink()
    prompts = ["a photo of a cat", "A red CIRCLE, on a blue background!"]
    args = dict(padding="max_length", max_length=77, truncation=True)
    assert CLIPTokenizer.from_pretrained(slow_only)(prompts, **args).input_ids == model.tokenizer(prompts, **args).input_ids


def test_folders_written_by_earlier_sdtune_versions_still_load(folders, tmp_path):
    # earlier versions wrote the text encoder without text_model. and the tokenizer as tokenizer.json only
    old = tmp_path / "old"
    shutil.copytree(folders["sd1", "convert"], old)
    te_file = old / "text_encoder" / "model.safetensors"
    save_file({k.removeprefix("text_model."): v for k, v in load_file(te_file).items()}, te_file)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (old / "tokenizer" / name).unlink()
    model, reference = ck.load_model(old, verbose=False), folders["sd1", "model"]
    for (k, a), b in zip(model.text_encoder.state_dict().items(), reference.text_encoder.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids
