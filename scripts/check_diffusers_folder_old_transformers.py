"""Do Diffusers folders written by sdtune load in an older stack (transformers 4, an older diffusers)?

sdtune runs on transformers 5; sd-scripts and many tools pin transformers 4, which re-initialises a
text encoder at random when its tensor names do not match, with only a warning. This script writes
tiny SD 1.x and SD 2.x-v models with every Diffusers path sdtune has (`--save_model_as diffusers`,
`diffusers_safetensors`, `sdtune convert`), records the token ids and text-encoder outputs sdtune
computes, then, in another Python environment, loads each folder with that environment's
`CLIPTokenizer`, `CLIPTextModel` and `StableDiffusionPipeline` and compares.

    python scripts/check_diffusers_folder_old_transformers.py --old-python /work/kohya/venv-kohya/bin/python

The second half runs this same file with `--compare DIR` under the old interpreter; it imports only
torch, transformers and diffusers there. Exit status 0 when every folder loads without missing or
unexpected tensors and every output matches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["a photo of a cat", "A red CIRCLE, on a blue background!", "masterpiece, best quality, 1girl, solo, " * 6]
TOLERANCE = 1e-5


def write_and_record(work: Path) -> list[dict]:
    """sdtune's side: the folders and the reference outputs (token ids, hidden states)."""
    import torch

    from sdtune import checkpoint
    from sdtune.cli import main as sdtune_main
    from sdtune.testing import build_tiny_model

    cases = []
    for family in ("sd1", "sd2-v"):
        model = build_tiny_model(family, seed=0)
        single = checkpoint.save_model(model, work / f"{family}.safetensors", fmt="safetensors", progress=False)
        folders = {fmt: checkpoint.save_model(model, work / f"{family}-{fmt}", fmt=fmt, progress=False)
                   for fmt in ("diffusers", "diffusers_safetensors")}
        assert sdtune_main(["convert", str(single), str(work / f"{family}-convert")]) == 0
        folders["convert"] = work / f"{family}-convert"
        ids = model.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.text_encoder(ids, output_hidden_states=True)
        reference = work / f"{family}-reference.pt"
        torch.save({"ids": ids, "last": out.last_hidden_state, "penultimate": out.hidden_states[-2]}, reference)
        for how, folder in folders.items():
            cases.append({"family": family, "how": how, "folder": str(folder), "reference": str(reference)})
    return cases


def compare(cases: list[dict]) -> list[dict]:
    """The old environment's side: load each folder with its own classes and compare."""
    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    results = []
    for case in cases:
        folder, ref = Path(case["folder"]), torch.load(case["reference"], weights_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        encoder, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
        with torch.no_grad():
            out = encoder(ref["ids"], output_hidden_states=True)
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None)
        with torch.no_grad():
            pipe_out = pipe.text_encoder(ref["ids"]).last_hidden_state
        diff = max(float((out.last_hidden_state - ref["last"]).abs().max()),
                   float((out.hidden_states[-2] - ref["penultimate"]).abs().max()),
                   float((pipe_out - ref["last"]).abs().max()))
        ok = (torch.equal(ids, ref["ids"]) and not info["missing_keys"] and not info["unexpected_keys"]
              and diff <= TOLERANCE and pipe.tokenizer.pad_token == tokenizer.pad_token)
        results.append({**{k: case[k] for k in ("family", "how")}, "transformers": transformers.__version__,
                        "diffusers": diffusers.__version__, "token_ids_equal": torch.equal(ids, ref["ids"]),
                        "missing_keys": len(info["missing_keys"]), "unexpected_keys": len(info["unexpected_keys"]),
                        "max_abs_diff": diff, "pad_token": tokenizer.pad_token, "ok": bool(ok)})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-python", help="interpreter of the environment with the older transformers")
    parser.add_argument("--workdir", help="where to write the folders (default: a temporary folder)")
    parser.add_argument("--compare", help=argparse.SUPPRESS)  # the second half, under the old interpreter
    args = parser.parse_args()
    if args.compare:
        cases = json.loads((Path(args.compare) / "cases.json").read_text())
        print(json.dumps(compare(cases)))
        return 0
    if not args.old_python:
        parser.error("--old-python is required")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdtune-old-tf-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = write_and_record(work)
    (work / "cases.json").write_text(json.dumps(cases, indent=2))
    proc = subprocess.run([args.old_python, __file__, "--compare", str(work)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        print(json.dumps(r))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
