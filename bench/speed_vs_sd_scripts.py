"""Training steps per second of sdtune's `fine_tune.py` against sd-scripts' on one tiny fixture, interleaved.

    PYTHONPATH=src python bench/speed_vs_sd_scripts.py --fixture DIR [--rounds 5] [--steps 40] [--warmup 8]
        [--threads 1] [--sd-scripts /work/kohya/sd-scripts] [--kohya-python /work/kohya/venv-kohya/bin/python]
        [--out DIR] [--only sdtune] [--sdtune NAME=SRC_DIR ...]

The fixture is a folder with `model/diffusers` (an SD1-shaped Diffusers folder; a U-Net narrower than real
SD1 is fine), `data/train` (images and captions) and `data/meta_cap_dd.json` (sd-scripts' metadata for them).
Both trainers get the same flags: batch 4, 64 px, buckets 64-128, cached latents, AdamW, fp32, SDPA, no
loader workers, seed 42, `--max_train_steps STEPS`.

Each round runs both trainers once, one after the other, the order alternating between rounds (so that a
slow drift of the machine's load hits both alike); every run is a fresh process with the same thread
count (`OMP_NUM_THREADS`, and torch's own count is read back at the end of each run and printed, so that a
trainer that sets its own count shows). The progress bar ("steps: ...| n/N [") is timestamped from the
outside as its redraws arrive:

* `steady_steps_per_s`: (N - w) / (t(N) - t(w)), w the first drawn step >= --warmup: the loop after
  its first steps (allocator warm-up, the first optimizer state), without start-up, caching or saving;
* `steady_steps_per_cpu_s`: the same steps over the CPU seconds the process used for them (read from
  /proc at each redraw): what the steps cost, less sensitive than wall time to other work on the machine,
  though not to its cache and memory-bandwidth contention;
* `first_step_s`: process start to the draw of step 1 (imports, set-up, latent caching, step 1);
* `loop_start_s`: process start to the bar's first draw;
* `other_cpu_s`: CPU seconds the rest of the machine used during the run (from /proc/stat, less the
  run's own): near 0 means the run had the machine to itself.

The summary is the median over rounds of each round's sdtune / sd-scripts ratio of steady steps/s
(`ratio_median`; `cpu_ratio_median` the same for steps per CPU second), with the per-round ratios,
for each sdtune source given (`--sdtune before=DIR --sdtune after=DIR` compares two versions against the
same sd-scripts runs; the order of the sides alternates round by round), the medians of the other figures and `uptime` before and after.

sd-scripts hard-codes real SD1's U-Net widths as three module constants; for a narrower fixture this
script starts `fine_tune.py` through itself (`--child`), which sets those constants from the fixture's
U-Net config and then runs the unmodified script. sd-scripts' tokenizer is read from a cache folder made
here from sdtune's copy of the same CLIP tokenizer files (the machine is offline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR = re.compile(rb"steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)\s*\[")
THREADS = re.compile(rb"\[bench-threads\] (\d+)")


def common_flags(fix: Path, out: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(fix / "model" / "diffusers"),
            "--train_data_dir", str(fix / "data" / "train"), "--in_json", str(fix / "data" / "meta_cap_dd.json"),
            "--output_dir", str(out), "--output_name", "tiny_ft", "--save_model_as", "safetensors",
            "--save_precision", "float", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "64", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--mixed_precision", "no", "--cache_latents", "--sdpa",
            "--max_data_loader_n_workers", "0", "--seed", "42"]


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds so far (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """CPU seconds a running process has used so far (all its threads; nan once it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_run(cmd: list[str], env: dict, cwd: Path, warmup: int) -> dict:
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = _busy_cpu_s()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, float] = {}
    cpu: dict[int, float] = {}
    total = threads = None
    tail = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.perf_counter() - started
        tail = (tail + chunk)[-8192:]
        for match in BAR.finditer(tail):  # a redraw is timed on arrival; tqdm flushes each one
            step, total = int(match.group(1)), int(match.group(2))
            if step not in seen:
                seen[step], cpu[step] = now, _process_cpu_s(proc.pid)
        if found := THREADS.search(tail):
            threads = int(found.group(1))
    proc.wait()
    wall = time.perf_counter() - started
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after_children.ru_utime - before_children.ru_utime) + (after_children.ru_stime - before_children.ru_stime)
    if proc.returncode != 0 or not total or total not in seen:
        raise SystemExit(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail.decode(errors='replace')}")
    w = min((n for n in seen if warmup <= n < total), default=None)
    steady = (total - w) / (seen[total] - seen[w]) if w is not None and seen[total] > seen[w] else None
    steady_cpu = (total - w) / (cpu[total] - cpu[w]) if w is not None and cpu[total] > cpu[w] else None
    return {"steady_steps_per_s": round(steady, 4) if steady else None, "steady_from": w,
            "steady_steps_per_cpu_s": round(steady_cpu, 4) if steady_cpu else None,
            "loop_start_s": round(seen.get(0, float("nan")), 3), "first_step_s": round(seen.get(1, float("nan")), 3),
            "loop_steps_per_s": round(total / (seen[total] - seen[0]), 4) if 0 in seen else None,
            "wall_s": round(wall, 2), "cpu_s": round(own, 2), "other_cpu_s": round(_busy_cpu_s() - busy0 - own, 1),
            "torch_threads": threads}


