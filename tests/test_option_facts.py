"""Facts about an option are declared once, on its field: whether it may change on resume, whether it
is a secret, and what leaving it out means. Everything else (the resume check, the help text, the
code that needs the value) derives them from there."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from sdtune.config import RESUME_FACTS, add_options, implied_value, option_names, secret_names
from sdtune.errors import UserError
from sdtune.train import state
from sdtune.train.options import TrainOptions

SRC = Path(__file__).resolve().parents[1] / "src" / "sdtune"
OPTIONS = set(TrainOptions.model_fields)


def _facts(name: str) -> dict:
    return TrainOptions.model_fields[name].json_schema_extra


def test_every_option_is_classified_for_resume_on_its_field():
    unclassified = sorted(n for n in OPTIONS if _facts(n).get("resume") not in RESUME_FACTS)
    assert not unclassified
    # the classes partition the options
    classes = [set(option_names(TrainOptions, resume=f)) for f in RESUME_FACTS]
    assert sum(len(c) for c in classes) == len(OPTIONS) and set().union(*classes) == OPTIONS


def test_the_resume_check_compares_exactly_the_options_declared_same():
    options = TrainOptions(pretrained_model_name_or_path="m", output_dir="o", wandb_api_key="k").model_dump(mode="json")
    expected = set(option_names(TrainOptions, resume="same")) - secret_names(TrainOptions)
    assert set(state.significant_options(options)) == expected


def test_resume_refuses_a_changed_training_option_and_accepts_a_changed_output():
    """Two options whose class follows from what they do: the learning rate changes every update, the
    output folder only where files go."""
    saved = TrainOptions(pretrained_model_name_or_path="m", output_dir="o").model_dump(mode="json")
    record = {"options": state.significant_options(saved)}
    moved = {**saved, "output_dir": "elsewhere", "max_train_steps": 5000}
    assert state.check_compatible(record, moved, False, "s") == []
    with pytest.raises(UserError, match="learning_rate"):
        state.check_compatible(record, {**saved, "learning_rate": 1e-4}, False, "s")


def _string_collections(tree: ast.AST) -> list[tuple[int, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Set, ast.List, ast.Tuple)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if len([n for n in names if n in OPTIONS]) >= 2:
                found.append((node.lineno, names))
    return found


def test_state_holds_no_list_of_option_names():
    tree = ast.parse((SRC / "train" / "state.py").read_text())
    assert _string_collections(tree) == []
    # the scan itself finds such a list
    assert _string_collections(ast.parse('KEEP = {"output_dir", "logging_dir"}\n'))


# "(default: 0.3)", "(default: snr)": a literal value; "(default: as models)" describes instead, and
# "(default: --seed)" names the option whose value it takes
_LITERAL_DEFAULT = re.compile(r"\(default: ((?!--)[\w.+-]+)\)")


def test_no_help_text_repeats_a_default_by_hand():
    """A default written into the help text would have to be kept equal to the code's fallback by
    hand; the field's `implied` value is shown in the help and read by the code instead."""
    repeated = {n: m.group(1) for n, info in TrainOptions.model_fields.items()
                if (m := _LITERAL_DEFAULT.search(info.description or ""))}
    assert repeated == {}


def _help_lines() -> dict[str, str]:
    parser = argparse.ArgumentParser(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10_000))
    add_options(parser, TrainOptions)
    lines = {}
    for action in parser._actions:
        if action.dest in OPTIONS:
            lines[action.dest] = action.help.replace("%%", "%")
    return lines


def test_the_help_shows_each_implied_default_from_the_field():
    help_lines = _help_lines()
    implied = {n: _facts(n)["implied"] for n in OPTIONS if _facts(n).get("implied") is not None}
    assert {"seed", "huber_c", "optimizer_type", "output_name"} <= set(implied)
    for name, value in implied.items():
        assert TrainOptions.model_fields[name].default is None  # implied stands for a default of None
        assert help_lines[name].endswith(f"(default: {value})"), name
        assert help_lines[name].count("(default:") == 1, name


def test_code_reads_implied_defaults_from_the_field():
    """What leaving an option out means, seen through the code that acts on it: sd-scripts'
    defaults (seed 42, the optimizer AdamW, the final model named "last", Huber c 0.1 on the snr
    schedule, multires discount 0.3) match the declared values."""
    from sdtune.train.noise import LossConfig, NoiseConfig
    from sdtune.train.optim import resolve_optimizer_name
    from sdtune.train.saving import default_names

    opts = TrainOptions(pretrained_model_name_or_path="m", output_dir="o")
    assert opts.effective_seed == implied_value(TrainOptions, "seed") == 42
    assert resolve_optimizer_name(None, False, False) == implied_value(TrainOptions, "optimizer_type") == "AdamW"
    assert default_names(None)[0] == opts.output_path().stem == "last"
    loss = LossConfig.from_options(opts.model_copy(update={"loss_type": "huber"}), "epsilon")
    assert (loss.huber_schedule, loss.huber_c, loss.huber_scale) == ("snr", 0.1, 1.0)
    noise = NoiseConfig.from_options(opts.model_copy(update={"multires_noise_iterations": 6}))
    assert (noise.multires_noise_discount, noise.min_timestep) == (0.3, 0)
    assert NoiseConfig().multires_noise_discount == 0.3 and LossConfig().huber_c == 0.1


def _literal_fallbacks(tree: ast.AST, implied: set[str]) -> list[str]:
    """`opts.x or 5`, `5 if opts.x is None else opts.x`, `_opt(opts, "x", 5)`, `getattr(opts, "x", 5)`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            if any(isinstance(v, ast.Attribute) and v.attr in implied for v in node.values) and \
                    isinstance(node.values[-1], ast.Constant):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare):
            subject = node.test.left
            if isinstance(subject, ast.Attribute) and subject.attr in implied and \
                    isinstance(node.body if isinstance(node.test.ops[0], ast.Is) else node.orelse, ast.Constant):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and len(node.args) >= 3:
            key, fallback = node.args[1], node.args[2]
            if isinstance(key, ast.Constant) and key.value in implied and isinstance(fallback, ast.Constant) \
                    and fallback.value is not None:
                found.append(ast.unparse(node))
    return found


def test_no_code_repeats_an_implied_default():
    implied = {n for n in OPTIONS if _facts(n).get("implied") is not None}
    found = [f"{p.relative_to(SRC)}: {use}" for p in sorted(SRC.rglob("*.py"))
             for use in _literal_fallbacks(ast.parse(p.read_text()), implied)]
    assert found == []
    probe = ast.parse('a = opts.seed or 42\nb = 0.1 if o.huber_c is None else o.huber_c\nc = _opt(o, "huber_c", 0.1)\n')
    assert len(_literal_fallbacks(probe, implied)) == 3
