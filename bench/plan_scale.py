"""Planning a large dataset: time and peak memory of `build_plan` for N images whose sizes are in
the metadata (as `sdtune merge` or sd-scripts' prepare step record them).

    python bench/plan_scale.py [--images 1000000] [--workdir /tmp/sdtune-plan-scale] [--format json]

The first run makes N empty image files (names only: the plan reads no pixels when the sizes are
recorded) and the metadata, with stem keys as sd-scripts' merge writes them, random sizes from
256 to 2048 pixels a side and a caption each; later runs reuse them. The plan is built in a fresh
process, so its peak resident memory (ru_maxrss, the interpreter included) is the plan's alone.
Goal: <= 30 s and <= 2 GB for 1,000,000 images. Prints JSON lines; plan_cpu_s is the process's CPU
time, the fairer figure on a machine that other work keeps busy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path


def make_workspace(workdir: Path, n: int, fmt: str) -> Path:
    images = workdir / "images"
    meta = workdir / f"meta-{n}.{fmt}"
    if meta.is_file() and (workdir / f"made-{n}").is_file():
        return meta
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    records = {}
    for i in range(n):
        name = f"img_{i:07d}"
        os.close(os.open(images / f"{name}.png", os.O_CREAT | os.O_WRONLY, 0o644))
        w, h = rng.randint(256, 2048), rng.randint(256, 2048)
        records[name] = {"caption": f"a photo of thing {i % 977} in style {i % 31}, detailed", "image_size": [w, h]}
    if fmt == "jsonl":
        meta.write_text("".join(json.dumps({"image_path": k, **v}) + "\n" for k, v in records.items()))
    else:
        meta.write_text(json.dumps(records))
    (workdir / f"made-{n}").touch()
    return meta


def measure(meta: Path, images: Path) -> dict:
    from sdtune.data import DatasetOptions, build_plan

    opts = DatasetOptions(in_json=str(meta), train_data_dir=str(images), resolution="1024", enable_bucket=True,
                          train_batch_size=4)
    start, cpu = time.perf_counter(), time.process_time()
    plan = build_plan(opts, seed=0, warn=lambda _m: None)
    planned, planned_cpu = time.perf_counter() - start, time.process_time() - cpu
    summary = plan.summary(8, 1)  # what --dry_run prints
    total = time.perf_counter() - start
    return {"samples": len(plan.samples), "buckets": len(plan.groups()), "plan_s": round(planned, 2), "plan_cpu_s": round(planned_cpu, 2),
            "plan_and_summary_s": round(total, 2), "summary_lines": summary.count("\n") + 1,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sdtune-plan-scale"))
    ap.add_argument("--format", choices=("json", "jsonl"), default="json")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workdir / "images")))
        return
    start = time.perf_counter()
    meta = make_workspace(args.workdir, args.images, args.format)
    print(json.dumps({"bench": "plan_scale", "images": args.images, "format": args.format,
                      "workspace_s": round(time.perf_counter() - start, 1), "metadata_mb": round(meta.stat().st_size / 2**20)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--measure", str(meta)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
