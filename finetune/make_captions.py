"""sd-scripts-compatible entry point: `python finetune/make_captions.py ...` runs `sdtune caption`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["caption", *sys.argv[1:]], prog="make_captions.py")
