"""What a run leaves behind: saves on schedule with old ones pruned, EMA weights, sample images and the
validation loss, each checked against an independent computation."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import UserError
from sdtune.testing import make_dataset, write_tiny_model


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    write_tiny_model(root / "model.safetensors", "sd1", seed=0)
    make_dataset(root / "data", n=4, seed=0, metadata=root / "meta.json")
    return root


def _args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model.safetensors"), "--in_json",
            str(ws / "meta.json"), "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N",
            "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "7",
            "--max_data_loader_n_workers", "0", *extra]


def _train(argv: list[str]):
    """The real command-line parsing, then the loop, for its TrainResult."""
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    return train(options_from_args(build_parser("train").parse_args(argv)))


# ------------------------------------------------------------------------------------------- saving


def _sd_scripts_kept(max_steps: int, every: int, last_n: int) -> set[int]:
    """sd-scripts' fine_tune.py: save every `every` steps before the end, then remove the save of step
    `step - last_n - 1` rounded down to the save interval."""
    kept = set()
    for step in range(1, max_steps):
        if step % every == 0:
            kept.add(step)
            gone = step - last_n - 1
            kept.discard(gone - gone % every)
    return kept


def _sd_scripts_kept_epochs(epochs: int, every: int, last_n: int) -> set[int]:
    kept = set()
    for epoch in range(1, epochs):
        if epoch % every == 0:
            kept.add(epoch)
            kept.discard(epoch - every * last_n)
    return kept


def test_save_cadence_names_and_pruning(ws, tmp_path):
    out = tmp_path / "out"
    # 4 images, batch 2: 2 steps per epoch; 10 steps = 5 epochs
    assert main(_args(ws, out, "--max_train_steps", "10", "--save_every_n_steps", "2", "--save_last_n_steps", "3",
                      "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", "--save_state", "--ema",
                      "--ema_decay", "0.9")) == 0
    steps, epochs = _sd_scripts_kept(10, 2, 3), _sd_scripts_kept_epochs(5, 1, 2)
    assert steps == {6, 8} and epochs == {3, 4}  # the rule as the sd-scripts docs describe it
    # --save_state also writes the state at the end, as sd-scripts does
    expected = {"N.safetensors", "N-ema.safetensors", "N-loss.png", "N-history.json", "N-train_summary.json", "N-state"}
    for n in steps:
        expected |= {f"N-step{n:08d}.safetensors", f"N-step{n:08d}-ema.safetensors", f"N-step{n:08d}-state"}
    for n in epochs:
        expected |= {f"N-{n:06d}.safetensors", f"N-{n:06d}-ema.safetensors", f"N-{n:06d}-state"}
    assert set(p.name for p in out.iterdir()) == expected
    # each save holds the weights of its own step: consecutive saves differ
    a, b = load_file(str(out / "N-step00000006.safetensors")), load_file(str(out / "N-step00000008.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.diffusion_model."))


# --------------------------------------------------------------------------------------------- EMA


def test_ema_matches_an_independent_average(ws, tmp_path):
    out = tmp_path / "out"
    assert main(_args(ws, out, "--max_train_steps", "3", "--save_every_n_steps", "1", "--ema", "--ema_decay", "0.5",
                      "--save_precision", "float")) == 0
    unet = [k for k in load_file(str(ws / "model.safetensors")) if k.startswith("model.diffusion_model.")]
    weights = [load_file(str(ws / "model.safetensors"))] + [load_file(str(out / f"N-step{s:08d}.safetensors"))
                                                            for s in (1, 2)] + [load_file(str(out / "N.safetensors"))]
    ema = {k: weights[0][k].double() for k in unet}
    for step in (1, 2, 3):
        ema = {k: 0.5 * ema[k] + 0.5 * weights[step][k].double() for k in unet}
        saved = load_file(str(out / (f"N-step{step:08d}-ema.safetensors" if step < 3 else "N-ema.safetensors")))
        for k in unet:
            torch.testing.assert_close(saved[k].double(), ema[k], rtol=1e-6, atol=1e-7, msg=f"{k} at step {step}")
        # everything but the U-Net is the trained model's
        assert all(torch.equal(saved[k], weights[step][k]) for k in saved if k not in ema)
    # --save_ema: the final model is the average itself
    assert main(_args(ws, tmp_path / "as_model", "--max_train_steps", "3", "--ema", "--ema_decay", "0.5",
                      "--save_ema")) == 0
    final = load_file(str(tmp_path / "as_model" / "N.safetensors"))
    for k in unet:
        torch.testing.assert_close(final[k].double(), ema[k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ validation


def _held_out_stems(n: int, split: float, seed: int) -> list[str]:
    """sd-scripts' split_train_val for one subset: seeded shuffle, the tail validates."""
    stems = [f"img_{i:03d}" for i in range(n)]
    random.Random(seed).shuffle(stems)
    return stems[math.ceil(n * (1 - split)):]


