"""The sd-scripts half of bench/compare_sd_scripts.py; runs in sd-scripts' own venv.

    <sd-scripts venv>/bin/python bench/sd_scripts_side.py WORK_DIR SD_SCRIPTS_DIR

Reads WORK_DIR/inputs.json and WORK_DIR/inputs.safetensors (written by compare_sd_scripts.py), calls
sd-scripts' own functions on them and writes WORK_DIR/kohya.json and WORK_DIR/kohya.safetensors.
Nothing here re-implements sd-scripts: every number comes from its library. Random draws are replayed
from the sdtune side so both compute from the same random numbers.

When sdtune's source is on PYTHONPATH (with its dependencies), sdtune's tokenizer is also run here,
under this venv's transformers 4 (Python CLIPTokenizer), to show its ids do not depend on the version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _tokens(inp, out, tensors, work: Path):
    from library.strategy_sd import SdTokenizeStrategy

    cache = work / "tokenizers"
    for family in ("sd1", "sd2"):
        for length in inp["lengths"]:
            strategy = SdTokenizeStrategy(family == "sd2", length, tokenizer_cache_dir=str(cache))
            ids = strategy.tokenize(inp["captions"])[0]
            tensors[f"ids/{family}/{length}"] = ids.reshape(len(inp["captions"]), -1, 77).contiguous()
            w_ids, w = strategy.tokenize_with_weights(inp["weighted_captions"])
            n = len(inp["weighted_captions"])
            tensors[f"wids/{family}/{length}"] = w_ids[0].reshape(n, -1, 77).contiguous()
            tensors[f"weights/{family}/{length}"] = w[0].reshape(n, -1, 77).float().contiguous()
    return strategy


def _encoder_states(inp, tensors, work: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy

    cache = work / "tokenizers"
    states = load_file(str(work / "inputs.safetensors"))
    for family in ("sd1", "sd2"):
        config = CLIPTextConfig(**inp["encoder_configs"][family])
        model = CLIPTextModel(config).eval()
        weights = {k[len(f"te/{family}/"):]: v for k, v in states.items() if k.startswith(f"te/{family}/")}
        # transformers 5 names the keys without the "text_model." that transformers 4 expects
        weights = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any("position_ids" not in k for k in missing):
            raise SystemExit(f"tiny encoder did not load: missing {missing}, unexpected {unexpected}")
        n = inp["encoder_captions"]
        for length in inp["lengths"]:
            strategy = SdTokenizeStrategy(family == "sd2", length, tokenizer_cache_dir=str(cache))
            ids = tensors[f"ids/{family}/{length}"][:n]
            for skip in inp["kohya_clip_skips"]:
                with torch.no_grad():
                    hidden = SdTextEncodingStrategy(skip).encode_tokens(strategy, [model], [ids])[0]
                tensors[f"states/{family}/{length}/{skip}"] = hidden.float().contiguous()


def _buckets(inp, out):
    from library import model_util, train_util

    lists = []
    for case in inp["bucket_lists"]:
        reso, lo, hi, step = case
        lo2, hi2 = train_util.BaseDataset.adjust_min_max_bucket_reso_by_steps(None, tuple(reso), lo, hi, step)
        resos = model_util.make_bucket_resolutions(tuple(reso), lo2, hi2, step)
        lists.append({"limits": [lo2, hi2], "buckets": sorted(map(list, resos))})
    out["bucket_lists"] = lists

    choices = []
    for case in inp["bucket_cases"]:
        reso, lo, hi, step, mode = case["reso"], case["min"], case["max"], case["step"], case["mode"]
        if mode == "fixed":  # no --enable_bucket: one predefined bucket, as sd-scripts' make_buckets does
            manager = train_util.BucketManager(False, tuple(reso), None, None, None)
            manager.set_predefined_resos([tuple(reso)])
        else:
            manager = train_util.BucketManager(mode == "no_upscale", tuple(reso), lo, hi, step)
            if mode == "upscale":
                manager.make_buckets()
        result = []
        for (w, h), ours in zip(case["sizes"], case["sdtune_buckets"]):
            bucket, resized, _ = manager.select_bucket(w, h)
            # sd-scripts' resize for the bucket sdtune chose (which can differ by the aspect rule)
            single = train_util.BucketManager(False, tuple(reso), None, None, None)
            single.set_predefined_resos([tuple(ours)])
            _, resized_for_ours, _ = single.select_bucket(w, h)
            result.append([list(bucket), list(resized), list(resized_for_ours)])
        choices.append(result)
    out["bucket_choices"] = choices

    crops = []
    for (rw, rh), (bw, bh) in inp["crop_cases"]:
        # an image already at its resized size, each pixel holding x + 100000 * y: the first pixel
        # of sd-scripts' trimmed image tells where its crop starts
        image = np.arange(rw, dtype=np.float64)[None, :] + 1e5 * np.arange(rh, dtype=np.float64)[:, None]
        trimmed, _, _ = train_util.trim_and_resize_if_required(False, image, (bw, bh), (rw, rh))
        first = int(trimmed[0, 0])
        crops.append([first % 100000, first // 100000, list(trimmed.shape)])
    out["crops"] = crops


class _Replay:
    """Serves the random draws recorded on the sdtune side, in order, checking their kind."""

    def __init__(self, draws, tensors):
        self.draws = [(kind, tensors[key] if key else value) for kind, key, value in draws]

    def pop(self, kind):
        got, value = self.draws.pop(0)
        if got != kind:
            raise SystemExit(f"draw order differs: sd-scripts asks for {kind}, sdtune drew {got}")
        return value

    def __enter__(self):
        self.saved = (torch.randn, torch.randn_like, torch.rand, torch.randint, random.random)
        torch.randn = lambda *a, **k: self.pop("randn").clone()
        torch.randn_like = lambda x, **k: self.pop("randn").clone().to(x.dtype)
        torch.rand = lambda *a, **k: torch.tensor([self.pop("rand")], dtype=torch.float32)
        torch.randint = lambda *a, **k: self.pop("randint").clone()
        random.random = lambda: float(self.pop("rand"))
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like, torch.rand, torch.randint, random.random = self.saved
        if not exc[0] and self.draws:
            raise SystemExit(f"sd-scripts used fewer draws than sdtune made: {len(self.draws)} left")


def _scheduler(zero_terminal_snr=False):
    from diffusers import DDPMScheduler

    from library import custom_train_functions as ctf

    # fine_tune.py's scheduler and preparation, in its order
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False)
    ctf.prepare_scheduler_for_custom_training(s, "cpu")
    if zero_terminal_snr:
        ctf.fix_noise_scheduler_betas_for_zero_terminal_snr(s)
    return s


def _noise_and_loss(inp, out, tensors):
    from library import custom_train_functions as ctf
    from library import train_util

    given = load_file(str(Path(inp["work"]) / "inputs.safetensors"))
    s = _scheduler()
    tensors["sched/all_snr"] = s.all_snr.float().contiguous()
    tensors["sched/abar"] = s.alphas_cumprod.float().contiguous()
    tensors["sched/abar_ztsnr"] = _scheduler(True).alphas_cumprod.float().contiguous()

    latents = given["noise/latents"]
    for name, case in inp["noise_cases"].items():
        args = argparse.Namespace(**case["args"])
        with _Replay(case["draws"], given):
            noise, noisy, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, s, latents.clone())
        tensors[f"noise/{name}/noise"] = noise.contiguous()
        tensors[f"noise/{name}/noisy"] = noisy.contiguous()
        tensors[f"noise/{name}/t"] = timesteps.contiguous()
        tensors[f"noise/{name}/v"] = s.get_velocity(latents, noise, timesteps).contiguous()

    pred, target, t = given["loss/pred"], given["loss/target"], given["loss/t"]
    for name, case in inp["loss_cases"].items():
        args = argparse.Namespace(**case)
        sched = _scheduler(args.zero_terminal_snr)
        huber_c = train_util.get_huber_threshold_if_needed(args, t, sched)
        # fine_tune.py's loss, in its order
        loss = train_util.conditional_loss(pred.float(), target.float(), args.loss_type, "none", huber_c)
        loss = loss.mean([1, 2, 3])
        if args.min_snr_gamma:
            loss = ctf.apply_snr_weight(loss, t, sched, args.min_snr_gamma, args.v_parameterization)
        if args.scale_v_pred_loss_like_noise_pred:
            loss = ctf.scale_v_prediction_loss_like_noise_prediction(loss, t, sched)
        if args.debiased_estimation_loss:
            loss = ctf.apply_debiased_estimation(loss, t, sched, args.v_parameterization)
        tensors[f"loss/{name}"] = loss.float().contiguous()


def _sdtune_under_this_transformers(inp, out):
    try:
        import transformers
        from transformers import CLIPTokenizer

        from sdtune.families import FAMILIES
        from sdtune.text.tokens import ChunkedTokenizer
    except ImportError as e:
        out["sdtune_here"] = {"skipped": f"sdtune not importable here ({e})"}
        return
    result = {"transformers": transformers.__version__}
    for family in ("sd1", "sd2"):
        tok = CLIPTokenizer.from_pretrained(FAMILIES[family].asset_dir / "tokenizer")
        result[f"{family}/class"] = type(tok).__name__
        for length in inp["lengths"]:
            ids = ChunkedTokenizer(tok, FAMILIES[family], length)(inp["captions"]).ids
            result[f"{family}/{length}"] = ids.tolist()
    out["sdtune_here"] = result


def main():
    work, sd_scripts = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(sd_scripts))
    os.chdir(sd_scripts)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    inp = json.loads((work / "inputs.json").read_text(encoding="utf-8"))
    inp["work"] = str(work)
    import transformers
    import diffusers

    out = {"versions": {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
                        "torch": torch.__version__}}
    tensors: dict[str, torch.Tensor] = {}
    _tokens(inp, out, tensors, work)
    _encoder_states(inp, tensors, work)
    _buckets(inp, out)
    _noise_and_loss(inp, out, tensors)
    _sdtune_under_this_transformers(inp, out)
    save_file(tensors, str(work / "kohya.safetensors"))
    (work / "kohya.json").write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    main()
