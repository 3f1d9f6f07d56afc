"""Checks that need a CUDA GPU (CI has none): one JSON line per check.

    python bench/gpu_checks.py                 # on a GPU machine
    python bench/gpu_checks.py --cpu-smoke     # the same checks on the CPU: proves the script runs

Each training check is a real `sdtune train` run (in-process, tiny SD1 model, synthetic images,
4 steps) with the flags under test; it passes when the run ends normally with finite losses and
changed U-Net weights, plus the check's own condition:

* fp16 with the gradient scaler (`--mixed_precision fp16`: the accelerator holds a GradScaler),
  `--full_fp16`, `--full_bf16`, bf16;
* attention: xformers (`--xformers`, when the package is installed) and SDPA's memory-efficient
  kernel (`--mem_eff_attn`) in training, and a forward pass of every backend against SDPA's, with
  and without a hypernetwork attached (the hypernetwork must act under each backend);
* 8-bit optimizers (AdamW8bit, Lion8bit: bitsandbytes);
* fp16 VAE latent caching (the default on CUDA) against float32 (`--no_half_vae`): close, finite;
* hypernetwork training with `--xformers`;
* FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`, one process, bf16): a run that saves a
  sharded state and a sample image, then a resumed run; on the CPU the launch must be refused.

On the CPU (`--cpu-smoke`) sdtune falls back where CUDA is missing (fp16 trains in float32, xformers
becomes SDPA): the lines say the script works there, nothing about CUDA. A check refused with a
user error is reported with the message (and fails on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- training runs

def train(workspace: Path, out: Path, *flags: str):
    """A real `sdtune train` run; (trainer, result)."""
    from sdtune.cli import build_parser
    from sdtune.train.command import options_from_args, with_prepared_data
    from sdtune.train.trainer import Trainer

    argv = ["train", "--pretrained_model_name_or_path", str(workspace / "model"),
            "--train_data_dir", str(workspace / "data"), "--in_json", str(workspace / "meta.json"),
            "--output_dir", str(out), "--output_name", "check", "--save_model_as", "safetensors",
            "--save_precision", "float",
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--max_data_loader_n_workers", "0", "--seed", "7", *flags]
    opts = with_prepared_data(options_from_args(build_parser("train").parse_args(argv)))
    trainer = Trainer(opts)
    return trainer, trainer.fit()


def _unet_changed(workspace: Path, out: Path, flags: tuple[str, ...]) -> bool:
    """Whether any U-Net weight of the saved model (saved in float32) differs from the base model's
    weights as the run held them before its first step (rounded to 16 bits under --full_fp16 /
    --full_bf16): any optimizer step changes some, and nothing else does."""
    from sdtune.checkpoint import load_model

    held = torch.float16 if "--full_fp16" in flags else torch.bfloat16 if "--full_bf16" in flags else torch.float32
    base = _base_unet(workspace)
    saved = load_model(str(out / "check.safetensors"), dtype=torch.float32).unet.state_dict()
    return any(not torch.equal(base[k].to(held).float(), v.float()) for k, v in saved.items())


def training_check(name: str, workspace: Path, *flags: str, extra=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        trainer, result = train(workspace, out, *flags)
        row = {"losses_finite": all(math.isfinite(x) for x in result.losses), "steps": result.steps,
               "unet_changed": _unet_changed(workspace, out, flags)}
        ok = row["losses_finite"] and row["unet_changed"] and result.steps == 4
        if extra:
            more, extra_ok = extra(trainer)
            row.update(more)
            ok = ok and extra_ok
    return {"check": name, "flags": " ".join(flags), "ok": ok, **row}


def _base_unet(workspace: Path) -> dict:
    from sdtune.checkpoint import load_model

    return load_model(str(workspace / "model")).unet.state_dict()


def scaler_check(trainer) -> tuple[dict, bool]:
    scaler = getattr(trainer.run.accelerator, "scaler", None)
    present = scaler is not None
    return {"grad_scaler": present, "scale": float(scaler.get_scale()) if present else None}, \
        present or DEVICE.type != "cuda"


# ---------------------------------------------------------------- attention backends

def attention_backends() -> dict:
    """The tiny U-Net's output under every attention backend against SDPA's, plain and with a
    hypernetwork attached (at multiplier 1 its change of the output must show under each backend)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from sdtune.hypernetwork.apply import attach, attention_widths
    from sdtune.hypernetwork.module import Hypernetwork
    from sdtune.model import denoise
    from sdtune.testing import build_tiny_model

    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    unet = build_tiny_model("sd1").unet.to(DEVICE, dtype).eval()
    gen = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 4, 8, 8, generator=gen).to(DEVICE, dtype)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(DEVICE, dtype)
    t = torch.tensor([10, 500], device=DEVICE)
    hyper = Hypernetwork(sorted(attention_widths(unet))).initialize(torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in hyper.parameters():
            p.mul_(30.0)  # a visible change of the context (the default init is nearly the identity)
    hyper = hyper.to(DEVICE, dtype)

    def run(setup, hypernetwork: bool):
        setup()
        with torch.no_grad():
            if not hypernetwork:
                return denoise(unet, noisy, t, cond).float()
            with attach(unet, hyper):
                return denoise(unet, noisy, t, cond).float()

    sdpa = lambda: unet.set_attn_processor(AttnProcessor2_0())  # noqa: E731
    backends = {"classic": lambda: unet.set_attn_processor(AttnProcessor())}
    if DEVICE.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def mem_eff():
            unet.set_attn_processor(AttnProcessor2_0())
            return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
        backends["mem_eff"] = mem_eff
        try:
            import xformers  # noqa: F401

            backends["xformers"] = unet.enable_xformers_memory_efficient_attention
        except ImportError:
            pass
    reference = {h: run(sdpa, h) for h in (False, True)}
    effect = float((reference[True] - reference[False]).abs().max())
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    rows, ok = {}, effect > 10 * tol
    for name, setup in backends.items():
        diffs = {}
        for h in (False, True):
            ctx = setup()
            if hasattr(ctx, "__enter__"):
                with ctx:
                    out = run(lambda: None, h)
            else:
                out = run(lambda: None, h)
            diffs["with_hypernetwork" if h else "plain"] = float((out - reference[h]).abs().max())
        rows[name] = diffs
        ok = ok and all(d < tol for d in diffs.values())
    return {"check": "attention_backends", "ok": ok, "hypernetwork_effect": effect, "tolerance": tol,
            "max_abs_diff_vs_sdpa": rows, "xformers": "xformers" in backends}


# ---------------------------------------------------------------- fp16 VAE caching

def vae_cache_fp16(workspace: Path) -> dict:
    """Latents cached with the VAE in float16 (CUDA's default) against float32 (`--no_half_vae`)."""
    from safetensors import safe_open

    caches = {}
    for label, flags in (("fp16", ()), ("fp32", ("--no_half_vae",))):
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = Path(tmp) / "cache"
            train(workspace, Path(tmp) / "out", "--cache_latents_to_disk", "--cache_dir", str(cache_dir), *flags)
            caches[label] = {}
            for f in cache_dir.rglob("*.safetensors"):
                with safe_open(str(f), "pt") as entry:
                    if "sdtune_cache" not in (entry.metadata() or {}):
                        continue  # not a latent entry (e.g. the text-embedding cache)
                    parts = json.loads(entry.metadata()["sdtune_cache"])
                    same_image = json.dumps({k: v for k, v in parts.items() if k not in ("vae", "dtype")},
                                            sort_keys=True)
                    caches[label][same_image] = (parts["dtype"], entry.get_tensor("mean").float())
    pairs = [(caches["fp16"][k], v) for k, v in caches["fp32"].items() if k in caches["fp16"]]
    dtypes = sorted({a[0] for a, _ in pairs} | {b[0] for _, b in pairs})
    finite = all(bool(torch.isfinite(a[1]).all()) for a, _ in pairs)
    rel = max((float((a[1] - b[1]).norm() / b[1].norm().clamp_min(1e-12)) for a, b in pairs), default=float("nan"))
    half = DEVICE.type != "cuda" or "float16" in dtypes
    return {"check": "vae_cache_fp16", "ok": bool(pairs) and finite and half and rel < 1e-2, "entries": len(pairs),
            "dtypes": dtypes, "finite": finite, "max_relative_error": rel}


# ---------------------------------------------------------------- noise

def noise_same_on_cpu_and_device() -> dict:
    """The objective draws on the CPU from the seeded generator, then moves: CPU and GPU runs agree."""
    from sdtune.families import SD2_V
    from sdtune.train.noise import DiffusionObjective, LossConfig, NoiseConfig

    sched = json.loads((SD2_V.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    cfg = NoiseConfig(noise_offset=0.1, adaptive_noise_scale=0.05, multires_noise_iterations=3, ip_noise_gamma=0.1)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(20))
    outs = []
    for device in ("cpu", DEVICE.type):
        obj = DiffusionObjective(sched, cfg, LossConfig(prediction_type="v_prediction"))
        noise, t, noisy = obj.noise_batch(latents.to(device), torch.Generator().manual_seed(21))
        outs.append([x.cpu() for x in (noise, t, noisy)])
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*outs))
    return {"check": "noise_cpu_vs_device", "max_abs_diff": diff, "ok": diff < 1e-4}


