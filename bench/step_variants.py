"""sdtune's time per training step with --torch_compile and with --fused_backward_pass, against the plain step.

    .venv/bin/python bench/step_variants.py [--steps 40] [--repeats 3] [--variants plain,compile,fused]

Each variant's time per step is bench/step_overhead.py's difference of two real `sdtune train` runs
(S and S + steps optimizer steps), so loading, caching, saving and compilation cancel out. Before the
timed runs each variant makes one untimed run: the compiled variant's first compilation fills
inductor's on-disk cache, so that both timed runs compile alike. The variants alternate within each
repeat; the summary takes the best of each and the ratio to the plain step (below 1: faster).
Same tiny SD1 fixture and flags as step_overhead.py (batch 4, 64 px, cached latents, AdamW, fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from step_overhead import sdtune_seconds

VARIANTS = {"plain": (), "compile": ("--torch_compile",), "fused": ("--fused_backward_pass",)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    a = parser.parse_args()

    import torch

    from sdtune.console import quiet_libraries
    from sdtune.testing import make_dataset, write_tiny_model

    quiet_libraries()
    names = a.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_model(root / "model", "sd1", seed=0, fmt="diffusers")
        make_dataset(root / "data", n=8, seed=0, metadata=root / "meta.json")
        quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))

        def run(name: str, steps: int) -> float:
            with quiet[0], quiet[1]:
                return sdtune_seconds(root, steps, a.batch, a.resolution, VARIANTS[name])

        for name in names:
            print(json.dumps({"bench": "step_variants", "variant": name, "warmup_s": round(run(name, 2), 1)}),
                  flush=True)
        ms: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.repeats):
            for name in names:
                short, long = run(name, 5), run(name, 5 + a.steps)
                ms[name].append((long - short) / a.steps * 1000)
                print(json.dumps({"bench": "step_variants", "variant": name, "repeat": r,
                                  "ms_per_step": round(ms[name][-1], 2)}), flush=True)
        best = {n: min(v) for n, v in ms.items()}
        base = best.get("plain")
        print(json.dumps({"bench": "step_variants", "summary": True,
                          "ms_per_step": {n: round(v, 2) for n, v in best.items()},
                          "ratio_to_plain": {n: round(v / base, 3) for n, v in best.items()} if base else None,
                          "steps": a.steps, "batch": a.batch, "resolution": a.resolution,
                          "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
