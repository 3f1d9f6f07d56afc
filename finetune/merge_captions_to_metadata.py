"""sd-scripts-compatible entry point: `python finetune/merge_captions_to_metadata.py ...` runs `sdtune merge --only captions`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["merge", "--only", "captions", *sys.argv[1:]], prog="merge_captions_to_metadata.py")
