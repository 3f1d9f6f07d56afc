"""sd-scripts-compatible entry point: `python finetune/merge_dd_tags_to_metadata.py ...` runs `sdtune merge --only tags`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sdtune.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["merge", "--only", "tags", *sys.argv[1:]], prog="merge_dd_tags_to_metadata.py")
