"""Loader overhead: training-step time fed by the real loader vs the same batches already in memory.

    python bench/loader_overhead.py [--n 48] [--steps 30] [--workers 2] [--cached] [--repeats 3]

The step is a tiny U-Net forward + backward + AdamW on the batch (latents encoded by the tiny VAE
when not cached). Goal: ratio <= 1.05. Prints JSON lines.
"""

import argparse
import json
import statistics
import shutil
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cached", action="store_true", help="cache latents to disk first")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each side, in alternating order")
    args = ap.parse_args()

    import torch

    from sdtune.data import BucketBatchSampler, DatasetOptions, build_plan, ensure_latent_cache, make_loader
    from sdtune.data.latent_cache import sample_latents
    from sdtune.testing import build_tiny_model, make_dataset

    model = build_tiny_model("sd1")
    unet, vae = model.unet.train(), model.vae
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    cond = torch.zeros(args.batch, 77, unet.config.cross_attention_dim)
    root = Path(tempfile.mkdtemp(prefix="sdtune-bench-loader-"))
    try:
        make_dataset(root / "img", n=args.n, metadata=root / "m.json")
        opts = DatasetOptions(in_json=str(root / "m.json"), train_data_dir=str(root / "img"), resolution="64",
                              enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                              train_batch_size=args.batch, cache_latents_to_disk=args.cached,
                              max_data_loader_n_workers=args.workers, persistent_data_loader_workers=True)
        plan = build_plan(opts, seed=0)
        cache = ensure_latent_cache(plan, vae, log=lambda m: None, progress=False) if args.cached else None
        sampler = BucketBatchSampler(plan, seed=0)
        loader = make_loader(plan, sampler, cache)
        g = torch.Generator().manual_seed(0)

        def step(batch):
            if "latent_mean" in batch:
                lat = sample_latents(batch["latent_mean"], batch["latent_logvar"], g)
            else:
                with torch.no_grad():
                    lat = vae.encode(batch["images"]).latent_dist.sample(g)
            lat = lat * vae.config.scaling_factor
            t = torch.randint(0, 1000, (lat.shape[0],), generator=g)
            out = unet(lat, t, cond[: lat.shape[0]]).sample
            loss = torch.nn.functional.mse_loss(out, torch.randn(lat.shape, generator=g))
            loss.backward()
            opt.step()
            opt.zero_grad()

        def batches(n):
            out, epoch = [], 0
            while len(out) < n:
                sampler.set_epoch(epoch)
                out.extend(loader)
                epoch += 1
            return out[:n]

        memory = batches(args.steps)  # also warms the workers
        for b in memory[:5]:
            step(b)

        def from_memory() -> float:
            t = time.perf_counter()
            for b in memory:
                step(b)
            return time.perf_counter() - t

        def from_loader() -> float:
            t = time.perf_counter()
            done, epoch = 0, 0
            while done < args.steps:
                sampler.set_epoch(epoch)
                for b in loader:
                    step(b)
                    done += 1
                    if done == args.steps:
                        break
                epoch += 1
            return time.perf_counter() - t

        # alternate the order, so that drift in the machine's speed hits both sides alike
        t_mem, t_loader, ratios = [], [], []
        for r in range(args.repeats):
            if r % 2 == 0:
                m, ld = from_memory(), from_loader()
            else:
                ld, m = from_loader(), from_memory()
            t_mem.append(m)
            t_loader.append(ld)
            ratios.append(ld / m)
            print(json.dumps({"bench": "loader_overhead", "repeat": r, "ms_per_step_memory": round(1000 * m / args.steps, 1),
                              "ms_per_step_loader": round(1000 * ld / args.steps, 1), "ratio": round(ld / m, 3)}))
        print(json.dumps({"bench": "loader_overhead", "summary": True, "cached": args.cached, "workers": args.workers,
                          "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                          "ms_per_step_memory": round(1000 * statistics.median(t_mem) / args.steps, 1),
                          "ms_per_step_loader": round(1000 * statistics.median(t_loader) / args.steps, 1),
                          "ratio_median": round(statistics.median(ratios), 3), "goal": 1.05}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
