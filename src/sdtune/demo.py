"""`sdtune demo [DIR]`: the whole workflow on tiny models, in a minute or two on a laptop CPU.

It builds a tiny randomly initialised SD checkpoint and a synthetic image set with hand-written
captions, then runs the same commands a user types, printing each one:

    sdtune tag      tags from a (tiny, colour-detecting) WD14-layout ONNX tagger
    sdtune caption  BLIP captions — skipped here, because the images already have captions
    sdtune merge    captions + tags -> meta.json
    sdtune cache    aspect-ratio buckets and VAE latents cached on disk
    sdtune train    fine-tuning on the buckets with the cached latents, sample images during
                    training, TensorBoard logs, a loss plot and a summary
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", nargs="?", default="sdtune_demo", help="where to put everything (default: sdtune_demo)")
    parser.add_argument("--family", choices=["sd1", "sd2", "sd2-v"], default="sd1", help="model family of the tiny model")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--images", type=int, default=16, help="synthetic images (default: 16)")


def run(args: argparse.Namespace) -> int:
    from sdtune.errors import UserError

    if args.steps < 1 or args.images < 1:
        raise UserError("--steps and --images must be at least 1")
    root = Path(args.directory)
    root.mkdir(parents=True, exist_ok=True)
    from sdtune.console import quiet_libraries

    quiet_libraries()
    from sdtune.testing import make_dataset, write_colour_tagger, write_tiny_blip, write_tiny_model

    model = root / f"tiny-{args.family}.safetensors"
    images, meta, out, logs = root / "images", root / "meta.json", root / "output", root / "logs"
    print(f"== building a tiny random {args.family} checkpoint, {args.images} images with captions, "
          f"and tiny tagger/captioner models in {root}/")
    if not model.exists():
        write_tiny_model(model, args.family, seed=0)
    make_dataset(images, n=args.images, seed=0, tags=False)
    tagger = write_colour_tagger(root / "models" / "tagger")
    blip = root / "models" / "blip"
    if not (blip / "config.json").exists():
        write_tiny_blip(blip)
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle on a blue background --w 128 --h 128 --s 8 --d 1\n"
                       "a green square on a white background --n blurry --w 128 --h 96 --s 8 --d 2\n")

    _sdtune("tag", str(images), "--model_dir", str(tagger), "--overwrite")
    _sdtune("caption", str(images), "--model_id", str(blip))
    _sdtune("merge", str(images), str(meta))
    data = ["--in_json", str(meta), "--train_data_dir", str(images), "--resolution", "128", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "256", "--bucket_reso_steps", "32", "--train_batch_size", "4"]
    _sdtune("cache", "--pretrained_model_name_or_path", str(model), *data, "--cache_latents_to_disk")
    _sdtune("train", "--pretrained_model_name_or_path", str(model), *data, "--cache_latents_to_disk",
            "--output_dir", str(out), "--output_name", "demo", "--learning_rate", "1e-4",
            "--max_train_steps", str(args.steps), "--save_model_as", "safetensors", "--seed", "0",
            "--sample_prompts", str(prompts), "--sample_every_n_steps", str(max(1, args.steps // 2)),
            "--sample_sampler", "euler_a", "--logging_dir", str(logs), "--min_snr_gamma", "5")

    print("\n== done. Look at:")
    print(f"  trained model   {out / 'demo.safetensors'} (original SD layout: A1111, ComfyUI, diffusers)")
    print(f"  sample images   {out / 'sample'}/ (one grid per sampling point)")
    print(f"  loss curve      {out / 'demo-loss.png'}")
    print(f"  run summary     {out / 'demo-train_summary.json'}")
    print(f"  TensorBoard     tensorboard --logdir {logs}")
    print(f"  metadata        {meta}; latent cache in {images / '.sdtune-cache'}/")
    return 0


def _sdtune(*argv: str) -> None:
    from sdtune.cli import main
    from sdtune.errors import UserError

    print(f"\n$ sdtune {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise UserError(f"the demo step `sdtune {argv[0]}` failed (exit status {code})")
