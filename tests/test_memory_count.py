"""The live-tensor counter behind bench/memory.py: hand-derived counts, and a fake (data-less)
count of a U-Net training step equal to the count of the same step on real tensors."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch._subclasses.fake_tensor import FakeTensorMode

from sdtune.train.memory_count import LiveBytes, StepOptions, count_training_step, tensors_of

# the smallest U-Net with every kind of block the SD ones have (resnets with and without a
# shortcut, cross-attention transformers, down- and upsamplers, skip connections)
MICRO = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 8,
         "attention_head_dim": 2, "sample_size": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "in_channels": 4, "out_channels": 4}


def micro_unet() -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**MICRO)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def test_counts_storages_once_until_freed():
    counter = LiveBytes()
    with counter:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:]  # shares a's storage
        b = a * 2  # 4000 more
        assert counter.live == 8000
        del a
        assert counter.live == 8000  # the view keeps the storage alive
        del view
        assert counter.live == 4000
        c = b.to(torch.bfloat16)  # 2000
        del b, c
    assert counter.live == 0
    assert counter.peak == 8000


def test_a_tracked_parameter_swapped_by_data_assignment_is_released():
    p = torch.nn.Parameter(torch.zeros(100))  # 400 bytes, counted as existing
    counter = LiveBytes()
    counter.track([p])
    with counter:
        p.data = p.data.to(torch.float64)  # 800 new; the float32 storage is freed
    assert (counter.live, counter.peak) == (800, 1200)


def _count(fake: bool, opts: StepOptions, optimizers: list[str]) -> dict:
    torch.manual_seed(0)
    if not fake:
        return count_training_step(micro_unet(), opts, optimizers, context_dim=8, context_len=7,
                                   chunking={"chunk_elements": 1024})
    with FakeTensorMode():
        return count_training_step(micro_unet(), opts, optimizers, context_dim=8, context_len=7,
                                   chunking={"chunk_elements": 1024})


# each optimizer once, each precision once: every further (optimizer, precision) pair costs ~10 s of
# fake-tensor dispatch and checks the same counting code again
@pytest.mark.slow  # three small U-Net steps, real and fake: ~30 s
@pytest.mark.parametrize("opts,optimizers", [
    (StepOptions("fp32", resolution=64), ["Adafactor"]),
    (StepOptions("bf16_ckpt", mixed_precision="bf16", gradient_checkpointing=True, resolution=64), ["AdamW8bit"]),
    (StepOptions("full_bf16", mixed_precision="bf16", full_bf16=True, resolution=64), ["AdamW"]),
])
def test_fake_count_equals_real_count(opts, optimizers):
    real = _count(False, opts, optimizers)
    fake = _count(True, opts, optimizers)
    for name in optimizers:
        for phase, counted in real[name].items():
            # the same tensors; a real kernel may lay out a gradient differently and copy it once
            # more (seen: 1 KB in 1 MB in the backward pass)
            assert fake[name][phase] == pytest.approx(counted, rel=5e-3), (name, phase)
    for counts in real.values():
        assert counts["forward"] > counts["weights"] + counts["state"]  # activations were counted
        assert counts["peak"] == max(counts["forward"], counts["backward"], counts["step"])


def test_tensors_of_lists_gradients_and_optimizer_state():
    unet = micro_unet()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    found = tensors_of(unet, opt)
    n = sum(p.numel() for p in params)
    weight_bytes = sum(t.untyped_storage().nbytes() for t in found if t.numel() > 1) - n * 4 * 4
    assert weight_bytes == 0  # weights, gradients, two moments (the step counters are scalars)
