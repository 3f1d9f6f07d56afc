"""Load / save time and peak RSS for a full-size SD 1.5-architecture checkpoint (random weights).

    .venv/bin/python bench/checkpoint_io.py [--dir /tmp/sdtune-bench] [--precision fp16|float]

Each step runs in a fresh process so its peak RSS (ru_maxrss) is its own; prints one JSON line per
step. Goal: peak RSS <= 1.5x the file size (a 2 GB checkpoint must load on a machine with little RAM).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(path: Path, precision: str) -> dict:
    import torch

    from sdtune.checkpoint import load as ld
    from sdtune.checkpoint import save_model
    from sdtune.families import SD1
    from sdtune.model import SDModel

    dtype = torch.float16 if precision == "fp16" else torch.float32
    cfg = ld._base_configs(SD1, None)
    unet, vae, te = ld._build(cfg)
    gen = torch.Generator().manual_seed(0)
    for module in (unet, vae, te):
        module.to_empty(device="cpu")
        module.to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02, generator=gen)
    tok, sched = ld._tokenizer_and_scheduler(SD1, None)
    model = SDModel(SD1, unet, vae, te, tok, sched, source=None)
    t = time.perf_counter()
    save_model(model, path, fmt="safetensors", progress=False)
    return {"step": "save (model already in RAM)", "seconds": round(time.perf_counter() - t, 2)}


def load(path: Path, touch: bool) -> dict:
    import torch

    from sdtune.checkpoint import load_model

    t = time.perf_counter()
    model = load_model(path, verbose=False)
    seconds = time.perf_counter() - t
    if touch:  # what training does first: read every weight
        with torch.no_grad():
            total = sum(float(p.float().sum()) for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
        assert total == total
    return {"step": "load" + (" + read every weight" if touch else ""), "seconds": round(seconds, 2)}


def convert(path: Path, out: Path, fmt: str) -> dict:
    from sdtune.checkpoint import load_model, save_model

    t = time.perf_counter()
    save_model(load_model(path, verbose=False), out, fmt=fmt, progress=False)
    return {"step": f"load + save as {fmt}", "seconds": round(time.perf_counter() - t, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/sdtune-bench")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "float"))
    parser.add_argument("--_step", default=None)
    args = parser.parse_args()
    root = Path(args.dir)
    src = root / f"sd15-random-{args.precision}.safetensors"
    if args._step:
        step = {"make": lambda: make(src, args.precision), "load": lambda: load(src, False),
                "touch": lambda: load(src, True),
                "safetensors": lambda: convert(src, root / "out.safetensors", "safetensors"),
                "ckpt": lambda: convert(src, root / "out.ckpt", "ckpt")}[args._step]
        result = step()
        result["peak_rss_mb"] = round(_rss_mb(), 1)
        print(json.dumps(result))
        return
    root.mkdir(parents=True, exist_ok=True)
    for name in ("make", "load", "touch", "safetensors", "ckpt"):
        if name == "make" and src.exists():
            continue
        line = subprocess.run([sys.executable, __file__, "--dir", str(root), "--precision", args.precision, "--_step", name],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(line)
        size = src.stat().st_size / 2**20
        result.update(bench="checkpoint_io", file_mb=round(size, 1), rss_over_file=round(result["peak_rss_mb"] / size, 2),
                      precision=args.precision)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
