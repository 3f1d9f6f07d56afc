"""The memory planner: the U-Net on paper has diffusers' parameters, its predictions are within 10 %
of what bench/memory.py counted on the real-size U-Nets, and --dry_run --vram says what fits."""

import pytest

from sdtune.errors import UserError
from sdtune.train.memory_plan import (GIB, RunShape, load_unet_config, parameter_count, plan_unet_step,
                                      predict_run, unet_modules)

# Peak live tensor bytes of one training step (GiB) counted by `python bench/memory.py` (FakeTensorMode,
# random weights, batch 1, CUDA autocast rules) on the real-size U-Nets: docs/benchmarks.md.
MEASURED = {
    # (family, resolution, set): GiB
    ("sd1", 512, "fp32_adamw"): 16.01,
    ("sd1", 512, "bf16_ckpt_adamw"): 16.01,
    ("sd1", 512, "bf16_ckpt_adamw8bit"): 8.14,
    ("sd1", 512, "bf16_ckpt_adafactor"): 8.402,
    ("sd1", 768, "fp32_adamw"): 16.01,
    ("sd1", 768, "bf16_ckpt_adamw"): 16.01,
    ("sd1", 768, "bf16_ckpt_adamw8bit"): 8.317,
    ("sd1", 768, "bf16_ckpt_adafactor"): 8.402,
    ("sd2", 512, "fp32_adamw"): 16.129,
    ("sd2", 512, "bf16_ckpt_adamw"): 16.129,
    ("sd2", 512, "bf16_ckpt_adamw8bit"): 8.198,
    ("sd2", 512, "bf16_ckpt_adafactor"): 8.265,
    ("sd2", 768, "fp32_adamw"): 16.129,
    ("sd2", 768, "bf16_ckpt_adamw"): 16.129,
    ("sd2", 768, "bf16_ckpt_adamw8bit"): 8.376,
    ("sd2", 768, "bf16_ckpt_adafactor"): 8.265,
    # --full_bf16, counted after the optimizer counted before it was freed
    ("sd1", 512, "full_bf16_ckpt_adamw"): 6.526,
    ("sd1", 768, "full_bf16_ckpt_adamw"): 6.703,
    ("sd2", 512, "full_bf16_ckpt_adamw"): 6.573,
    ("sd2", 768, "full_bf16_ckpt_adamw"): 6.750,
    ("sd1", 512, "full_bf16_ckpt_adamw8bit"): 4.951,
    ("sd1", 768, "full_bf16_ckpt_adamw8bit"): 5.129,
    ("sd2", 512, "full_bf16_ckpt_adamw8bit"): 4.986,
    ("sd2", 768, "full_bf16_ckpt_adamw8bit"): 5.164,
    ("sd1", 512, "full_bf16_ckpt_adafactor"): 5.028,
    ("sd1", 768, "full_bf16_ckpt_adafactor"): 5.205,
    ("sd2", 512, "full_bf16_ckpt_adafactor"): 4.866,
    ("sd2", 768, "full_bf16_ckpt_adafactor"): 5.044,
    ("sd1", 512, "full_bf16_adamw"): 6.702,
    ("sd1", 768, "full_bf16_adamw"): 7.438,
    ("sd2", 512, "full_bf16_adamw"): 6.748,
    ("sd2", 768, "full_bf16_adamw"): 7.474,
}
SETS = {
    "fp32_adamw": {},
    "bf16_ckpt_adamw": {"mixed_precision": "bf16", "gradient_checkpointing": True},
    "bf16_ckpt_adamw8bit": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "AdamW8bit"},
    "bf16_ckpt_adafactor": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "Adafactor"},
    "full_bf16_adamw": {"mixed_precision": "bf16", "full_bf16": True},
    "full_bf16_ckpt_adamw": {"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True},
    "full_bf16_ckpt_adamw8bit": {"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True,
                                 "optimizer": "AdamW8bit"},
    "full_bf16_ckpt_adafactor": {"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True,
                                 "optimizer": "Adafactor"},
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_parameters_on_paper_are_diffusers_parameters(family):
    import torch
    from diffusers import UNet2DConditionModel

    config = load_unet_config(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = sorted(tuple(p.shape) for p in unet.parameters())
    on_paper = sorted(s for m in unet_modules(config, 512, 512) for s in m.params)
    assert on_paper == shapes
    assert parameter_count(on_paper) == {"sd1": 859_520_964, "sd2": 865_910_724}[family]


@pytest.mark.parametrize("key", sorted(MEASURED))
def test_prediction_within_ten_percent_of_the_bench(key):
    family, resolution, name = key
    predicted = plan_unet_step(RunShape(family=family, resolution=resolution, **SETS[name]))["peak"] / GIB
    assert predicted == pytest.approx(MEASURED[key], rel=0.10)


def test_memory_options_save_what_they_should():
    """Hand-derived parts of SD 1.5 (859.5 M parameters): fp32 AdamW keeps 4 + 4 + 8 bytes per weight;
    --full_bf16 halves all three; 8-bit AdamW keeps 2 bytes of state per weight."""
    n = 859_520_964
    fp32 = plan_unet_step(RunShape())
    assert (fp32["weights"], fp32["gradients"], fp32["state"]) == (4 * n, 4 * n, 8 * n)
    half = plan_unet_step(RunShape(mixed_precision="bf16", full_bf16=True))
    assert (half["weights"], half["gradients"], half["state"]) == (2 * n, 2 * n, 4 * n)
    eight = plan_unet_step(RunShape(optimizer="AdamW8bit"))
    assert eight["state"] == pytest.approx(2 * n, rel=0.02)
    # float32 activations grow with the area and the batch (with flash/memory-efficient attention);
    # checkpointing keeps only the blocks' inputs
    a512 = plan_unet_step(RunShape())["activations"]
    a768 = plan_unet_step(RunShape(resolution=768))["activations"]
    assert a768 == pytest.approx(a512 * 768 ** 2 / 512 ** 2, rel=0.01)
    assert plan_unet_step(RunShape(batch_size=2))["activations"] == pytest.approx(2 * a512, rel=0.01)
    assert plan_unet_step(RunShape(gradient_checkpointing=True))["activations"] < a512 / 4
    # bf16 autocast keeps a bf16 copy of every float32 matrix and convolution weight until the backward pass
    casts = plan_unet_step(RunShape(mixed_precision="bf16"))["activations"] - a512 * 0.5
    assert casts == pytest.approx(2 * n, rel=0.25)


def _counted_chunk_step(name: str, shapes: list[tuple[int, ...]], chunk_elements: int) -> tuple[int, int, int]:
    """(bytes before the step: weights, gradients, state; peak of the step; elements) of a --full_bf16
    step over bf16 parameters of `shapes`, counted tensor by tensor on real tensors."""
    import gc

    import torch

    from sdtune.train import optim
    from sdtune.train.memory_count import LiveBytes

    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    counter = LiveBytes()
    counter.track(params)
    with counter:
        args = ["foreach=True"] if name == "AdamW" else []  # the multi-tensor path a GPU takes
        opt = optim.build_optimizer(name, [{"params": params, "lr": 1e-5}], 1e-5, args, note=None)
        optim.add_bf16_stochastic_rounding(opt, torch.Generator().manual_seed(0), chunk_elements=chunk_elements)
        for _ in range(2):  # the first step creates the state
            for p in params:
                p.grad = torch.zeros_like(p)
            counter.reset_peak()
            before = counter.live
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt
        gc.collect()
    return before, counter.peak, sum(p.numel() for p in params)


@pytest.mark.parametrize("name,shape", [("AdamW", (512, 512)), ("AdamW8bit", (512, 512)), ("Adafactor", (512, 512)),
                                        ("Adafactor", (1 << 18,)), ("Adafactor", (64, 64, 3, 3)),
                                        ("Adafactor", (64, 64, 1, 1))])
def test_bf16_chunk_bytes_are_counted(name, shape):
    """The planner's float32 transient of a chunk --full_bf16 steps is what a count of that step on
    one real parameter finds."""
    from sdtune.train.memory_plan import _chunk_bytes

    before, peak, _n = _counted_chunk_step(name, [shape], chunk_elements=1 << 22)
    assert _chunk_bytes(name.lower(), shape) == pytest.approx(peak - before, rel=0.01)


SMALL = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 16,
         "attention_head_dim": 8, "sample_size": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "in_channels": 4, "out_channels": 4}


@pytest.mark.parametrize("name", [pytest.param("AdamW", marks=pytest.mark.slow),
                                  pytest.param("AdamW8bit", marks=pytest.mark.slow), "Adafactor"])
def test_full_bf16_step_as_counted_on_a_small_unet(name):  # each ~10 s on a quiet machine
    """The chunked step of a small real U-Net's parameters (in diffusers' order, small chunks, so that
    each chunk's gradients are freed before the largest weight is stepped), counted tensor by tensor,
    against the planner's step for the same config."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SMALL)
    shapes = [tuple(p.shape) for p in unet.parameters()]
    before, peak, n = _counted_chunk_step(name, shapes, chunk_elements=1 << 12)
    shape = RunShape(mixed_precision="bf16", full_bf16=True, optimizer=name)
    planned = plan_unet_step(shape, dict(unet.config), bf16_chunk=1 << 12)
    assert planned["weights"] + planned["gradients"] + planned["state"] == pytest.approx(before, rel=0.02)
    assert planned["step"] == pytest.approx(peak, rel=0.03)
    # far below the whole model upcast at once (8 more bytes per weight); above weights and state
    assert planned["weights"] + planned["state"] < peak < before + 8 * n


def test_full_bf16_sd15_by_hand():
    """SD 1.5 (n = 859.5 M weights) under --full_bf16 with AdamW: 2 + 2 + 4 bytes per weight before the
    step; the step adds at most 16 bytes per element of its largest chunk (a 2560 -> 1280 3x3
    convolution: 29.5 M) and the whole-model float32 copy it avoids would add 8 per weight."""
    n, largest = 859_520_964, 2560 * 1280 * 9
    run = plan_unet_step(RunShape(mixed_precision="bf16", full_bf16=True))
    assert (run["weights"], run["gradients"], run["state"]) == (2 * n, 2 * n, 4 * n)
    assert 8 * n <= run["step"] <= 8 * n + 16 * largest
    assert run["step"] < 8 * n + 8 * n / 10


def test_frozen_parts_in_the_compute_dtype():
    fp32 = predict_run(RunShape(mixed_precision="bf16", frozen_in_compute_dtype=False))
    bf16 = predict_run(RunShape(mixed_precision="bf16"))
    assert fp32.extras["VAE (frozen)"] == 2 * bf16.extras["VAE (frozen)"] == 4 * 83_653_863
    # --no_half_vae: the VAE in float32, the text encoder still in the compute dtype
    no_half = predict_run(RunShape(mixed_precision="bf16", vae_float32=True))
    assert no_half.extras["VAE (frozen)"] == 4 * 83_653_863
    assert no_half.extras["text encoder (frozen)"] == bf16.extras["text encoder (frozen)"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_frozen_parts_have_the_families_parameter_counts(family):
    """One copy of the frozen VAE and text encoder, 2 bytes per weight under mixed precision: their
    parameters counted on the family's shipped configs."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.families import get_family

    assets = get_family(family).asset_dir
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(assets / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(assets / "text_encoder")))
    run = predict_run(RunShape(family=family, mixed_precision="bf16"))
    assert run.extras["VAE (frozen)"] == 2 * sum(p.numel() for p in vae.parameters())
    assert run.extras["text encoder (frozen)"] == 2 * sum(p.numel() for p in text.parameters())
    assert "VAE (frozen)" not in predict_run(RunShape(vae_on_device=False)).extras


