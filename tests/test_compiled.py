"""--torch_compile / --dynamo_backend: the U-Net compiled in place gives the uncompiled run's losses
and weights (within float tolerance), and saves under the same names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import UserError
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow


def _run(ws: Path, out: Path, *extra: str):
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    args = ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--max_train_steps", "3", *extra]
    return train(options_from_args(build_parser("train").parse_args(args))), load_file(str(out / "N.safetensors"))


def test_compiled_run_has_the_uncompiled_losses_and_weights(tmp_path, training_workspace):
    torch._dynamo.reset()
    training_workspace(tmp_path, n=4)
    plain, plain_weights = _run(tmp_path, tmp_path / "plain")
    # aot_eager traces forward and backward as inductor does, without needing minutes of C++ builds here
    comp, comp_weights = _run(tmp_path, tmp_path / "comp", "--torch_compile", "--dynamo_backend", "aot_eager")
    assert len(comp.losses) == 3
    assert comp.losses == pytest.approx(plain.losses, rel=1e-4)
    assert set(comp_weights) == set(plain_weights)  # same names: the module was compiled in place
    for key in plain_weights:
        torch.testing.assert_close(comp_weights[key], plain_weights[key], rtol=1e-4, atol=1e-5)


def test_backend_without_compile_is_refused():
    common = {"pretrained_model_name_or_path": "m", "output_dir": "o", "train_data_dir": "d", "in_json": "j.json"}
    with pytest.raises(UserError, match="--dynamo_backend"):
        TrainOptions(**common, dynamo_backend="inductor")
    assert TrainOptions(**common, torch_compile=True).dynamo_backend is None


def test_unavailable_backend_is_refused_in_one_line():
    from sdtune.train.compiled import compile_in_place

    with pytest.raises(UserError, match="'tvm' is not available"):
        compile_in_place(torch.nn.Linear(2, 2), "tvm", print)
