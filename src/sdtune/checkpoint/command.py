"""`sdtune convert SRC DST`: between single files (.safetensors / .ckpt), Diffusers folders and precisions."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a .safetensors / .ckpt file, a Diffusers folder, or a Hugging Face id")
    parser.add_argument("dst", help="output file (.safetensors / .ckpt) or folder (Diffusers)")
    parser.add_argument("--save_model_as", "--format", dest="fmt", choices=FORMATS, default=None,
                        help="output format (default: from DST's suffix; a folder gets diffusers_safetensors)")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default=None,
                        help="cast every floating tensor (default: keep the source's dtypes)")
    parser.add_argument("--v2", action="store_true", default=None, help="the source is SD 2.x (overrides detection)")
    parser.add_argument("--v1", dest="v2", action="store_false", help="the source is SD 1.x (overrides detection)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="the source predicts v (overrides detection); written into the output's markers")
    parser.add_argument("--epsilon", dest="v_parameterization", action="store_false",
                        help="the source predicts epsilon (overrides detection)")
    parser.add_argument("--use_ema_weights", action="store_true", help="take the U-Net from the file's EMA copy (model_ema.*)")
    parser.add_argument("--config", default=None, help="Diffusers-format folder with component configs for a non-standard model")
    parser.add_argument("--metadata_title", default=None, help="ModelSpec title (default: DST's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args) -> int:
    from sdtune.errors import UserError

    dst = Path(args.dst)
    fmt = args.fmt or {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(dst.suffix, "diffusers_safetensors")
    if dst.exists() and not args.overwrite:
        raise UserError("output already exists", where=str(dst), fix="Pass --overwrite or choose another name.")
    from sdtune.checkpoint import load_model, save_model

    model = load_model(args.src, v2=args.v2, v_parameterization=args.v_parameterization,
                       use_ema_weights=args.use_ema_weights, config=args.config)
    out = save_model(model, dst, fmt=fmt, precision=args.save_precision, title=args.metadata_title)
    print(f"wrote {out} ({fmt}{', ' + args.save_precision if args.save_precision else ''})")
    return 0
