"""The hypernetwork flags: sd-scripts' switch and the web UI's structure names, parsed through the real
`sdtune train` parser; bad values are one line."""

from __future__ import annotations

import pytest

from sdtune.cli import build_parser
from sdtune.errors import UserError
from sdtune.hypernetwork.spec import Structure
from sdtune.train.command import options_from_args

REQUIRED = ["--pretrained_model_name_or_path", "model.safetensors", "--output_dir", "out"]


def parse(*flags: str, config_file=None):
    extra = ["--config_file", str(config_file)] if config_file else []
    return options_from_args(build_parser("train").parse_args(["train", *REQUIRED, *extra, *flags]))


@pytest.mark.parametrize("name", ["hypernetwork_nai", "finetune.hypernetwork_nai"])
def test_the_switch_selects_hypernetwork_training(name):
    from sdtune.train.hypernetwork import HypernetworkTarget
    from sdtune.train.target import FullFineTune
    from sdtune.train.targets import target_for

    assert type(target_for(parse("--hypernetwork_module", name))) is HypernetworkTarget
    assert type(target_for(parse())) is FullFineTune


def test_structure_flags_build_the_web_uis_structure(tmp_path):
    opts = parse("--hypernetwork_module", "hypernetwork_nai")
    assert opts.hypernetwork_structure() == Structure() and opts.hypernetwork_enable_sizes is None
    opts = parse("--hypernetwork_module", "finetune.hypernetwork_nai", "--hypernetwork_layer_structure", "1,2,2,1",
                 "--hypernetwork_activation_func", "swish", "--hypernetwork_weight_init", "KaimingUniform",
                 "--hypernetwork_add_layer_norm", "--hypernetwork_dropout_structure", "0", "0.05", "0.15", "0",
                 "--hypernetwork_activate_output", "--hypernetwork_enable_sizes", "768", "320", "640", "1280")
    assert opts.hypernetwork_structure() == Structure(
        layer_structure=(1, 2, 2, 1), activation_func="swish", is_layer_norm=True, dropout_structure=(0, 0.05, 0.15, 0),
        activate_output=True, weight_initialization="KaimingUniform")
    assert opts.hypernetwork_enable_sizes == [768, 320, 640, 1280]
    # the web UI's text form with spaces, a fractional entry, and TOML lists
    toml = tmp_path / "c.toml"
    toml.write_text('hypernetwork_module = "hypernetwork_nai"\nhypernetwork_layer_structure = "1, 1.5, 1"\n'
                    "hypernetwork_dropout_structure = [0, 0.1, 0]\n")
    assert parse(config_file=toml).hypernetwork_structure() == Structure(layer_structure=(1, 1.5, 1),
                                                                         dropout_structure=(0, 0.1, 0))


@pytest.mark.parametrize("flags,message", [
    (["--hypernetwork_module", "networks.lora"], "only the built-in NovelAI architecture"),
    (["--hypernetwork_layer_structure", "1,2,1"], "--hypernetwork_layer_structure: only acts in hypernetwork training"),
    (["--hypernetwork_weights", "w.pt"], "--hypernetwork_weights: w.pt is not a file"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_layer_structure", "2,2,1"],
     "must start and end with 1"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_layer_structure", "1,x,1"], "'x' is not a number"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_dropout_structure", "0,0.5"],
     "needs one entry per layer structure entry"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_dropout_structure", "0.1,0.5,0"],
     "--hypernetwork_dropout_structure: the first entry is the input's"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_dropout_structure", "0,1,0"],
     "probabilities between 0 and 1"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_enable_sizes", "320", "320"], "width 320 is given twice"),
    (["--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_activation_func", "prelu"], "invalid choice"),
    (["--hypernetwork_module", "hypernetwork_nai", "--save_model_as", "ckpt"], "--save_model_as: a hypernetwork is saved"),
])
def test_bad_values_are_one_line(flags, message, capsys):
    try:
        parse(*flags)
    except UserError as exc:
        text = str(exc)
    except SystemExit:  # argparse's own refusal of a choice
        text = capsys.readouterr().err
    else:
        raise AssertionError("accepted")
    assert message in text and text.strip().count("\n") <= 1, text


def test_weights_bring_their_own_structure(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    opts = parse("--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_weights", str(weights))
    assert opts.hypernetwork_weights == str(weights)
    with pytest.raises(UserError, match="--hypernetwork_activation_func: the structure of a continued hypernetwork"):
        parse("--hypernetwork_module", "hypernetwork_nai", "--hypernetwork_weights", str(weights),
              "--hypernetwork_activation_func", "relu")


def test_vram_is_refused_with_a_hypernetwork():
    # the memory planner models full fine-tuning; an answer for a hypernetwork run would be wrong
    assert parse("--dry_run", "--vram", "8").vram == 8
    with pytest.raises(UserError) as info:
        parse("--dry_run", "--vram", "8", "--hypernetwork_module", "hypernetwork_nai")
    assert info.value.where == "--vram" and "not hypernetwork training" in str(info.value)
