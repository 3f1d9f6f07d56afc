"""The golden run: one fixed training run whose every output is reduced to SHA-256 digests.

A change that must leave behaviour unchanged (a refactor of the training code) is proven by
comparing these digests before and after: tests/golden/golden_run.json holds the digests recorded
from a known commit, and tests/test_golden_run.py compares a fresh run with them.

The run covers what a refactor of the loop can silently break: aspect-ratio bucketing (several
buckets), gradient accumulation with a half step at an epoch's end, text-encoder training, EMA,
caption and tag dropout, offset noise, sample images during training, saves in the middle of the
run (model and state), and a second invocation that resumes from the first one's last state and
trains to the end. Models are tiny and the run is a few steps, so it takes seconds on a CPU.
Its inputs (the tiny model, the images and their metadata) come from `sdtune.testing` of the code
on the path, so a change to what that module builds changes every digest as well.

What is digested (each tensor's dtype, shape and bytes, keyed by name; never container bytes,
which may hold timestamps or pickling details; the
digests of one file are combined into one, unless --detail):
  * every saved model file (the mid-run saves and the final model) and the EMA model beside it,
  * every state folder: model, optimizer, scheduler and EMA tensors, and its position; not the
    global random states (random_states_0.pkl), which differ from process to process because
    training draws only from its own seeded generators,
  * the final loss and step counts of each part's summary,
  * every sample image, decoded to pixels.

Usage:  PYTHONPATH=src python scripts/golden_run.py [--out FILE] [--keep DIR] [--commit HASH]
The `sdtune` on the path is the code under test: the test runs this script with an older commit's
`src` on PYTHONPATH to regenerate the reference on a machine other than the recording one.
To record a new reference (only when behaviour is meant to change), from a clean checkout:
  PYTHONPATH=src python scripts/golden_run.py --commit $(git rev-parse HEAD) --out tests/golden/golden_run.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

# One compute thread and fixed library settings: CPU kernels may split reductions differently with
# another thread count, which changes the last bits of the result.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# 5 images in 3 buckets at batch size 1 make 5 batches an epoch: with accumulation 2 an epoch is 3
# optimizer steps, the last of one batch. The first part stops at step 4, inside the second epoch,
# so the resume starts mid-epoch; models are saved at steps 2 and 4, samples drawn at 3 and 6. The
# schedule (constant after a warm-up) does not depend on the run's length, so the longer second part
# is a plain continuation of the first.
TOTAL_STEPS = 6
FIRST_PART = 4
IMAGES = 5  # layouts of sdtune.testing: 96x64, 64x96, 80x80, 128x64, 64x128
PROMPTS = (
    "a red circle on a blue background --n blurry --w 64 --h 64 --s 3 --l 5 --d 11\n"
    "a green square --w 96 --h 64 --s 2 --d 12 --ss euler_a\n"
)
# Libraries whose arithmetic the digests depend on: a different version may change the last bits.
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow")


def environment() -> dict[str, str]:
    """What the digests depend on besides the code: equal environments must give equal digests."""
    from importlib import metadata

    import torch

    env = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.machine(), "python": platform.python_version()}
    for name in LIBRARIES[1:]:
        env[name] = metadata.version(name)
    return env


def train_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model"), "--in_json", str(ws / "meta.json"),
            "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "G",
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--train_text_encoder", "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", "2", "--optimizer_type", "AdamW", "--seed", "7", "--ema", "--ema_decay", "0.9",
            "--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.2",
            "--noise_offset", "0.05", "--save_every_n_steps", "2", "--save_state", "--save_model_as", "safetensors",
            "--sample_every_n_steps", "3", "--sample_prompts", str(ws / "prompts.txt"),
            "--max_data_loader_n_workers", "0", *extra]


def run(work: Path) -> dict[str, Any]:
    """Train the fixed run in `work` and return the digests of everything it wrote."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from sdtune.cli import main
    from sdtune.testing import write_training_workspace

    ws = write_training_workspace(work / "ws", n=IMAGES, seed=0)
    (ws / "prompts.txt").write_text(PROMPTS)
    first, second = work / "part1", work / "part2"
    rc = main(train_args(ws, first, "--max_train_steps", str(FIRST_PART)))
    if rc != 0:
        raise SystemExit(f"golden run: the first part failed (exit {rc})")
    state = first / "G-state"  # the state saved at the first part's end
    rc = main(train_args(ws, second, "--max_train_steps", str(TOTAL_STEPS), "--resume", str(state)))
    if rc != 0:
        raise SystemExit(f"golden run: the resumed part failed (exit {rc})")
    return {"part1": digest_folder(first), "part2": digest_folder(second)}