# ---------------------------------------------------------------- the list

def checks(workspace: Path) -> list:
    """(name, check) in the order they run."""
    runs = {
        "bf16": ("--mixed_precision", "bf16"),
        "fp16_grad_scaler": ("--mixed_precision", "fp16"),
        "full_fp16": ("--mixed_precision", "fp16", "--full_fp16"),
        "full_bf16": ("--mixed_precision", "bf16", "--full_bf16"),
        "xformers": ("--mixed_precision", "fp16", "--xformers"),
        "mem_eff_attn": ("--mixed_precision", "bf16", "--mem_eff_attn"),
        "adamw8bit": ("--mixed_precision", "bf16", "--optimizer_type", "AdamW8bit"),
        "lion8bit": ("--mixed_precision", "bf16", "--optimizer_type", "Lion8bit"),
    }
    extra = {"fp16_grad_scaler": scaler_check}
    return [("noise_cpu_vs_device", noise_same_on_cpu_and_device),
            ("attention_backends", attention_backends),
            *[(name, functools.partial(training_check, name, workspace, *flags, extra=extra.get(name)))
              for name, flags in runs.items()],
            ("vae_cache_fp16", functools.partial(vae_cache_fp16, workspace)),
            ("hypernetwork_xformers", functools.partial(hypernetwork_training, workspace)),
            ("fsdp2", functools.partial(fsdp_training, workspace))]


