"""Latent-cache throughput: images/s for a cold cache (encode everything) and a warm one (reuse).

    python bench/cache_throughput.py [--n 64] [--size 256] [--vae tiny|sd] [--device cpu] [--workers 2]

`--vae sd` uses SD's real VAE architecture (random weights); `tiny` the test VAE. Prints JSON lines.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--vae", choices=["tiny", "sd"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vae_batch_size", type=int, default=8)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from sdtune.data import DatasetOptions, build_plan, ensure_latent_cache
    from sdtune.families import get_family
    from sdtune.testing import build_tiny_model

    if args.vae == "sd":
        from diffusers import AutoencoderKL

        cfg = json.loads((get_family("sd1").asset_dir / "vae" / "config.json").read_text())
        vae = AutoencoderKL.from_config(cfg)
    else:
        vae = build_tiny_model("sd1").vae
    root = Path(tempfile.mkdtemp(prefix="sdtune-bench-cache-"))
    try:
        rng = np.random.default_rng(0)
        meta = {}
        (root / "img").mkdir()
        for i in range(args.n):
            w = args.size * (3 if i % 3 == 0 else 4) // 4
            h = args.size * (4 if i % 2 == 0 else 3) // 4
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i:04d}.jpg", quality=90)
            meta[f"{i:04d}.jpg"] = {"caption": "x"}
        (root / "m.json").write_text(json.dumps(meta))
        opts = DatasetOptions(in_json=str(root / "m.json"), train_data_dir=str(root / "img"), resolution=str(args.size),
                              enable_bucket=True, min_bucket_reso=args.size // 2, max_bucket_reso=args.size * 2,
                              cache_latents_to_disk=True, vae_batch_size=args.vae_batch_size,
                              max_data_loader_n_workers=args.workers)
        plan = build_plan(opts, seed=0)
        for label in ("cold", "warm"):
            t = time.perf_counter()
            cache = ensure_latent_cache(plan, vae, device=args.device, log=lambda m: None, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            print(json.dumps({"bench": "cache_throughput", "phase": label, "vae": args.vae, "device": args.device,
                              "images": args.n, "size": args.size, "workers": args.workers,
                              "vae_batch_size": args.vae_batch_size, "encoded": cache.encoded, "reused": cache.reused,
                              "seconds": round(dt, 3), "images_per_s": round(args.n / dt, 1)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
