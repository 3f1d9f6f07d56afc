"""The one JSON summary of bench/gpu_suite.sh: its stages' JSON lines folded together.

    python bench/gpu_summary.py OUT_DIR [--mode gpu|cpu-smoke]

Prints {"gpu_suite": {...}} (also written to OUT_DIR/summary.json) and exits non-zero when a stage
failed or, on a GPU, a check failed. In --cpu-smoke mode the checks' own results are not judged
(CUDA features fall back on the CPU); that every stage ran to its end is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a library's stray print
    return out


def summarise(dest: Path, mode: str) -> dict:
    stages = {s["stage"]: s for s in lines(dest / "stages.jsonl")}
    checks = [r for r in lines(dest / "checks.jsonl") if "check" in r]
    throughput = [r for r in lines(dest / "throughput.jsonl") if "batch" in r]
    memory = lines(dest / "memory.jsonl")
    plain = [r for r in throughput if not r.get("optimizer_args")]  # AdamW as sdtune runs it on a GPU
    eager = {r["batch"]: r for r in plain if not r["compile"]}
    compiled = {r["batch"]: r for r in plain if r["compile"]}
    fused = next((r for r in throughput if r.get("optimizer_args")), None)
    speedup = {b: round(compiled[b]["samples_per_s"] / eager[b]["samples_per_s"], 3) for b in eager if b in compiled}
    mem_rows = [r for r in memory if "set" in r]
    mem_summary = next((r["summary"] for r in memory if "summary" in r), None)
    device = next((r for r in lines(dest / "throughput.jsonl") if "bench" in r), {})
    summary = {
        "mode": mode,
        "device": {k: v for k, v in device.items() if k != "bench"},
        "stages": {name: {"rc": s["rc"], "seconds": s["seconds"]} for name, s in stages.items()},
        "checks": {"passed": [c["check"] for c in checks if c.get("ok")],
                   "failed": [c["check"] for c in checks if not c.get("ok")]},
        "throughput": [{k: r.get(k) for k in ("batch", "compile", "optimizer_args", "samples_per_s", "step_ms",
                                               "tflops", "mfu", "warmup_s", "peak_gib")} for r in throughput],
        "compile_speedup": speedup,
        # batch 1, eager: AdamW on torch's fused kernel against the default multi-tensor step
        "fused_adamw_speedup": round(fused["samples_per_s"] / eager[1]["samples_per_s"], 3)
        if fused and 1 in eager else None,
        "memory": [{k: r.get(k) for k in ("set", "peak_gib", "predicted_gib", "ratio", "error")} for r in mem_rows],
        "memory_worst_ratio": mem_summary,
    }
    stage_ok = len(stages) == 3 and all(s["rc"] == 0 for s in stages.values())
    checks_ok = mode != "gpu" or not summary["checks"]["failed"]
    summary["ok"] = stage_ok and checks_ok and bool(throughput) and bool(mem_rows)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest")
    parser.add_argument("--mode", default="gpu", choices=["gpu", "cpu-smoke"])
    args = parser.parse_args(argv)
    summary = summarise(Path(args.dest), args.mode)
    text = json.dumps({"gpu_suite": summary})
    (Path(args.dest) / "summary.json").write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
