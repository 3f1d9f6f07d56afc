"""The frozen text encoder of a full fine-tune under mixed precision: one copy, the model's own cast
in place, when saves write that precision anyway (the saved bytes are the loaded float32 weights
rounded once); otherwise a compute copy beside the loaded weights, which saves write unchanged."""

import pytest
import torch
from safetensors.torch import load_file

from sdtune import checkpoint
from sdtune.testing import write_tiny_model
from sdtune.train.options import TrainOptions
from sdtune.train.target import FullFineTune

TE = "cond_stage_model."


def _placed(path, save_precision):
    opts = TrainOptions(pretrained_model_name_or_path=str(path), output_dir="o", mixed_precision="bf16",
                        save_precision=save_precision)
    model = checkpoint.load_model(str(path), dtype=torch.float32, verbose=False)
    target = FullFineTune(opts)
    target.place(model, device="cpu", compute_dtype=torch.bfloat16, note=lambda _line: None)
    return model, target


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "sd1.safetensors", "sd1")


def test_saved_in_the_compute_precision_the_frozen_encoder_is_one_copy(source, tmp_path):
    model, target = _placed(source, "bf16")
    assert target.text_encoder is model.text_encoder  # no float32 weights kept beside it
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    saved = load_file(checkpoint.save_model(model, tmp_path / "out.safetensors", fmt="safetensors",
                                            precision="bf16", progress=False))
    loaded = load_file(source)
    keys = [k for k in loaded if k.startswith(TE)]
    assert keys
    for k in keys:  # the file's float32 weights rounded once, as a float32 model saved in bf16 is
        assert torch.equal(saved[k], loaded[k].to(torch.bfloat16)), k


def test_saved_in_float32_the_loaded_weights_are_kept_for_saving(source, tmp_path):
    model, target = _placed(source, None)
    assert target.text_encoder is not model.text_encoder
    assert {p.dtype for p in target.text_encoder.parameters()} == {torch.bfloat16}
    saved = load_file(checkpoint.save_model(model, tmp_path / "out.safetensors", fmt="safetensors",
                                            precision="float", progress=False))
    loaded = load_file(source)
    for k in (k for k in loaded if k.startswith(TE)):
        assert torch.equal(saved[k], loaded[k]), k  # bit for bit what was loaded
