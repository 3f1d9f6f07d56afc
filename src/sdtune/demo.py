"""`sdtune demo [DIR]`: the whole path on a tiny model, in about a minute on a laptop CPU.

Builds a tiny randomly initialised SD model and a synthetic captioned dataset, trains it with the
same code as `sdtune train`, saves it, and prints where everything is.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", nargs="?", default="sdtune_demo", help="where to put everything (default: sdtune_demo)")
    parser.add_argument("--family", choices=["sd1", "sd2", "sd2-v"], default="sd1", help="model family of the tiny model")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default: 50)")
    parser.add_argument("--images", type=int, default=16, help="synthetic images (default: 16)")


def run(args: argparse.Namespace) -> int:
    from sdtune.errors import UserError

    if args.steps < 1 or args.images < 1:
        raise UserError("--steps and --images must be at least 1")
    root = Path(args.directory)
    root.mkdir(parents=True, exist_ok=True)
    from sdtune.console import quiet_libraries

    quiet_libraries()

    from sdtune import checkpoint
    from sdtune.testing import build_tiny_model, make_dataset
    from sdtune.train.options import TrainOptions
    from sdtune.train.loop import train

    print(f"1/3 building a tiny random {args.family} model and {args.images} synthetic images in {root}/")
    model_path = root / "tiny-model"
    if not model_path.exists():
        checkpoint.save_model(build_tiny_model(args.family, seed=0), model_path, fmt="diffusers")
    data_dir = root / "images"
    meta = root / "meta.json"
    make_dataset(data_dir, n=args.images, seed=0, metadata=meta)

    print(f"2/3 training {args.steps} steps (the same code as `sdtune train`)")
    opts = TrainOptions(pretrained_model_name_or_path=str(model_path), in_json=str(meta), train_data_dir=str(data_dir),
                        output_dir=str(root / "output"), output_name="demo", resolution="64", train_batch_size=4,
                        learning_rate=1e-4, max_train_steps=args.steps, save_model_as="safetensors", seed=0)
    result = train(opts)

    print("3/3 done")
    print(f"  model      {model_path}/")
    print(f"  images     {data_dir}/ (+ .caption and .txt files)")
    print(f"  metadata   {meta}")
    for out in result.outputs:
        print(f"  trained    {out}")
    first, last = _mean(result.losses[:10]), _mean(result.losses[-10:])
    print(f"  loss       {first:.4f} (first 10 steps) -> {last:.4f} (last 10 steps), {result.seconds:.1f} s")
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))

