"""--fused_backward_pass: each parameter is stepped inside backward() and its gradient freed at once.

Checked against the ordinary path (backward over the whole model, then one optimizer step): the
weights after a few steps agree within float tolerance for each supported optimizer, and with
--max_grad_norm the reference clips each parameter's gradient on its own (sd-scripts' rule).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import UserError
from sdtune.testing import build_tiny_model
from sdtune.train import fused, optim
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.slow  # U-Net steps with three optimizers and a training run: ~40 s


def _inputs(unet, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([10, 500]), cond


def _loss(unet, seed: int):
    sample, t, cond = _inputs(unet, seed)
    return unet(sample, t, cond).sample.float().pow(2).mean()


def _train(unet, name: str, *, fuse: bool, max_grad_norm: float, steps: int = 2, args=()):
    groups = optim.build_param_groups(unet, learning_rate=1e-3)
    opt = optim.build_optimizer(name, groups, 1e-3, args)
    params = [p for p in unet.parameters() if p.requires_grad]
    live = []
    if fuse:
        hooked = fused.attach(opt, max_grad_norm)

        def count(_p):  # registered after the step hooks: sees the gradients still alive after each step
            live.append(sum(q.grad is not None for q in params))
        for p in params:
            p.register_post_accumulate_grad_hook(count)
    for step in range(steps):
        _loss(unet, step).backward()
        if not fuse:
            if max_grad_norm > 0:  # sd-scripts' fused rule, computed here per tensor by hand
                for p in params:
                    norm = p.grad.norm()
                    p.grad.mul_(torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
    if fuse:
        hooked.remove()
    return live, len(params)


@pytest.fixture(scope="module")
def built_unet():
    """The tiny U-Net, built once for the module: each test trains copies of it."""
    return build_tiny_model("sd1", seed=0).unet


@pytest.mark.parametrize("name,args,max_grad_norm", [
    ("AdamW", (), 0.0), ("AdamW8bit", (), 1e-3), ("Adafactor", (), 1e-3),
    ("Adafactor", ("relative_step=False", "scale_parameter=False"), 0.0)])
def test_same_weights_as_the_unfused_step_and_gradients_never_all_alive(built_unet, name, args, max_grad_norm):
    if name == "AdamW8bit":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    reference = copy.deepcopy(built_unet).train()
    fused_unet = copy.deepcopy(reference)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    _train(reference, name, fuse=False, max_grad_norm=max_grad_norm, args=args)
    live, total = _train(fused_unet, name, fuse=True, max_grad_norm=max_grad_norm, args=args)
    moved = 0.0
    for key, value in fused_unet.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-5, atol=1e-6)
        moved += (value - start[key]).abs().sum().item()
    assert moved > 0
    # every hook saw at most its own gradient alive: the others were stepped and freed already
    assert len(live) == 2 * total and max(live) == 0


def test_refused_where_it_cannot_act():
    with pytest.raises(UserError, match="Lion does not support"):
        fused.check_options("Lion", 1, "no")
    with pytest.raises(UserError, match="cannot be accumulated"):
        fused.check_options("AdamW", 2, "no")
    with pytest.raises(UserError, match="float16"):
        fused.check_options("adamw8bit", 1, "fp16")
    with pytest.raises(UserError, match="average their gradients"):
        fused.attach(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), 1.0, num_processes=2)


def test_train_option_is_validated():
    common = {"pretrained_model_name_or_path": "m", "output_dir": "o", "train_data_dir": "d", "in_json": "j.json",
              "fused_backward_pass": True}
    with pytest.raises(UserError, match="--fused_backward_pass"):
        TrainOptions(**common, gradient_accumulation_steps=2)
    with pytest.raises(UserError, match="--fused_backward_pass"):
        TrainOptions(**common, use_lion_optimizer=True)
    assert TrainOptions(**common, use_8bit_adam=True).fused_backward_pass


def test_training_run_with_the_flag_matches_the_unfused_run(tmp_path, training_workspace):
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    training_workspace(tmp_path, n=4, safetensors=True)

    def run(out: Path, *extra: str):
        args = ["train", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--in_json",
                str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out),
                "--output_name", "N", "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3",
                "--seed", "1", "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--max_grad_norm", "0",
                *extra]
        result = train(options_from_args(build_parser("train").parse_args(args)))
        return result, load_file(str(out / "N.safetensors"))

    plain, plain_weights = run(tmp_path / "plain")
    fused_result, fused_weights = run(tmp_path / "fused", "--fused_backward_pass")
    assert fused_result.losses == pytest.approx(plain.losses, rel=1e-5)
    base = load_file(str(tmp_path / "model.safetensors"))
    unet_keys = [k for k in plain_weights if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(fused_weights[k], base[k]) for k in unet_keys)
    for key in unet_keys:
        torch.testing.assert_close(fused_weights[key], plain_weights[key], rtol=1e-5, atol=1e-6)
