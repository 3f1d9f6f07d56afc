"""Hypernetwork training through `sdtune train`: the fixed-noise loss with the hypernetwork applied
goes down, while every tensor of the U-Net, VAE and text encoder stays bit-identical."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune import checkpoint
from sdtune.cli import build_parser
from sdtune.hypernetwork import apply, files
from sdtune.hypernetwork.module import new_hypernetwork
from sdtune.testing import make_dataset
from sdtune.train.command import options_from_args
from sdtune.train.hypernetwork import HypernetworkTarget
from sdtune.train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # trains: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]


def make_workspace(root: Path, family: str, tiny_model_file) -> Path:
    make_dataset(root / "data", n=4, seed=0, metadata=root / "meta.json")
    tiny_model_file(root / "model.safetensors", family, seed=0)
    return root


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def workspace(request, tmp_path_factory, tiny_model_file):
    return make_workspace(tmp_path_factory.mktemp(f"hn-{request.param}"), request.param, tiny_model_file)


@pytest.fixture(scope="module")
def sd1_workspace(tmp_path_factory, tiny_model_file):
    return make_workspace(tmp_path_factory.mktemp("hn-sd1-only"), "sd1", tiny_model_file)


def options(root: Path, *extra: str):
    args = ["train", "--pretrained_model_name_or_path", str(root / "model.safetensors"), "--in_json",
            str(root / "meta.json"), "--train_data_dir", str(root / "data"), "--output_dir", str(root / "out"),
            "--output_name", "hn", "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
            "--seed", "1", "--max_data_loader_n_workers", "0", "--hypernetwork_module", "hypernetwork_nai", *extra]
    return options_from_args(build_parser("train").parse_args(args))


def fixed_noise_loss(model, root: Path, hypernetwork=None) -> float:
    """The epsilon loss on the training images, at fixed noise and timesteps, computed here from the
    model's parts (the images centre-cropped to 64x64, the captions through the text encoder: its
    last layer for SD1, the one before for SD2, then the final layer norm)."""
    from diffusers import DDPMScheduler

    records = json.loads((root / "meta.json").read_text())
    images, captions = [], []
    for key, record in sorted(records.items()):
        path = next(p for p in (root / "data").glob(key + ".*") if p.suffix not in (".txt", ".caption"))
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        img = img.crop(((img.width - side) // 2, (img.height - side) // 2, (img.width + side) // 2,
                        (img.height + side) // 2)).resize((64, 64), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        captions.append(record.get("caption", ""))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = model.vae.encode(torch.stack(images)).latent_dist.mean * model.vae.config.scaling_factor
        ids = model.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2 if model.family.v2 else -1]
        cond = getattr(model.text_encoder, "text_model", model.text_encoder).final_layer_norm(hidden)
        scheduler = DDPMScheduler.from_config(model.scheduler_config)
        losses = []
        for t in (50, 250, 450, 650, 850):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((len(latents),), t)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            if hypernetwork is None:
                out = model.unet(noisy, timesteps, cond).sample
            else:
                with apply.attach(model.unet, hypernetwork.eval()):
                    out = model.unet(noisy, timesteps, cond).sample
            losses.append(torch.nn.functional.mse_loss(out, noise).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_loss_and_leaves_the_model_untouched(workspace):
    opts = options(workspace, "--max_train_steps", "12")
    target = HypernetworkTarget(opts)
    result = train(opts, target)
    assert [p.name for p in result.outputs] == ["hn.pt"]
    fresh = checkpoint.load_model(str(workspace / "model.safetensors"), verbose=False)
    for name in ("unet", "vae", "text_encoder"):
        trained, loaded = getattr(target.model, name).state_dict(), getattr(fresh, name).state_dict()
        assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in loaded), name
    saved = files.load(workspace / "out" / "hn.pt")
    assert saved.info.step == 12 and saved.info.name == "hn"
    start = new_hypernetwork(saved.widths, saved.structure, seed=1)  # the run's initial weights
    base = fixed_noise_loss(fresh, workspace)
    before, after = fixed_noise_loss(fresh, workspace, start), fixed_noise_loss(fresh, workspace, saved)
    assert after < before and after < base, (base, before, after)


def test_resume_is_bit_exact(sd1_workspace, tmp_path):
    root = sd1_workspace
    train(options(root, "--max_train_steps", "4", "--output_dir", str(tmp_path / "whole")))
    train(options(root, "--max_train_steps", "4", "--output_dir", str(tmp_path / "parts"), "--save_every_n_steps", "2",
                  "--save_state"))
    state = tmp_path / "parts" / "hn-step00000002-state"
    assert (tmp_path / "parts" / "hn-step00000002.pt").is_file()
    train(options(root, "--max_train_steps", "4", "--output_dir", str(tmp_path / "resumed"), "--resume", str(state)))
    assert (tmp_path / "resumed" / "hn.pt").read_bytes() == (tmp_path / "whole" / "hn.pt").read_bytes()
    # the state holds the hypernetwork, not a copy of the frozen U-Net
    assert (state / "model.safetensors").stat().st_size < 2 * (tmp_path / "whole" / "hn.pt").stat().st_size


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch is tested on Linux")
def test_two_processes_train_one_hypernetwork(sd1_workspace, tmp_path, run_in_session):
    """Data parallelism averages the hypernetwork's gradients (it is called from inside the U-Net):
    the two processes, on different images, end with the same weights. A width the model lacks
    (128) gets no gradient and is kept frozen, which the gradient averaging would otherwise wait for."""
    root = sd1_workspace
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29566",
           "--num_cpu_threads_per_process", "1", str(REPO / "fine_tune.py"),
           f"--pretrained_model_name_or_path={root / 'model.safetensors'}", "--in_json", str(root / "meta.json"),
           f"--train_data_dir={root / 'data'}", f"--output_dir={tmp_path / 'out'}", "--resolution=64",
           "--train_batch_size=1", "--learning_rate=1e-3", "--max_data_loader_n_workers=0", "--max_train_steps=2",
           "--hypernetwork_module=hypernetwork_nai", "--hypernetwork_enable_sizes", "16", "32", "64", "128"]
    proc = run_in_session(cmd, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = re.search(r"hypernetwork weight checksum per process: (\S+), (\S+) \((\w+)", proc.stdout)
    assert sums and sums.group(1) == sums.group(2) and sums.group(3) == "identical", proc.stdout[-3000:]
    assert "no attention layer of this model has context width 128" in proc.stdout
    saved = files.load(tmp_path / "out" / "last.pt")
    assert sum(p.double().sum().item() for p in saved.parameters()) == pytest.approx(float(sums.group(1)), rel=1e-9)
    start = new_hypernetwork(saved.widths, saved.structure, seed=42)  # the default seed's initial weights
    assert torch.equal(saved.pairs["128"][0].linear[0].weight, start.pairs["128"][0].linear[0].weight)
    assert not torch.equal(saved.pairs["16"][0].linear[0].weight, start.pairs["16"][0].linear[0].weight)


def test_training_continues_a_web_ui_file(sd1_workspace, tmp_path):
    """--hypernetwork_weights: the file's structure, widths (one the model lacks too) and step count go on."""
    from collections import OrderedDict

    g = torch.Generator().manual_seed(3)

    def module(width):  # relu, activate_output False: Linears at positions 0 and 2
        return OrderedDict([("linear.0.weight", torch.randn(2 * width, width, generator=g) * 0.01),
                            ("linear.0.bias", torch.zeros(2 * width)),
                            ("linear.2.weight", torch.randn(width, 2 * width, generator=g) * 0.01),
                            ("linear.2.bias", torch.zeros(width))])

    web_ui = {w: (module(w), module(w)) for w in (32, 768)}
    web_ui.update({"step": 500, "name": "style", "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu",
                   "is_layer_norm": False, "weight_initialization": "Normal", "activate_output": False,
                   "use_dropout": False, "dropout_structure": [0, 0, 0], "last_layer_dropout": False})
    torch.save(web_ui, tmp_path / "style.pt")
    train(options(sd1_workspace, "--max_train_steps", "2", "--output_dir", str(tmp_path / "out"),
                  "--hypernetwork_weights", str(tmp_path / "style.pt")))
    saved = torch.load(tmp_path / "out" / "hn.pt", weights_only=True)
    assert saved["step"] == 502 and saved["activation_func"] == "relu" and list(saved)[:2] == [32, 768]
    assert not torch.equal(saved[32][0]["linear.2.weight"], web_ui[32][0]["linear.2.weight"])  # trained
    assert torch.equal(saved[768][1]["linear.2.weight"], web_ui[768][1]["linear.2.weight"])  # no such layer: kept


def test_dry_run_shows_the_hypernetwork(sd1_workspace, capsys, tiny_model_file):
    from sdtune.train.plan import dry_run

    root = sd1_workspace
    folder = tiny_model_file(root / "folder" / "model", "sd1", seed=0, fmt="diffusers")
    dry_run(options(root, "--pretrained_model_name_or_path", str(folder), "--dry_run",
                    "--hypernetwork_layer_structure", "1,2,2,1", "--hypernetwork_enable_sizes", "16", "32", "64",
                    "768"))
    out = capsys.readouterr().out
    # per pair 2 x (16*32+32 + 32*32+32 + 32*16+16) for width 16, and likewise for the others
    per_pair = {w: 2 * (w * 2 * w + 2 * w + 4 * w * w + 2 * w + 2 * w * w + w) for w in (16, 32, 64, 768)}
    assert f"{sum(per_pair.values()):,} parameters" in out and "1, 2, 2, 1, linear" in out
    assert "no attention layer of this model has context width 768" in out