def test_validation_split_is_sd_scripts_and_leaves_training(ws, tmp_path):
    from sdtune.data import build_plan
    from sdtune.train.options import TrainOptions
    from sdtune.train.validation import split_plan

    make_dataset(tmp_path / "d", n=10, seed=1, metadata=tmp_path / "m.json")
    opts = TrainOptions(pretrained_model_name_or_path="x", output_dir=str(tmp_path), in_json=str(tmp_path / "m.json"),
                        train_data_dir=str(tmp_path / "d"), resolution="64")
    plan = build_plan(opts, seed=1)
    train, held = split_plan(plan, 0.3, 11)
    assert sorted(Path(s.path).stem for s in held) == sorted(_held_out_stems(10, 0.3, 11))
    assert {s.index for s in train.active}.isdisjoint({s.index for s in held})
    assert len(train.active) == 7 and train.total_samples() == 7
    # a dataset config's own keys win over the command line's
    (tmp_path / "ds.toml").write_text(f'[[datasets]]\nvalidation_split = 0.2\nvalidation_seed = 5\n'
                                      f'[[datasets.subsets]]\nmetadata_file = "{tmp_path / "m.json"}"\n'
                                      f'image_dir = "{tmp_path / "d"}"\n')
    plan = build_plan(opts.model_copy(update={"dataset_config": str(tmp_path / "ds.toml"), "in_json": None}), seed=1)
    _train_plan, held = split_plan(plan, 0.5, 11)
    assert sorted(Path(s.path).stem for s in held) == sorted(_held_out_stems(10, 0.2, 5))
    (tmp_path / "bad.toml").write_text(f'[[datasets]]\nvalidation_split = 1.5\n[[datasets.subsets]]\n'
                                       f'metadata_file = "{tmp_path / "m.json"}"\n')
    with pytest.raises(UserError, match="validation_split"):
        build_plan(opts.model_copy(update={"dataset_config": str(tmp_path / "bad.toml"), "in_json": None}), seed=1)
    with pytest.raises(UserError, match="holds out no image"):
        split_plan(build_plan(opts, seed=1), 0.05, 11)


def test_validation_flags_without_a_split_are_refused(ws, tmp_path, capsys):
    assert main(_args(ws, tmp_path / "o", "--max_train_steps", "1", "--validate_every_n_steps", "1")) == 2
    assert "--validate_every_n_steps given but no images are held out" in capsys.readouterr().err


