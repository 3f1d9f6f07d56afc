"""What a saved model says was trained: the dataset's resolution, the clip skip the text conditioning
used and the real batch size, not the raw flags (which may be unset, or overridden by a dataset TOML)."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from sdtune.testing import make_dataset, write_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


def _train(argv: list[str]):
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    return train(options_from_args(build_parser("train").parse_args(argv)))


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_an_sd2_v_run_from_a_dataset_toml_records_what_it_trained(tmp_path):
    # SD 2.x 768-v defaults to 768 px; the TOML trains at 64 (no --resolution), batch 2, 2 accumulation
    # steps, one process: the model was trained at 64x64 with 4 images per optimizer step and, with no
    # --clip_skip, on SD2's native penultimate layer, clip skip 2 in A1111's counting of the 24-layer tower.
    write_tiny_model(tmp_path / "m.safetensors", "sd2-v", seed=0)
    make_dataset(tmp_path / "data", n=4, seed=0, metadata=tmp_path / "meta.json")
    (tmp_path / "ds.toml").write_text(f'[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\n'
                                      f'metadata_file = "{tmp_path / "meta.json"}"\nimage_dir = "{tmp_path / "data"}"\n')
    out = tmp_path / "out"
    result = _train(["train", "--pretrained_model_name_or_path", str(tmp_path / "m.safetensors"), "--dataset_config",
                     str(tmp_path / "ds.toml"), "--output_dir", str(out), "--output_name", "N", "--max_train_steps", "1",
                     "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0"])
    assert result.steps == 1
    meta = _header(out / "N.safetensors")
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.encoder_layer"] == "2"
    assert meta["modelspec.prediction_type"] == "v"
    training = json.loads(meta["sdtune.training"])
    assert (training["total_batch_size"], training["batch_size_per_process"], training["num_processes"],
            training["gradient_accumulation_steps"]) == (4, 2, 1, 2)
    summary = json.loads((out / "N-train_summary.json").read_text())
    assert summary["trained"] == {"resolution": "64x64", "clip_skip": 2, "batch_size_per_process": 2, "num_processes": 1,
                                  "gradient_accumulation_steps": 2, "total_batch_size": 4}


def test_several_datasets_record_the_largest_resolution_and_list_all(tmp_path):
    from sdtune.data import build_plan
    from sdtune.train.logs import trained_settings
    from sdtune.train.options import TrainOptions

    make_dataset(tmp_path / "data", n=4, seed=0, metadata=tmp_path / "meta.json")
    subset = f'[[datasets.subsets]]\nmetadata_file = "{tmp_path / "meta.json"}"\nimage_dir = "{tmp_path / "data"}"\n'
    (tmp_path / "ds.toml").write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 3\n{subset}"
                                      f"[[datasets]]\nresolution = [96, 64]\nbatch_size = 1\n{subset}"
                                      f"[[datasets]]\nresolution = [64, 96]\nbatch_size = 2\n{subset}")
    opts = TrainOptions(pretrained_model_name_or_path="x", output_dir=str(tmp_path), dataset_config=str(tmp_path / "ds.toml"))
    plan = build_plan(opts, seed=0)
    got = trained_settings(plan.datasets, clip_skip=1, num_processes=2, gradient_accumulation_steps=4)
    # 96x64 and 64x96 have the same area, larger than 64x64: the first of the two; the largest
    # per-process batch (3) x 2 processes x 4 accumulation steps
    assert got["resolution"] == "96x64" and got["resolution_of"] == "dataset 2 of 3 (the largest)"
    assert got["dataset_resolutions"] == ["64x64", "96x64", "64x96"]
    assert got["total_batch_size"] == 24 and got["clip_skip"] == 1
