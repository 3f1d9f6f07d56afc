"""sd-scripts-compatible entry point: `python finetune/prepare_buckets_latents.py train_data in.json out.json model`
buckets the images and caches their latents with `sdtune cache`, and writes out.json with each image's bucket."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["prepare_buckets_latents", *sys.argv[1:]], prog="prepare_buckets_latents.py")