# ---------------------------------------------------------------------------------------------
# Digests

DETAIL = False  # --detail: keep one digest per tensor (to find what differs) instead of one per file


def _combined(entries: dict[str, str]) -> Any:
    """One digest for a file's entries (the recorded reference stays small); the entries themselves
    with --detail."""
    if DETAIL:
        return entries
    h = hashlib.sha256(json.dumps(entries, sort_keys=True).encode())
    return f"sha256:{h.hexdigest()} over {len(entries)} entries"


def digest_folder(root: Path) -> dict[str, Any]:
    """Digests of the model files, state folders and sample images under `root`, by relative path."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".safetensors":
            out[rel] = _combined(_safetensors(path))
        elif path.suffix == ".bin":  # optimizer and scheduler
            out[rel] = _combined(_pickled(path))
        elif path.suffix == ".png" and path.parent.name == "sample":  # not the loss plot: matplotlib draws it
            out[rel] = _pixels(path)
        elif path.name == "train_state.json":
            record = json.loads(path.read_text())
            out[rel] = {k: record[k] for k in ("position", "ema_updates") if k in record}
        elif path.name.endswith("-train_summary.json"):
            record = json.loads(path.read_text())
            out[rel] = {k: repr(record.get(k)) for k in ("steps", "epochs", "final_loss", "stopped")}
    if not out:
        raise SystemExit(f"golden run: nothing was written under {root}")
    return out


def _tensor(t) -> str:
    import torch

    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safetensors(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: _tensor(v) for k, v in sorted(load_file(str(path)).items())}


def _pickled(path: Path) -> dict[str, str]:
    import torch

    return _flatten(torch.load(str(path), map_location="cpu", weights_only=False))


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Digest per leaf of a nested state (optimizer, scheduler): tensors and arrays by their bytes,
    everything else by its repr (step counts, learning rates)."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: _tensor(obj)}
    if isinstance(obj, np.ndarray):
        return {prefix: _tensor(torch.from_numpy(np.ascontiguousarray(obj)))}
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for key in sorted(obj, key=str):
            out.update(_flatten(obj[key], f"{prefix}/{key}"))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple, torch.Tensor, np.ndarray)) for x in obj):
        out = {}
        for i, item in enumerate(obj):
            out.update(_flatten(item, f"{prefix}/{i}"))
        return out
    return {prefix: hashlib.sha256(repr(obj).encode()).hexdigest()}


def _pixels(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()


def golden(keep: Path | None = None) -> dict[str, Any]:
    """The digests of a fresh golden run, with the environment and the code that produced them."""
    import sdtune

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        digests = run(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="sdtune-golden-") as tmp:
            digests = run(Path(tmp))
    return {"environment": environment(), "sdtune": str(Path(sdtune.__file__).resolve().parent),
            "digests": digests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    parser.add_argument("--keep", type=Path, help="train in this folder and keep it (default: a temporary one)")
    parser.add_argument("--commit", help="record this as the commit of the code on the path (when recording)")
    parser.add_argument("--detail", action="store_true",
                        help="one digest per tensor instead of per file: run it on two commits to see which tensors differ")
    args = parser.parse_args(argv)
    global DETAIL
    DETAIL = args.detail
    result = golden(args.keep)
    if args.commit:
        result = {"commit": args.commit, "environment": result["environment"], "digests": result["digests"]}
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
