"""Training throughput of a real-size SD 1.5 U-Net (random weights) on one GPU: samples/s and MFU.

    python bench/gpu_throughput.py                              # 512 px, batch 1, 8, 16, bf16, eager and compiled
    python bench/gpu_throughput.py --batches 8 --compile no
    python bench/gpu_throughput.py --cpu-smoke                  # the tiny U-Net on the CPU: proves the script runs

One JSON line per (batch, compile), and one for batch 1 with AdamW on torch's fused kernel: step
time, samples/s, achieved TFLOP/s and model-FLOPs utilisation (2.41 TFLOP per 512x512 sample for the
forward and backward pass, against the chip's dense bf16 peak), the warm-up time (compilation
included) and the peak memory. The step is bench/gpu_step.py's: `--mixed_precision bf16`, AdamW,
SDPA attention, no checkpointing.
Compiled runs use sdtune's `--torch_compile` (the U-Net compiled in place); each batch size is a new
shape, so the compiled runs also show what a recompilation costs.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gpu_step import GIB, SD15_TRAIN_FLOP_512, Step, device_info, peak_flops
from sdtune.train.memory_count import StepOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny U-Net on the CPU, 64 px, few steps")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    device = torch.device("cpu" if smoke else "cuda")
    resolution, warmup, steps = (64, 1, 2) if smoke else (args.resolution, args.warmup, args.steps)
    batches = [1, 2] if smoke else [int(b) for b in args.batches.split(",")]
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    print(json.dumps({"bench": "gpu_throughput", **device_info(device)}), flush=True)
    peak = peak_flops(device)
    for compiled in compiles:
        for batch in batches[:1] if smoke and compiled else batches:  # compiling on a CPU takes minutes
            opts = StepOptions("bf16_adamw", mixed_precision="bf16", batch_size=batch, resolution=resolution)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = Step(opts, device, tiny=smoke, compile=compiled,
                        compile_backend="aot_eager" if smoke else "inductor")
            row = {"batch": batch, "resolution": resolution, "compile": compiled, **step.timed(warmup, steps)}
            flop = SD15_TRAIN_FLOP_512 * (resolution / 512) ** 2 * row["samples_per_s"]
            row["tflops"] = None if smoke else round(flop / 1e12, 1)
            row["mfu"] = round(flop / peak, 3) if peak and not smoke else None
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
            print(json.dumps(row), flush=True)
            del step
    # AdamW's step on torch's fused kernel against its default (multi-tensor on a GPU): sdtune takes
    # the fused kernel on the CPU only; this row says whether a GPU run should too (batch 1, eager,
    # where the optimizer's share of the step is largest)
    opts = StepOptions("bf16_adamw", mixed_precision="bf16", batch_size=1, resolution=resolution,
                       optimizer_args=("fused=True",))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = Step(opts, device, tiny=smoke)
    row = {"batch": 1, "resolution": resolution, "compile": False, "optimizer_args": list(opts.optimizer_args),
           **step.timed(warmup, steps)}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
