"""Peak GPU memory of a real-size U-Net training step per memory option set, beside the planner.

    python bench/gpu_memory.py                                  # SD 1.5 at 512, batch 1, every set of bench/memory.py
    python bench/gpu_memory.py --family sd2 --resolution 768 --sets fp32_adamw,full_bf16_ckpt_adamw8bit
    python bench/gpu_memory.py --cpu-smoke                      # the tiny U-Net on the CPU (no peak to read)

The measured peak is `torch.cuda.max_memory_allocated` over the second step (the optimizer state
exists then) of bench/gpu_step.py's step, the same quantity bench/memory.py counts on the CPU; the
prediction is `sdtune.train.memory_plan.plan_unet_step`, what `--dry_run` prints. One JSON line per
set, with their ratio; a last line with the worst ratio. A set whose optimizer cannot be built here
(8-bit ones without bitsandbytes) gives a line with its error instead.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gpu_step import GIB, Step, device_info
from memory import SETS, predict
from sdtune.train.memory_count import StepOptions


def measure(family: str, opts: StepOptions, device: torch.device, tiny: bool) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = Step(opts, device, family=family, tiny=tiny)
    step.run(1)  # the first step creates the optimizer state
    step.sync()
    if device.type != "cuda":
        return {"loss_finite": bool(torch.isfinite(torch.tensor(step.run(1))))}
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = step.run(1)
    step.sync()
    return {"between_steps_gib": round(weights / GIB, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "loss_finite": bool(torch.isfinite(torch.tensor(loss)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    device = torch.device("cpu" if smoke else "cuda")
    resolution = 64 if smoke else args.resolution
    print(json.dumps({"bench": "gpu_memory", **device_info(device)}), flush=True)
    worst = 1.0
    for name in args.sets.split(","):
        opts = StepOptions(**{**SETS[name].__dict__, "resolution": resolution, "batch_size": args.batch_size})
        row = {"family": args.family, "resolution": resolution, "batch_size": args.batch_size, "set": name}
        try:
            row.update(measure(args.family, opts, device, smoke))
        except Exception as exc:  # noqa: BLE001 - one set's failure (e.g. no bitsandbytes) must not end the suite
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if "peak_gib" in row:
            predicted = predict(args.family, opts)["peak"] / GIB
            row["predicted_gib"] = round(predicted, 3)
            row["ratio"] = round(predicted / row["peak_gib"], 3)
            worst = row["ratio"] if abs(row["ratio"] - 1) > abs(worst - 1) else worst
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": {"worst_ratio": round(worst, 3), "within_10_percent": abs(worst - 1) <= 0.10}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
