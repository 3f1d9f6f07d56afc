#!/usr/bin/env python
"""sd-scripts compatible entry point:

    accelerate launch --num_cpu_threads_per_process 1 fine_tune.py --pretrained_model_name_or_path ... ...

Same flags as `sdtune train`.
"""

import sys

from sdtune.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit(["train", *sys.argv[1:]], prog="fine_tune.py")
