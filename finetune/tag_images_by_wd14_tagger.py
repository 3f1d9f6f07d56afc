"""sd-scripts-compatible entry point: `python finetune/tag_images_by_wd14_tagger.py ...` runs `sdtune tag`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["tag", *sys.argv[1:]], prog="tag_images_by_wd14_tagger.py")
