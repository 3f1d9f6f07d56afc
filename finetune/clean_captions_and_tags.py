"""sd-scripts-compatible entry point: `python finetune/clean_captions_and_tags.py ...` runs `sdtune clean`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["clean", *sys.argv[1:]], prog="clean_captions_and_tags.py")
