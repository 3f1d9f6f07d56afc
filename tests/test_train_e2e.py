"""The first training path, end to end, through the real command line."""

from pathlib import Path

import pytest
import torch

from sdtune.cli import main

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


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
