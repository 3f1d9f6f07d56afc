"""Hypernetwork training beside full fine-tuning: speed on the tiny model, memory at real size.

    .venv/bin/python bench/hypernetwork.py                    # both parts
    .venv/bin/python bench/hypernetwork.py --part speed --steps 20 --repeats 3
    .venv/bin/python bench/hypernetwork.py --part memory --sets fp32,bf16

Prints JSON lines, then one {"summary": ...} line per part.

speed: `sdtune train` on the tiny SD1 model and dataset of sdtune.testing, full fine-tuning and
  `--hypernetwork_module hypernetwork_nai`, with the same data and flags otherwise. A step's time is
  the difference of two whole runs (S and S + steps steps) divided by `steps`, as in
  bench/step_overhead.py, so loading and saving cancel out; the two kinds are interleaved (their
  order alternating) and the minimum of the repeats counts.
memory: peak live tensor bytes of one U-Net training step of the real SD 1.5 architecture (random
  weights, 512 px, batch 1, AdamW), counted as bench/memory.py counts them (FakeTensorMode and
  LiveBytes: no memory needed, CUDA's autocast rules). Full fine-tuning is bench/memory.py's own
  measurement; hypernetwork training is the same step with the U-Net frozen in the compute
  precision (as HypernetworkTarget holds it) and the NAI hypernetwork (1, 2, 1; every attention
  width) in float32 as the only trained module. Also: the hypernetwork's parameter count and the
  size of its .pt and .safetensors files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/memory.py's measurement

GIB = 1024 ** 3
HYPERNETWORK = ("--hypernetwork_module", "hypernetwork_nai")


# ------------------------------------------------------------------------------------------- speed

def train_seconds(root: Path, steps: int, batch: int, resolution: int, extra: tuple[str, ...]) -> float:
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args
    from sdtune.train.trainer import train

    args = build_parser("train").parse_args([
        "train", "--pretrained_model_name_or_path", str(root / "model"), "--in_json", str(root / "meta.json"),
        "--train_data_dir", str(root / "data"), "--output_dir", str(root / "out"), "--resolution", str(resolution),
        "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
        "--cache_latents", "--max_data_loader_n_workers", "0", *extra])
    opts = options_from_args(args)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(opts)
    return time.perf_counter() - started


def speed(steps: int, batch: int, resolution: int, repeats: int) -> dict:
    import torch

    from sdtune.testing import make_dataset, write_tiny_model

    kinds = {"full_fine_tune": (), "hypernetwork": HYPERNETWORK}
    ms: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_model(root / "model", "sd1", seed=0, fmt="diffusers")
        make_dataset(root / "data", n=8, seed=0, metadata=root / "meta.json")
        base = 3
        for r in range(repeats):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for kind in order:
                short = train_seconds(root, base, batch, resolution, kinds[kind])
                long = train_seconds(root, base + steps, batch, resolution, kinds[kind])
                ms[kind].append((long - short) / steps * 1000)
                print(json.dumps({"bench": "hypernetwork_speed", "kind": kind, "repeat": r,
                                  "ms_per_step": round(ms[kind][-1], 2)}), flush=True)
    best = {k: min(v) for k, v in ms.items()}
    return {"bench": "hypernetwork_speed", "summary": True,
            "full_fine_tune_steps_per_s": round(1000 / best["full_fine_tune"], 2),
            "hypernetwork_steps_per_s": round(1000 / best["hypernetwork"], 2),
            "hypernetwork_time_ratio": round(best["hypernetwork"] / best["full_fine_tune"], 3),
            "steps": steps, "batch": batch, "resolution": resolution, "repeats": repeats,
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------ memory

def hypernetwork_step(family: str, opts) -> dict[str, int]:
    """Counted bytes of a hypernetwork training step (train.memory_count's step, frozen U-Net)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sdtune.families import get_family
    from sdtune.hypernetwork import apply
    from sdtune.hypernetwork.module import Hypernetwork
    from sdtune.train.memory_count import count_training_step

    config = UNet2DConditionModel.load_config(str(get_family(family).asset_dir / "unet"))
    compute = torch.bfloat16 if opts.mixed_precision == "bf16" else torch.float32
    torch.manual_seed(0)
    with FakeTensorMode():
        unet = UNet2DConditionModel.from_config(config)
        unet.set_attn_processor(AttnProcessor2_0())
        unet.requires_grad_(False)
        for t in [*unet.parameters(), *unet.buffers()]:  # the frozen compute copy (unet.to() cannot swap fakes)
            if t.is_floating_point():
                t.data = t.data.to(compute)
        hn = Hypernetwork(sorted(apply.attention_widths(unet)))  # float32, the trained module
        apply.attach(unet, hn)
        # a submodule only so that the count sees its parameters as the trained ones (the hooks apply it)
        unet.add_module("hypernetwork", hn)
        return count_training_step(unet, opts, ["AdamW"], context_dim=config["cross_attention_dim"])["AdamW"]


def file_sizes(family: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.families import get_family
    from sdtune.hypernetwork import files
    from sdtune.hypernetwork.module import new_hypernetwork
    from sdtune.hypernetwork.spec import Structure, attention_widths_from_config

    config = UNet2DConditionModel.load_config(str(get_family(family).asset_dir / "unet"))
    widths = sorted(attention_widths_from_config(config))
    hn = new_hypernetwork(widths, Structure(), seed=0)
    out = {"bench": "hypernetwork_size", "family": family, "widths": widths, "parameters": hn.parameter_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".pt", ".safetensors"):
            out[f"file_mib{suffix.replace('.', '_')}"] = round(
                files.save(hn, Path(tmp) / f"hn{suffix}").stat().st_size / 2**20, 2)
        out["file_mib_pt_fp16"] = round(files.save(hn, Path(tmp) / "h16.pt", torch.float16).stat().st_size / 2**20, 2)
    return out


def memory(family: str, sets: list[str]) -> list[dict]:
    from memory import SETS, measure

    from sdtune.train.memory_count import StepOptions

    chosen = {"fp32": SETS["fp32_adamw"], "bf16": SETS["bf16_adamw"], "bf16_ckpt": SETS["bf16_ckpt_adamw"]}
    rows = []
    for name in sets:
        opts: StepOptions = chosen[name]
        for kind in ("hypernetwork", "full_fine_tune"):  # the cheaper first: its row stands if memory runs out
            start = time.perf_counter()
            counted = hypernetwork_step(family, opts) if kind == "hypernetwork" else measure(family, opts, ["AdamW"])["AdamW"]
            row = {"bench": "hypernetwork_memory", "family": family, "resolution": opts.resolution,
                   "batch_size": opts.batch_size, "precision": name, "kind": kind,
                   **{k: round(v / GIB, 3) for k, v in counted.items()}, "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "memory", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="speed: steps timed per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64, help="speed: pixel side of the tiny runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--sets", default="fp32,bf16", help="memory: comma-separated of fp32, bf16, bf16_ckpt")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch compute threads (default: torch's); 1 on a shared machine, where threads that "
                             "wait for each other make every step many times slower")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from sdtune.console import quiet_libraries

    quiet_libraries()
    if args.part in ("speed", "both"):
        print(json.dumps(speed(args.steps, args.batch, args.resolution, args.repeats)), flush=True)
    if args.part in ("memory", "both"):
        print(json.dumps(file_sizes(args.family)), flush=True)
        rows = memory(args.family, args.sets.split(","))
        peaks = {(r["precision"], r["kind"]): r["peak"] for r in rows}
        print(json.dumps({"bench": "hypernetwork_memory", "summary": True, "peak_gib": {
            p: {"hypernetwork": peaks[(p, "hypernetwork")], "full_fine_tune": peaks[(p, "full_fine_tune")],
                "ratio": round(peaks[(p, "hypernetwork")] / peaks[(p, "full_fine_tune")], 3)}
            for p in dict.fromkeys(r["precision"] for r in rows)}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
