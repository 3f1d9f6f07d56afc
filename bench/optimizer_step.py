"""AdamW's step on the peer bench's tiny SD1-shaped U-Net: torch's per-tensor loop against the paths sdtune takes.

    PYTHONPATH=src .venv/bin/python bench/optimizer_step.py [--repeats 30] [--threads N]

The U-Net has the peer bench fixture's shape (widths 32/64/128/128, SD1's block layout: 686 weight
tensors, 8.5 M weights). Three optimizers step the same weights and gradients, in turn, in one
process: torch's per-tensor loop (sd-scripts' step on the CPU), sdtune's default (torch's fused kernel)
and sdtune with `--optimizer_args fused=False` (the multi-tensor path). Prints one JSON line with the
median and best milliseconds of each, their ratios to the loop, whether the multi-tensor path gave the
loop's weights to the bit, and how far the fused kernel's weights are from them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    a = ap.parse_args()
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.train.cpu_speed import fast_cpu_step

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = dict(sample_size=8, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=8,
                  layers_per_block=2)
    names = ("per_tensor_loop", "sdtune_fused", "sdtune_foreach")
    models = [UNet2DConditionModel(**config) for _ in names]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    params = {name: list(m.parameters()) for name, m in zip(names, models)}
    gen = torch.Generator().manual_seed(1)
    for ps in zip(*params.values()):
        grad = torch.randn(ps[0].shape, generator=gen) * 1e-3
        for p in ps:
            p.grad = grad.clone()
    optimizers = {"per_tensor_loop": torch.optim.AdamW(params["per_tensor_loop"], lr=1e-4, foreach=False),
                  "sdtune_fused": torch.optim.AdamW(params["sdtune_fused"], lr=1e-4),
                  "sdtune_foreach": torch.optim.AdamW(params["sdtune_foreach"], lr=1e-4, fused=False)}
    assert fast_cpu_step(optimizers["sdtune_fused"]) == "fused"
    assert fast_cpu_step(optimizers["sdtune_foreach"]) == "foreach"
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(a.repeats):
        for name, opt in optimizers.items():
            started = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - started) * 1000)
    loop = params["per_tensor_loop"]
    same = all(torch.equal(p, q) for p, q in zip(loop, params["sdtune_foreach"]))
    # how far the fused kernel's weights are from the loop's, relative to each weight tensor's size
    apart = max(((p - q).abs().max() / p.abs().max().clamp_min(1e-30)).item()
                for p, q in zip(loop, params["sdtune_fused"]))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step creates the state
    print(json.dumps({"bench": "optimizer_step", "tensors": len(loop), "weights": sum(p.numel() for p in loop),
                      "threads": torch.get_num_threads(),
                      **{f"{k}_median_ms": round(v, 1) for k, v in med.items()},
                      **{f"{k}_best_ms": round(min(v[1:]), 1) for k, v in times.items()},
                      "fused_ratio_median": round(med["sdtune_fused"] / med["per_tensor_loop"], 3),
                      "foreach_ratio_median": round(med["sdtune_foreach"] / med["per_tensor_loop"], 3),
                      "foreach_identical": same, "fused_max_relative_difference": apart,
                      "repeats": a.repeats, "loadavg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