def _dry_run(tmp_path, capsys, *extra):
    from sdtune.cli import main
    from sdtune.testing import make_dataset, write_tiny_model

    model = write_tiny_model(tmp_path / "sd1.safetensors", "sd1")  # an SD1 header: the family's real config
    make_dataset(tmp_path / "data", n=2, metadata=tmp_path / "meta.json")
    assert main(["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path / "data"),
                 "--in_json", str(tmp_path / "meta.json"), "--resolution", "512", "--dry_run", *extra]) == 0
    return capsys.readouterr().out


def test_dry_run_vram_8_names_the_cheapest_change_that_fits(tmp_path, capsys):
    out = _dry_run(tmp_path, capsys, "--vram", "8", "--mixed_precision", "bf16")
    assert "largest batch 1 x 512x512, bf16 mixed precision, AdamW" in out
    line = next(x for x in out.splitlines() if "does not fit in 8 GiB" in x)
    assert "--full_bf16" in line  # bf16 AdamW on fp32 weights needs 16 GiB; no single smaller change does it
    out = _dry_run(tmp_path, capsys, "--vram", "24", "--mixed_precision", "bf16", "--gradient_checkpointing")
    assert "fits in 24 GiB" in out


def test_vram_without_dry_run_is_refused():
    from sdtune.train.options import TrainOptions

    with pytest.raises(UserError, match="--vram.*--dry_run"):
        TrainOptions(pretrained_model_name_or_path="m.safetensors", output_dir="o", vram=8)
