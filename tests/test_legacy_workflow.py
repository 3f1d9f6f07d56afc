"""sd-scripts' documented fine-tuning workflows, command for command, from images to a trained model.

The preparation scripts run as the documents show them (finetune/*.py, executed as scripts), and
fine_tune.py runs under `accelerate launch` with the documents' flags. Two deviations, both for a
CPU test's time: the resolution is 128 instead of 512 (`--max_resolution 128,128 --min_bucket_reso
64`) and a few steps instead of 10000. What the U-Net trained on and how often the VAE encoder ran
are observed in the training process itself (tests/probe/sitecustomize.py).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections import Counter
from pathlib import Path

import pytest

from sdtune.testing import make_dataset

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "probe"
SCALE = ["--max_resolution", "128,128", "--min_bucket_reso", "64"]  # the documents: --max_resolution 512,512


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_file) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("legacy") / "model.ckpt", "sd1", seed=0)


def script(name: str, *args: str) -> None:
    """One of the finetune/*.py scripts, run as `python finetune/<name>.py ARGS` runs it, in this
    process: its exit is an ordinary one (`run_and_exit` would end the test process with it)."""
    import sdtune.cli

    argv, quick_exit = sys.argv, sdtune.cli.run_and_exit
    sys.argv = [str(REPO / "finetune" / f"{name}.py"), *args]
    sdtune.cli.run_and_exit = lambda argv=None, prog=None: sys.exit(sdtune.cli.main(argv, prog))
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv, sdtune.cli.run_and_exit = argv, quick_exit
    assert done.value.code == 0, f"{name}.py exited with {done.value.code}"


def prepare(folder: str, model: Path, *full_path: str) -> dict:
    """merge captions -> merge tags -> clean -> prepare buckets and latents, as documented."""
    script("merge_captions_to_metadata", *full_path, folder, "meta_cap.json")
    script("merge_dd_tags_to_metadata", *full_path, folder, "--in_json", "meta_cap.json", "meta_cap_dd.json")
    script("clean_captions_and_tags", "meta_cap_dd.json", "meta_clean.json")
    script("prepare_buckets_latents", *full_path, folder, "meta_clean.json", "meta_lat.json", str(model),
           "--batch_size", "4", *SCALE, "--mixed_precision", "no")
    return json.loads(Path("meta_lat.json").read_text())


def launch_fine_tune(run_in_session, cwd: Path, *flags: str) -> tuple[dict, str]:
    """`accelerate launch --num_cpu_threads_per_process 1 fine_tune.py FLAGS`; what the U-Net saw."""
    probe = cwd / "probe"
    probe.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SDTUNE_PROBE_DIR": str(probe),
           "PYTHONPATH": os.pathsep.join([str(PROBE), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
           str(REPO / "fine_tune.py"), *flags]
    result = run_in_session(cmd, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in probe.glob("*.json")]
    trained = [s for s in seen if s["unet_samples"]]
    assert len(trained) == 1, "expected one training process"
    return trained[0], result.stdout


def images(folder: Path) -> None:
    # five images of four aspect ratios (3:2, 2:3, 1:1, 2:1, 1:2), each with a .caption and a .txt tag file
    make_dataset(folder, n=5, seed=3)


def test_documented_legacy_workflow_with_full_path(model, tmp_path, monkeypatch, run_in_session, capsys):
    monkeypatch.chdir(tmp_path)
    images(tmp_path / "train_data")
    meta = prepare("train_data", model, "--full_path")
    # --full_path with a relative folder: keys are paths from the working directory
    assert sorted(meta) == [f"train_data/img_00{i}.{ext}" for i, ext in enumerate(["png", "jpg", "webp", "png", "jpg"])]
    prepared = Counter(tuple(m["train_resolution"]) for m in meta.values())
    assert sorted(prepared.values()) == [1, 1, 3], prepared  # different aspect ratios, different buckets

    legacy = ["--pretrained_model_name_or_path=" + str(model), "--in_json", "meta_lat.json",
              "--train_data_dir=train_data", "--output_dir=fine_tuned", "--shuffle_caption", "--train_batch_size=1",
              "--learning_rate=5e-6", "--max_train_steps=5", "--use_8bit_adam", "--xformers",
              "--gradient_checkpointing", "--mixed_precision=bf16", "--save_every_n_epochs=4"]
    from sdtune.cli import main

    assert main(["train", *legacy, "--dry_run"]) == 0
    dry = capsys.readouterr().out
    assert "note: prepared data: 5 images train in the 3 buckets" in dry and "no VAE call for them" in dry
    assert "buckets recorded in the metadata" in dry
    assert "latent cache: on disk" in dry and "5 entry files present" in dry

    seen, out = launch_fine_tune(run_in_session, tmp_path, *legacy)
    # one epoch of 5 steps at batch size 1: every image once, each in the bucket prepare chose for it
    assert Counter(map(tuple, seen["unet_samples"])) == prepared
    assert seen["encoder_calls"] == 0, "training encoded images that prepare_buckets_latents.py had cached"
    assert "latent cache: all 5 entries up to date" in out
    assert (tmp_path / "fine_tuned" / "last.safetensors").is_file()


class Seen:
    """In this process, as the probe does in a subprocess: VAE encoder calls and U-Net samples."""

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook

        self.encoder_calls, self.unet_samples = 0, []

        def hook(module, args, output):
            if type(module).__name__ == "Encoder":
                self.encoder_calls += 1
            elif type(module).__name__ == "UNet2DConditionModel" and args:
                n, _c, h, w = args[0].shape
                self.unet_samples.extend([(w * 8, h * 8)] * n)

        self.handle = register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_documented_dataset_config_workflow_without_full_path(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "piyo"  # an absolute image folder, stem keys
    images(folder)
    meta = prepare(str(folder), model)
    assert sorted(meta) == [f"img_00{i}" for i in range(5)]
    prepared = Counter(tuple(m["train_resolution"]) for m in meta.values())
    assert sorted(prepared.values()) == [1, 1, 3]
    # the documents' fine-tuning dataset config; its resolution gives way to the recorded buckets
    (tmp_path / "config.toml").write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\n\n[[datasets]]\nresolution = [768, 768]\n"
        f"batch_size = 2\n\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n"
        f"  metadata_file = '{tmp_path / 'meta_lat.json'}'\n")
    from sdtune.cli import main

    capsys.readouterr()
    # fine_tune.py's own code path (the legacy test above runs the script under accelerate launch)
    with Seen() as seen:
        code = main(["train", f"--pretrained_model_name_or_path={model}", "--output_dir=out", "--output_name=mine",
                     "--dataset_config=config.toml", "--save_model_as=safetensors", "--learning_rate=5e-6",
                     "--max_train_steps=4", "--use_8bit_adam", "--xformers", "--gradient_checkpointing",
                     "--mixed_precision=fp16"])
    assert code == 0
    # batches of up to 2 from one bucket each (3 images at 128x128: a batch of 2 and one of 1), so
    # one epoch of 4 steps holds every image once
    assert Counter(seen.unet_samples) == prepared
    assert seen.encoder_calls == 0
    assert "note: prepared data: 5 images" in capsys.readouterr().out
    assert (tmp_path / "out" / "mine.safetensors").is_file()
