"""Peak tensor memory of a real-size SD 1.5 / SD 2.1 U-Net training step, beside the planner's prediction.

The U-Net is built from the shipped Diffusers config with random weights under torch's
FakeTensorMode: tensors have shapes and dtypes but no data, so a real-size step is counted in
seconds of CPU time and no memory. `sdtune.train.memory_count.LiveBytes` counts every storage from
allocation to release; the peak is the most tensor memory alive at once during the second step (the
optimizer state exists then), with CUDA's autocast rules and AdamW's GPU (foreach) path.
tests/test_memory_count.py checks on a small U-Net that the fake count agrees with the count of the
same step on real tensors (within 0.5 % per phase).

    python bench/memory.py                                   # SD1 and SD2, 512 and 768 px, every option set
    python bench/memory.py --family sd1 --resolution 512 --sets fp32_adamw,full_bf16

Prints one JSON line per measurement: measured peak, predicted peak (sdtune.train.memory_plan) and
their ratio, all in GiB; a last line {"summary": ...} with the worst ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sdtune.train.memory_count import StepOptions

SETS = {
    "fp32_adamw": StepOptions("fp32_adamw"),
    "bf16_adamw": StepOptions("bf16_adamw", mixed_precision="bf16"),
    "bf16_ckpt_adamw": StepOptions("bf16_ckpt_adamw", mixed_precision="bf16", gradient_checkpointing=True),
    "full_bf16_adamw": StepOptions("full_bf16_adamw", mixed_precision="bf16", full_bf16=True),
    "full_bf16_ckpt_adamw": StepOptions("full_bf16_ckpt_adamw", mixed_precision="bf16", full_bf16=True,
                                        gradient_checkpointing=True),
    "bf16_ckpt_adamw8bit": StepOptions("bf16_ckpt_adamw8bit", mixed_precision="bf16", gradient_checkpointing=True,
                                       optimizer="AdamW8bit"),
    "full_bf16_ckpt_adamw8bit": StepOptions("full_bf16_ckpt_adamw8bit", mixed_precision="bf16", full_bf16=True,
                                            gradient_checkpointing=True, optimizer="AdamW8bit"),
    "bf16_ckpt_adafactor": StepOptions("bf16_ckpt_adafactor", mixed_precision="bf16", gradient_checkpointing=True,
                                       optimizer="Adafactor"),
    "full_bf16_ckpt_adafactor": StepOptions("full_bf16_ckpt_adafactor", mixed_precision="bf16", full_bf16=True,
                                            gradient_checkpointing=True, optimizer="Adafactor"),
}
GIB = 1024 ** 3


def measure(family: str, opts: StepOptions, optimizers: list[str]) -> dict[str, dict[str, int]]:
    """{optimizer: counted bytes} for one forward/backward configuration."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sdtune.families import get_family
    from sdtune.train.memory_count import count_training_step

    config = UNet2DConditionModel.load_config(str(get_family(family).asset_dir / "unet"))
    torch.manual_seed(0)
    with FakeTensorMode():
        unet = UNet2DConditionModel.from_config(config)
        unet.set_attn_processor(AttnProcessor2_0())  # torch SDPA, as sdtune trains
        return count_training_step(unet, opts, optimizers, context_dim=config["cross_attention_dim"])


def predict(family: str, opts: StepOptions) -> dict:
    from sdtune.train.memory_plan import RunShape, plan_unet_step

    shape = RunShape(family=family, resolution=opts.resolution, batch_size=opts.batch_size,
                     mixed_precision=opts.mixed_precision, full_bf16=opts.full_bf16,
                     gradient_checkpointing=opts.gradient_checkpointing, optimizer=opts.optimizer)
    return plan_unet_step(shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1,sd2", help="comma-separated: sd1, sd2")
    parser.add_argument("--resolution", default="512,768", help="comma-separated pixel sides")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated of {', '.join(SETS)}")
    parser.add_argument("--measure_only", action="store_true", help="no prediction (the raw counts, in bytes)")
    args = parser.parse_args(argv)
    worst = 1.0
    chosen = [SETS[name] for name in args.sets.split(",")]
    passes: dict[tuple, list[StepOptions]] = {}  # the optimizer does not change the forward and backward passes
    for opts in chosen:
        passes.setdefault((opts.mixed_precision, opts.full_bf16, opts.gradient_checkpointing), []).append(opts)
    for family in args.family.split(","):
        for resolution in (int(r) for r in args.resolution.split(",")):
            for sets in passes.values():
                start = time.perf_counter()
                first = StepOptions(**{**sets[0].__dict__, "resolution": resolution, "batch_size": args.batch_size})
                counted = measure(family, first, [o.optimizer for o in sets])
                seconds = time.perf_counter() - start
                for base in sets:
                    opts = StepOptions(**{**base.__dict__, "resolution": resolution, "batch_size": args.batch_size})
                    measured = counted[opts.optimizer]
                    if args.measure_only:
                        print(json.dumps({"family": family, "resolution": resolution, "set": opts.name, **measured}))
                        continue
                    predicted = predict(family, opts)
                    ratio = predicted["peak"] / measured["peak"]
                    worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
                    print(json.dumps({"family": family, "resolution": resolution, "batch_size": args.batch_size,
                                      "set": opts.name, "ratio": round(ratio, 3),
                                      "measured": {k: round(v / GIB, 3) for k, v in measured.items()},
                                      "predicted": {k: round(v / GIB, 3) for k, v in predicted.items()},
                                      "seconds": round(seconds, 1)}), flush=True)
    print(json.dumps({"summary": {"worst_ratio": round(worst, 3), "within_10_percent": abs(worst - 1) <= 0.10}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