def _independent_validation_loss(model_dir: Path, image: Path, caption: str, seed: int, index: int) -> float:
    """The validation loss of one image, from diffusers/transformers parts and the rules in the docs."""
    import numpy as np
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtune.seeds import derive as derive_seed

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    img = Image.open(image).convert("RGB")  # a 64x64 test image: no resize or crop
    assert img.size == (64, 64)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ids = tok(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = te(ids).last_hidden_state
        gen = torch.Generator().manual_seed(derive_seed(seed, index))
        losses = []
        for t in (200, 400, 600, 800):  # evenly inside 0..1000, as sd-scripts' validation
            noise = torch.randn(latents.shape[1:], generator=gen)[None]
            ts = torch.tensor([t])
            pred = unet(sched.add_noise(latents, noise, ts), ts, cond).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_validation_loss_is_reproducible_and_correct(ws, tmp_path):
    # 8 images; img_007 is the only 64x64 one, so the held-out image (seed 9) needs no resize
    make_dataset(tmp_path / "d", n=8, seed=0, metadata=tmp_path / "m.json")
    held = _held_out_stems(8, 0.125, 9)
    assert held == ["img_007"]
    (tmp_path / "p.txt").write_text("a red circle --w 64 --h 64 --s 3 --d 11\n")
    runs = []
    for name in ("a", "b"):
        argv = _args(ws, tmp_path / name, "--in_json", str(tmp_path / "m.json"), "--train_data_dir",
                     str(tmp_path / "d"), "--max_train_steps", "4", "--validation_split", "0.125",
                     "--validation_seed", "9", "--validate_every_n_steps", "2", "--save_model_as", "diffusers",
                     "--sample_prompts", str(tmp_path / "p.txt"), "--sample_every_n_steps", "2")
        runs.append(_train(argv))
    a, b = runs
    # 7 training images, batch 2: 4 batches an epoch -> validations after steps 2 and 4 (also epoch 1's end)
    assert [s for s, _ in a.validation_losses] == [2, 4]
    assert a.validation_losses == b.validation_losses
    assert a.validation_losses[0][1] != a.validation_losses[1][1]  # training changed the weights
    samples = sorted((tmp_path / "a" / "sample").iterdir())
    assert {p.name.split("_")[1] for p in samples} == {"000002", "000004"}
    for s in samples:  # sampling during training is deterministic too
        assert s.read_bytes() == (tmp_path / "b" / "sample" / s.name).read_bytes()
    meta = json.loads((tmp_path / "m.json").read_text())["img_007"]
    expected = _independent_validation_loss(tmp_path / "a" / "N", tmp_path / "d" / "img_007.bmp",
                                            f"{meta['caption']}, {meta['tags']}", 9, 7)
    assert a.validation_losses[-1][1] == pytest.approx(expected, rel=1e-5)


def test_validation_loss_follows_the_weights(ws, tmp_path):
    from sdtune import checkpoint
    from sdtune.data import build_plan
    from sdtune.text import TextConditioner
    from sdtune.train.noise import DiffusionObjective
    from sdtune.train.options import TrainOptions
    from sdtune.train.predict import Predictor
    from sdtune.train.validation import Validator, split_plan

    opts = TrainOptions(pretrained_model_name_or_path="x", output_dir=str(tmp_path), in_json=str(ws / "meta.json"),
                        train_data_dir=str(ws / "data"), resolution="64")
    model = checkpoint.load_model(str(ws / "model.safetensors"), dtype=torch.float32, verbose=False)
    _plan, held = split_plan(build_plan(opts, seed=0), 0.5, 0)
    objective = DiffusionObjective.from_options(opts, model.scheduler_config, "epsilon")
    v = Validator(_plan, held, objective, seed=0)
    predictor = Predictor(objective)
    v.encode_images(model.vae, "cpu", model.vae.config.scaling_factor, progress=False)
    v.encode_captions(TextConditioner(model.tokenizer, model.text_encoder, model.family).encode)
    before = v.loss(predictor, model.unet)
    weight = model.unet.conv_out.bias
    with torch.no_grad():
        weight += 0.1
    changed = v.loss(predictor, model.unet)
    with torch.no_grad():
        weight -= 0.1
    assert changed != before and abs(changed - before) > 1e-4
    model.unet.train()
    again = v.loss(predictor, model.unet)
    assert model.unet.training  # validation leaves the training mode as it found it
    assert again == pytest.approx(before, rel=1e-6)


def test_validate_every_n_epochs_and_max_validation_steps(ws, tmp_path, capsys):
    # 4 images, half held out: 2 train at batch 1 (2 steps an epoch), 2 held-out batches of 1
    result = _train(_args(ws, tmp_path / "o", "--train_batch_size", "1", "--max_train_epochs", "4",
                          "--validation_split", "0.5", "--validate_every_n_epochs", "2"))
    assert result.steps == 8
    assert [s for s, _ in result.validation_losses] == [4, 8]  # after epochs 2 and 4
    assert "validation: 2 held-out images in 2 batches" in capsys.readouterr().out
    capped = _train(_args(ws, tmp_path / "c", "--train_batch_size", "1", "--max_train_epochs", "4",
                          "--validation_split", "0.5", "--validate_every_n_epochs", "2", "--max_validation_steps", "1"))
    assert "validation: 1 held-out image in 1 batch," in capsys.readouterr().out
    # the same training, a loss over the first held-out batch only
    assert [s for s, _ in capped.validation_losses] == [4, 8]
    assert capped.validation_losses != result.validation_losses


def test_a_validation_subset_is_held_out_whole(ws, tmp_path, capsys):
    make_dataset(tmp_path / "train", n=4, seed=1, metadata=tmp_path / "train.json")
    make_dataset(tmp_path / "val", n=3, seed=2, metadata=tmp_path / "val.json")
    subsets = (f'[[datasets.subsets]]\nmetadata_file = "{tmp_path / "train.json"}"\nimage_dir = "{tmp_path / "train"}"\n'
               f'[[datasets.subsets]]\nmetadata_file = "{tmp_path / "val.json"}"\nimage_dir = "{tmp_path / "val"}"\n'
               'is_validation = true\n')
    (tmp_path / "ds.toml").write_text('[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n' + subsets)
    out = tmp_path / "o"
    argv = _args(ws, out, "--max_train_steps", "2", "--validate_every_n_steps", "1")
    argv = [a for a in argv if a not in ("--in_json", str(ws / "meta.json"), "--train_data_dir", str(ws / "data"))]
    assert main(argv + ["--dataset_config", str(tmp_path / "ds.toml"), "--dry_run"]) == 0
    assert "validation: 3 held-out images" in capsys.readouterr().out and not out.exists()
    result = _train(argv + ["--dataset_config", str(tmp_path / "ds.toml")])
    assert [s for s, _ in result.validation_losses] == [1, 2]
    # trained on the 4 training images only: 2 batches of 2 per epoch
    summary = json.loads((out / "N-train_summary.json").read_text())
    assert summary["steps"] == 2 and result.epochs == 1

    from sdtune.data import build_plan
    from sdtune.train.options import TrainOptions
    from sdtune.train.validation import split_plan

    opts = TrainOptions(pretrained_model_name_or_path="x", output_dir=str(tmp_path), dataset_config=str(tmp_path / "ds.toml"))
    plan = build_plan(opts, seed=0)
    train, held = split_plan(plan, 0.0, 0)
    assert sorted(Path(s.path).parent.name for s in held) == ["val"] * 3
    assert {Path(plan.samples[i].path).parent.name for i in range(len(plan.samples)) if i not in train.excluded} == {"train"}
    # with a split as well, it applies to the training subset only
    _train_plan, held = split_plan(plan, 0.5, 0)
    assert sorted(Path(s.path).parent.name for s in held) == ["train"] * 2 + ["val"] * 3

    (tmp_path / "all.toml").write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n'
                                       f'metadata_file = "{tmp_path / "val.json"}"\nis_validation = true\n')
    with pytest.raises(UserError, match="nothing to train on"):
        build_plan(opts.model_copy(update={"dataset_config": str(tmp_path / "all.toml")}), seed=0)
