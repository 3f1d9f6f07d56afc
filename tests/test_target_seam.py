"""The training-target seam is real: a target written here, outside src, is trained by the unchanged
trainer.

The toy is shaped like a hypernetwork: a few parameters beside a frozen U-Net (a learned shift of
the text conditioning, which the U-Net's cross-attention reads), saved in a file of its own. The
trainer feeds it batches, steps its optimizer, saves it on the model cadence and resumes it, without
one line of the trainer knowing what it trains. That it learned is measured here independently: the
U-Net's loss on fixed noise, with the learned shift added to the conditioning, computed by hand.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.atomic import atomic_path
from sdtune.train.target import TrainingTarget

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # see conftest


class Shifted(torch.nn.Module):
    """The U-Net, called with its conditioning shifted by a learned vector."""

    def __init__(self, unet, width: int):
        super().__init__()
        self.unet = unet
        self.shift = torch.nn.Parameter(torch.zeros(width))

    @property
    def config(self):  # what sampling reads of a denoiser
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, noisy, timesteps, encoder_hidden_states):
        return self.unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states + self.shift)


class ContextShift(TrainingTarget):
    label = "context shift"

    def save_format(self, opts):
        return "safetensors"

    def place(self, model, *, device, compute_dtype, note):
        self.model = model
        model.unet.requires_grad_(False).to(device)
        self.text_encoder = model.text_encoder.requires_grad_(False).eval().to(device)
        self.module = Shifted(model.unet, model.unet.config.cross_attention_dim).to(device)

    def param_groups(self):
        return [{"params": [self.module.shift], "lr": 0.05, "name": "shift"}]

    def modules(self):
        return [self.module]

    def adopt(self, prepared):
        self.module = prepared[0]

    @property
    def denoiser(self):
        return self.module

    @contextlib.contextmanager
    def eval_view(self, weights):
        with weights.full(self.module) as module:
            yield module, None

    def checksum_modules(self):
        return [self.module]

    def save(self, path_for, stem, *, step, weights, metadata, ema=None):
        path = path_for(stem)
        with weights.full(self.module) as module, atomic_path(path) as tmp:
            save_file({"shift": module.shift.detach().cpu().contiguous()}, str(tmp))
        return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, training_workspace):
    return training_workspace(tmp_path_factory.mktemp("toy"), safetensors=True)


def _options(ws: Path, out: Path, *extra: str):
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args

    argv = ["train", "--pretrained_model_name_or_path", str(ws / "model.safetensors"), "--in_json",
            str(ws / "meta.json"), "--train_data_dir", str(ws / "data"), "--output_dir", str(out),
            "--output_name", "toy", "--resolution", "64", "--train_batch_size", "2", "--seed", "3",
            "--max_data_loader_n_workers", "0", "--optimizer_type", "AdamW", *extra]
    return options_from_args(build_parser("train").parse_args(argv))


def _fixed_noise_loss(ws: Path, shift: torch.Tensor) -> float:
    """The epsilon MSE of the U-Net on the training images at fixed noise and timesteps, with `shift`
    added to the conditioning: written from the diffusion formulas, not with sdtune's trainer."""
    from sdtune import checkpoint
    from sdtune.data import build_plan
    from sdtune.data.images import prepare_sample
    from sdtune.text import TextConditioner

    model = checkpoint.load_model(str(ws / "model.safetensors"), dtype=torch.float32, verbose=False)
    plan = build_plan(_options(ws, ws / "unused"), seed=0)
    pixels = torch.stack([torch.from_numpy(prepare_sample(s.path, s.size, s.resized, s.bucket)[0])
                          for s in plan.samples])
    cond = TextConditioner(model.tokenizer, model.text_encoder, model.family).encode([s.caption for s in plan.samples])
    gen = torch.Generator().manual_seed(1234)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    total = 0.0
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        for t in (50, 200, 400, 600, 800, 950):
            noise = torch.randn(latents.shape, generator=gen)
            a = alphas_cumprod[t].float()
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            ts = torch.full((len(latents),), t)
            pred = model.unet(noisy, ts, encoder_hidden_states=cond + shift).sample
            total += float(((pred - noise) ** 2).mean())
    return total / 6


def test_a_target_from_outside_is_trained_saved_and_resumed_by_the_same_trainer(ws, tmp_path):
    from sdtune.train.trainer import train

    out = tmp_path / "out"
    before = load_file(str(ws / "model.safetensors"))
    target = ContextShift()
    result = train(_options(ws, out, "--max_train_steps", "12", "--save_every_n_steps", "4", "--save_state"),
                   target=target)
    assert result.steps == 12
    # the trainer saved the target's own file on the model cadence, under the model names
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["toy-step00000004.safetensors",
                                                                  "toy-step00000008.safetensors", "toy.safetensors"]
    shift = load_file(str(out / "toy.safetensors"))["shift"]
    assert shift.abs().max() > 0.05
    # the frozen model did not move: every U-Net and text-encoder weight equals the file's
    unet, encoder = target.model.unet.state_dict(), target.text_encoder.state_dict()
    from sdtune import checkpoint

    loaded = checkpoint.load_model(str(ws / "model.safetensors"), dtype=torch.float32, verbose=False)
    for name, value in loaded.unet.state_dict().items():
        assert torch.equal(unet[name].cpu(), value), name
    for name, value in loaded.text_encoder.state_dict().items():
        assert torch.equal(encoder[name].cpu(), value), name
    assert load_file(str(ws / "model.safetensors")).keys() == before.keys()
    # it learned: the hand-computed fixed-noise loss with the learned shift is lower than without
    base, learned = _fixed_noise_loss(ws, torch.zeros_like(shift)), _fixed_noise_loss(ws, shift)
    assert learned < base * 0.995, (base, learned)

    # resuming the step-8 state to 12 steps gives the uninterrupted run's shift, bit for bit
    resumed_out = tmp_path / "resumed"
    train(_options(ws, resumed_out, "--max_train_steps", "12", "--resume", str(out / "toy-step00000008-state")),
          target=ContextShift())
    assert torch.equal(load_file(str(resumed_out / "toy.safetensors"))["shift"], shift)