def hypernetwork_training(workspace: Path) -> dict:
    """Hypernetwork training with --xformers: the hypernetwork file changes, the U-Net does not."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        trainer, result = train(workspace, out, "--mixed_precision", "fp16", "--xformers",
                                "--hypernetwork_module", "hypernetwork_nai")
        saved = sorted(out.glob("*.pt"))
        base = _base_unet(workspace)  # the frozen U-Net trains in the compute dtype: compare in that
        unet_same = all(torch.equal(base[k].to(v.dtype), v.cpu())
                        for k, v in trainer.data.model.unet.state_dict().items())
    finite = all(math.isfinite(x) for x in result.losses)
    return {"check": "hypernetwork_xformers", "ok": finite and bool(saved) and unet_same and result.steps == 4,
            "losses_finite": finite, "saved": [p.name for p in saved], "unet_unchanged": unet_same}


def fsdp_training(workspace: Path) -> dict:
    """One-process FSDP2 under accelerate launch (a subprocess: accelerate picks FSDP only from a launch
    on a GPU): 4 steps with a sample at step 2 and a sharded state, then a resume to step 6."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        (Path(tmp) / "prompts.txt").write_text("a red square --w 64 --h 64 --s 4 --d 1\n")
        common = ["train", "--pretrained_model_name_or_path", str(workspace / "model"),
                  "--train_data_dir", str(workspace / "data"), "--in_json", str(workspace / "meta.json"),
                  "--output_dir", str(out), "--output_name", "check", "--save_model_as", "safetensors",
                  "--save_precision", "float", "--resolution", "64", "--train_batch_size", "2",
                  "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--max_data_loader_n_workers", "0",
                  "--seed", "7", "--mixed_precision", "bf16", "--save_state", "--save_every_n_steps", "4"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                  "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "29581", "-m", "sdtune"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        first = subprocess.run([*launch, *common, "--max_train_steps", "4", "--sample_prompts",
                                str(Path(tmp) / "prompts.txt"), "--sample_every_n_steps", "2"],
                               capture_output=True, text=True, env=env, timeout=600)
        if DEVICE.type != "cuda":  # accelerate runs FSDP on GPUs only: the launch must be refused, in one line
            refused = "accelerate runs FSDP on CUDA GPUs only" in first.stderr + first.stdout
            return {"check": "fsdp2", "ok": refused and first.returncode != 0, "refused_on_cpu": refused}
        states = sorted(p.name for p in out.glob("*state*"))
        sharded = any((out / s / "pytorch_model_fsdp_0" / ".metadata").is_file() for s in states)
        samples = sorted(p.name for p in (out / "sample").glob("*.png")) if (out / "sample").is_dir() else []
        second = subprocess.run([*launch, *common, "--max_train_steps", "6", "--resume", str(out / states[-1])]
                                if states else ["false"], capture_output=True, text=True, env=env, timeout=600)
        changed = first.returncode == 0 and _unet_changed(workspace, out, ())
    ok = first.returncode == 0 and second.returncode == 0 and sharded and bool(samples) and changed
    return {"check": "fsdp2", "ok": ok, "states": states, "sharded_state": sharded, "samples": samples,
            "unet_changed": changed, "resumed": second.returncode == 0,
            "stderr_tail": "" if ok else (first.stderr[-800:] + second.stderr[-800:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the checks on the CPU (no CUDA needed)")
    args = parser.parse_args(argv)
    if DEVICE.type != "cuda" and not args.cpu_smoke:
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    from sdtune.errors import UserError
    from sdtune.testing import write_training_workspace

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        workspace = write_training_workspace(Path(tmp) / "ws", n=4)
        for name, check in checks(workspace):
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
                    row = check()
            except UserError as exc:
                row = {"check": name, "ok": False, "refused": str(exc)}
            except Exception as exc:  # noqa: BLE001 - report and go on: one broken check must not hide the others
                row = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400],
                       "trace": traceback.format_exc()[-1500:]}
            row.update(device=DEVICE.type, seconds=round(time.perf_counter() - start, 1))
            failed += not row["ok"]
            print(json.dumps(row, default=str), flush=True)
    print(json.dumps({"summary": {"checks_failed": failed, "device": DEVICE.type}}))
    return 1 if failed and DEVICE.type == "cuda" else 0


if __name__ == "__main__":
    sys.exit(main())
