"""AdamW's step on the peer bench's tiny SD1-shaped U-Net: torch's per-tensor loop against the path sdtune takes.

    PYTHONPATH=src .venv/bin/python bench/optimizer_step.py [--repeats 30] [--threads N]

The U-Net has the peer bench fixture's shape (widths 32/64/128/128, SD1's block layout: 686 weight
tensors, 8.5 M weights). Both optimizers step the same weights and gradients, alternately, in one
process; prints one JSON line with the median and best milliseconds of each and their ratio, and
checks that both produced the same weights (sdtune's path must change no number).
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

    from sdtune.train.cpu_speed import prefer_foreach_on_cpu

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = dict(sample_size=8, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=8,
                  layers_per_block=2)
    weights = [UNet2DConditionModel(**config), UNet2DConditionModel(**config)]
    weights[1].load_state_dict(weights[0].state_dict())
    params = [list(m.parameters()) for m in weights]
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(*params):
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        q.grad = p.grad.clone()
    loop = torch.optim.AdamW(params[0], lr=1e-4)
    fast = torch.optim.AdamW(params[1], lr=1e-4)
    assert prefer_foreach_on_cpu(fast)
    times: dict[str, list[float]] = {"per_tensor_loop": [], "sdtune": []}
    for _ in range(a.repeats):
        for name, opt in (("per_tensor_loop", loop), ("sdtune", fast)):
            started = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - started) * 1000)
    same = all(torch.equal(p, q) for p, q in zip(*params))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step creates the state
    print(json.dumps({"bench": "optimizer_step", "tensors": len(params[0]),
                      "weights": sum(p.numel() for p in params[0]), "threads": torch.get_num_threads(),
                      **{f"{k}_median_ms": round(v, 1) for k, v in med.items()},
                      **{f"{k}_best_ms": round(min(v[1:]), 1) for k, v in times.items()},
                      "ratio_median": round(med["sdtune"] / med["per_tensor_loop"], 3), "identical": same,
                      "repeats": a.repeats, "loadavg_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
