"""sd-scripts' `finetune/prepare_buckets_latents.py` command line, on `sdtune cache`.

    python finetune/prepare_buckets_latents.py train_data meta_clean.json meta_lat.json model.ckpt \
        --batch_size 4 --max_resolution 512,512 --mixed_precision no

sd-scripts' documented fine-tuning workflow runs this between merging the metadata and training.
At the sd-scripts snapshot we follow it writes no latents at all (the disk branch of the function
it calls is now a no-op); here it works: the images are bucketed as `--enable_bucket` training
buckets them, their latents are cached
in sdtune's content-addressed cache (`<image folder>/.sdtune-cache/`), and `out_json` is `in_json`
with each image's bucket as `train_resolution` (what sd-scripts writes) and, as `sdtune_latents`, how
its latents were cached (VAE precision, resize, mirrored or not). Training with the documented line
(`--in_json out_json --train_data_dir ...`, no bucket or cache flag) then trains each image in its
recorded bucket from these latents, without a VAE call (`sdtune.data.prepared`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdtune.console import plural
from sdtune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_data_dir", help="the image folder")
    parser.add_argument("in_json", help="metadata to read (from the merge and clean steps)")
    parser.add_argument("out_json", help="metadata to write: in_json plus each image's train_resolution")
    parser.add_argument("model_name_or_path", help="the checkpoint whose VAE encodes the images")
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (normally detected)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per VAE call (default: 1)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="processes decoding images (default: sdtune's)")
    parser.add_argument("--max_resolution", default="512,512",
                        help="largest bucket area, as width,height (default: 512,512)")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default: 256)")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default: 1024)")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides in steps of N (default: 64)")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="never enlarge an image to fill a bucket")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="VAE precision on a GPU: no = float32 (default), fp16; bf16 is refused (see docs)")
    parser.add_argument("--flip_aug", action="store_true", help="also cache the horizontally flipped image")
    parser.add_argument("--full_path", action="store_true",
                        help="metadata keys are full paths (sdtune resolves full paths and stems either way)")
    parser.add_argument("--recursive", action="store_true",
                        help="images in subfolders (sdtune follows the metadata keys, sub/folder/stem included)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep latents already cached (sdtune always reuses entries that are up to date)")
    parser.add_argument("--alpha_mask", action="store_true",
                        help="also cache each image's alpha channel as its loss mask (train with --alpha_mask)")


def run(args: argparse.Namespace) -> int:
    from sdtune.config import parse_options
    from sdtune.data.command import CacheOptions
    from sdtune.metadata import check_metadata_name, read_metadata, resolve_key, write_metadata

    if args.mixed_precision == "bf16":
        raise UserError("the latent cache is encoded in float16 (the precision training reads it with) or float32",
                        where="--mixed_precision bf16", fix="Use --mixed_precision fp16, or no for float32.")
    image_dir = Path(args.train_data_dir)
    if not image_dir.is_dir():
        raise UserError("image folder not found", where=str(image_dir), fix="Check train_data_dir.")
    out_json = check_metadata_name(args.out_json, "out_json")
    # the VAE ran in float32 with "no": recorded per image, so that training encodes (or finds) alike
    values = {"in_json": args.in_json, "train_data_dir": str(image_dir), "resolution": args.max_resolution,
              "enable_bucket": True, "min_bucket_reso": args.min_bucket_reso, "max_bucket_reso": args.max_bucket_reso,
              "bucket_reso_steps": args.bucket_reso_steps, "bucket_no_upscale": args.bucket_no_upscale,
              "flip_aug": args.flip_aug, "vae_batch_size": args.batch_size, "cache_latents_to_disk": True,
              "no_half_vae": args.mixed_precision == "no", "pretrained_model_name_or_path": args.model_name_or_path}
    if args.max_data_loader_n_workers is not None:
        values["max_data_loader_n_workers"] = args.max_data_loader_n_workers
    if args.alpha_mask:  # the entries hold the masks; recorded below, so that training asks for them too
        values["alpha_mask"] = True
    opts = parse_options(CacheOptions, values)  # the options' own checks, as one-line errors
    meta = read_metadata(args.in_json)  # before the long part: a bad file fails at once

    from sdtune.data.command import cache_latents
    from sdtune.data.prepared import latents_record

    # the buckets of this run's options, not those a previous run recorded in in_json
    cache = cache_latents(opts, v2=args.v2 or None, recorded_buckets=False)
    plan = cache.plan
    done = {sample.path: sample for sample in plan.active}
    for key in meta:
        path = resolve_key(key, image_dir)
        sample = done.get(str(path)) if path is not None else None
        if sample is None:  # left out (unreadable): no stale record from an earlier run
            meta[key].pop("train_resolution", None)
            meta[key].pop("sdtune_latents", None)
            continue
        meta[key]["train_resolution"] = [int(sample.bucket[0]), int(sample.bucket[1])]
        meta[key]["sdtune_latents"] = latents_record(cache.dtype, sample.size, sample.resized, args.flip_aug,
                                                         bool(args.alpha_mask))

    backup = write_metadata(out_json, meta)
    print(f"wrote {out_json} ({plural(len(plan.active), 'image')} with train_resolution"
          + (f"; the previous file kept as {backup}" if backup else "") + ")")
    # no bucket or cache flag is needed: training reads the record (sdtune.data.prepared)
    print("train with the cached latents: sdtune train (or fine_tune.py) --in_json "
          f"{out_json} --train_data_dir {image_dir} ... (each image in its recorded bucket, from these latents)")
    return 0
