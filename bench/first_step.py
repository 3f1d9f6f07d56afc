"""Time from process start to the first optimizer step of `fine_tune.py` on a tiny SD1 fixture.

    PYTHONPATH=src .venv/bin/python bench/first_step.py [--repeats 5] [--workspace DIR] [--importtime]

Each repeat starts a fresh `python fine_tune.py ...` (the peer bench's flags: batch 4, 64 px,
buckets, cached latents, AdamW, fp32, SDPA, one loader process) with `--max_train_steps 2`, reads
its merged output as it arrives and timestamps the progress bar: `loop_start_s` is the bar's first
draw (0/2: model loaded, latents cached, optimizer built), `first_step_s` the draw of 1/2 (the first
optimizer step done), both from the moment the process was started. `cpu_s` is the process's CPU
time for the whole run (set-up, two steps, the save), the number that moves least when other
processes share the machine. The summary prints the median of each.

The workspace (a tiny SD1 Diffusers folder and 8 captioned images, `sdtune.testing`) is written
once into a temporary folder unless `--workspace` names one. Byte-code caching is left on for the
child (this machine's PYTHONDONTWRITEBYTECODE would recompile every module of sdtune each time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR = re.compile(rb"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def flags(ws: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ws / "model"), "--train_data_dir", str(ws / "data"),
            "--in_json", str(ws / "meta.json"), "--output_dir", str(out), "--output_name", "tiny_ft",
            "--save_model_as", "safetensors", "--save_precision", "float", "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "64",
            "--train_batch_size", "4", "--max_train_steps", "2", "--optimizer_type", "AdamW",
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--mixed_precision", "no", "--cache_latents",
            "--sdpa", "--max_data_loader_n_workers", "0", "--seed", "42"]


def one_run(ws: Path, out: Path, importtime: Path | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), str(REPO / "fine_tune.py"), *flags(ws, out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(importtime, "wb") if importtime else subprocess.STDOUT)
    seen: dict[int, float] = {}
    tail = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.perf_counter() - started
        tail = (tail + chunk)[-4096:]
        for match in BAR.finditer(tail):
            seen.setdefault(int(match.group(1)), now)
    proc.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or 1 not in seen:
        raise SystemExit(f"run failed (exit {proc.returncode}); output tail:\n{tail.decode(errors='replace')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"loop_start_s": round(seen.get(0, seen[1]), 3), "first_step_s": round(seen[1], 3),
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workspace", type=Path, help="a folder written by sdtune.testing.write_training_workspace")
    ap.add_argument("--importtime", type=Path, help="also write `python -X importtime` of one more run here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtune-first-step-") as tmp:
        ws = a.workspace
        if ws is None:
            from sdtune.testing import write_training_workspace

            ws = write_training_workspace(Path(tmp) / "ws", n=8)
        one_run(ws, Path(tmp) / "warm")  # page cache and byte code, not timed
        runs = []
        for i in range(a.repeats):
            runs.append(one_run(ws, Path(tmp) / f"out{i}"))
            print(json.dumps({"repeat": i, **runs[-1]}), flush=True)
        if a.importtime:
            one_run(ws, Path(tmp) / "imports", importtime=a.importtime)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"summary": "median", "repeats": a.repeats, "loadavg_1min": os.getloadavg()[0], **summary}))


if __name__ == "__main__":
    main()
