"""The first training path, end to end, through the real command line."""

import os
import sys
from pathlib import Path

import pytest
import torch

from sdtune.cli import main

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, training_workspace):
    root = tmp_path_factory.mktemp("e2e")
    training_workspace(root, n=4)
    return root


def _unet_from_output(path: Path, family_dir: Path):
    from diffusers import UNet2DConditionModel

    if path.suffix == ".safetensors":
        # diffusers' own single-file loader: an implementation independent of ours.
        return UNet2DConditionModel.from_single_file(str(path), config=str(family_dir), subfolder="unet",
                                                     local_files_only=True)
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_train_writes_a_changed_model(workspace, fmt, tmp_path):
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", str(workspace / "model"), "--in_json",
                 str(workspace / "meta.json"), "--train_data_dir", str(workspace / "data"), "--output_dir", str(out),
                 "--output_name", "N", "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
                 "--max_train_steps", "4", "--save_model_as", fmt, "--seed", "1"])
    assert code == 0
    saved = out / ("N.safetensors" if fmt == "safetensors" else "N")
    assert saved.exists()
    from diffusers import UNet2DConditionModel

    before = UNet2DConditionModel.from_pretrained(workspace / "model", subfolder="unet").state_dict()
    after = _unet_from_output(saved, workspace / "model").state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} tensors changed"


def test_fine_tune_py_under_accelerate_launch(workspace, tmp_path, run_in_session):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(REPO / "fine_tune.py"), f"--pretrained_model_name_or_path={workspace / 'model'}",
           "--in_json", str(workspace / "meta.json"), f"--train_data_dir={workspace / 'data'}",
           f"--output_dir={tmp_path / 'fine_tuned'}", "--train_batch_size=1", "--learning_rate=5e-6",
           "--max_train_steps=2", "--resolution=64", "--save_model_as=diffusers"]
    result = run_in_session(cmd, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fine_tuned" / "last" / "unet").is_dir()