def child(argv: list[str]) -> None:
    """Run a training script as __main__ (argv: [--tiny-unet CONFIG] SCRIPT ARGS...), printing torch's thread
    count when the process ends."""
    import atexit
    import runpy

    if argv[0] == "--tiny-unet":
        widths = tuple(json.loads(Path(argv[1]).read_text())["block_out_channels"])
        argv = argv[2:]
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        import library.original_unet as unet  # sd-scripts' own U-Net, widths as module constants

        unet.BLOCK_OUT_CHANNELS, unet.TIMESTEP_INPUT_DIM, unet.TIME_EMBED_DIM = widths, widths[0], widths[0] * 4

    def report():
        torch = sys.modules.get("torch")
        print(f"\n[bench-threads] {torch.get_num_threads() if torch else 0}", flush=True)

    atexit.register(report)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def commands(a, fix: Path, out: Path, tokenizers: Path) -> dict[str, tuple[list[str], Path, dict]]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), HF_HOME=str(out / "hf_home"))
    me = str(Path(__file__).resolve())
    kohya = [a.kohya_python, me, "--child", "--tiny-unet", str(fix / "model" / "diffusers" / "unet" / "config.json"),
             str(Path(a.sd_scripts) / "fine_tune.py"), "--tokenizer_cache_dir", str(tokenizers)]
    out = {"sd-scripts": (kohya, Path(a.sd_scripts), base)}
    for name, src in a.sdtune:  # fine_tune.py only calls sdtune's cli: the source folder decides the version
        out[name] = ([a.sdtune_python, me, "--child", str(REPO / "fine_tune.py")], REPO, {**base, "PYTHONPATH": src})
    return out


def _named_source(text: str) -> tuple[str, str]:
    name, sep, src = text.partition("=")
    if not sep or not Path(src, "sdtune").is_dir():
        raise argparse.ArgumentTypeError(f"expected NAME=SRC_DIR with SRC_DIR/sdtune, got {text!r}")
    return name, str(Path(src).resolve())


def _summary(rows: list[dict], sides: list[str]) -> dict:
    med = {s: {k: statistics.median(r[s][k] for r in rows if r[s].get(k) is not None)
               for k in ("steady_steps_per_s", "steady_steps_per_cpu_s", "first_step_s", "loop_start_s", "cpu_s", "other_cpu_s")}
           for s in sides}
    out = {"summary": "median", "rounds": len(rows), **{s: med[s] for s in sides}}
    for side in (s for s in sides if s != "sd-scripts" and "sd-scripts" in sides):
        for key, name in (("steady_steps_per_s", "ratio"), ("steady_steps_per_cpu_s", "cpu_ratio")):
            ratios = [r[side][key] / r["sd-scripts"][key] for r in rows if r[side][key] and r["sd-scripts"][key]]
            out[side].update({f"{name}_per_round": [round(x, 3) for x in ratios],
                              f"{name}_median": round(statistics.median(ratios), 3)})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8, help="steps left out at the start of the loop")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both trainers")
    ap.add_argument("--sd-scripts", default="/work/kohya/sd-scripts")
    ap.add_argument("--kohya-python", default="/work/kohya/venv-kohya/bin/python")
    ap.add_argument("--sdtune-python", default=sys.executable)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sdtune-speed-vs-sd-scripts"))
    ap.add_argument("--sdtune", type=_named_source, action="append", default=[],
                    help="NAME=SRC_DIR: an sdtune source folder to run (repeatable, e.g. before=... after=...); "
                         "default: sdtune=this repository's src")
    ap.add_argument("--only", help="run this side only")
    a = ap.parse_args()
    a.sdtune = a.sdtune or [("sdtune", str(REPO / "src"))]
    fix = a.fixture.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    tokenizers = a.out / "tokenizer_cache"
    if not (tokenizers / "openai_clip-vit-large-patch14").is_dir():  # what sd-scripts loads offline
        shutil.copytree(REPO / "src" / "sdtune" / "assets" / "sd1" / "tokenizer",
                        tokenizers / "openai_clip-vit-large-patch14")
    cmds = commands(a, fix, a.out, tokenizers)
    sides = [a.only] if a.only else list(cmds)
    print(json.dumps({"uptime_before": _uptime(), "threads": a.threads, "steps": a.steps, "warmup": a.warmup}),
          flush=True)
    rows = []
    for r in range(a.rounds):
        row = {}
        for side in (sides if r % 2 == 0 else sides[::-1]):
            cmd, cwd, env = cmds[side]
            out = a.out / f"{side}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            row[side] = one_run(cmd + common_flags(fix, out, a.steps), env, cwd, a.warmup)
            print(json.dumps({"round": r, "side": side, "loadavg": os.getloadavg()[0], **row[side]}), flush=True)
        rows.append(row)
    print(json.dumps({**_summary(rows, sides), "uptime_after": _uptime()}), flush=True)


if __name__ == "__main__":
    main()
