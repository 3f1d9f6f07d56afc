"""Checks that need a CUDA GPU (CI has none): run on a GPU machine, prints one JSON line per check.

    python bench/gpu_checks.py
"""

from __future__ import annotations

import json

import torch


def check_noise_same_on_cpu_and_gpu() -> dict:
    """The objective draws on the CPU from the seeded generator, then moves: CPU and GPU runs agree."""
    from sdtune.train.noise import DiffusionObjective, LossConfig, NoiseConfig
    from sdtune.families import SD2_V
    import json as _json

    sched = _json.loads((SD2_V.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    cfg = NoiseConfig(noise_offset=0.1, adaptive_noise_scale=0.05, multires_noise_iterations=3, ip_noise_gamma=0.1)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(20))
    outs = []
    for device in ("cpu", "cuda"):
        obj = DiffusionObjective(sched, cfg, LossConfig(prediction_type="v_prediction"))
        noise, t, noisy = obj.noise_batch(latents.to(device), torch.Generator().manual_seed(21))
        assert noise.device.type == t.device.type == noisy.device.type == device
        outs.append([x.cpu() for x in (noise, t, noisy)])
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*outs))
    return {"check": "noise_cpu_vs_gpu", "max_abs_diff": diff, "ok": diff < 1e-4}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    for check in (check_noise_same_on_cpu_and_gpu,):
        print(json.dumps(check()), flush=True)


if __name__ == "__main__":
    main()
