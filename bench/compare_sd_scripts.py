"""Compare sdtune with sd-scripts' own functions on identical inputs (a tool, not a test).

    PYTHONPATH=src python bench/compare_sd_scripts.py [--kohya-python /work/kohya/venv-kohya/bin/python]
        [--sd-scripts /work/kohya/sd-scripts] [--extra-kohya-path DIR] [--json report.json]

Two processes, because the two need different libraries: this one (sdtune's venv) writes the inputs
and computes sdtune's side; bench/sd_scripts_side.py runs in sd-scripts' venv (transformers 4, ftfy)
and calls sd-scripts' functions. Compared:

* token ids (SdTokenizeStrategy, SD1 and SD2 tokenizer, max_token_length 75/150/225): Unicode
  captions, random Unicode captions, one caption of every content length 0..230, weighted captions;
* text-encoder states (SdTextEncodingStrategy, clip skip) of a tiny random CLIP, same weights;
* bucket lists (make_bucket_resolutions, min/max adjustment), bucket choice and resize
  (BucketManager.select_bucket) for random image sizes, with and without upscaling and without
  bucketing, and the crop (trim_and_resize_if_required);
* noise (get_noise_noisy_latents_and_timesteps with offset, adaptive, multires and input-perturbation
  noise, the same random draws replayed), the v target, the SNR table, zero terminal SNR, and the
  loss (conditional_loss, Huber schedules, min-SNR, v-pred scaling, debiased estimation).

Every difference found is printed with the reason docs/sd-scripts-differences.md gives, or flagged
UNEXPECTED. Exit status 1 when anything unexpected differs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sdtune.train.noise as noise_mod
from sdtune.data.buckets import BucketRule, adjust_limits, crop_box, make_buckets
from sdtune.families import FAMILIES
from sdtune.testing import tiny_config
from sdtune.text.tokens import ChunkedTokenizer, TokenBatch

HERE = Path(__file__).resolve().parent
LENGTHS = (75, 150, 225)
FIXED_CAPTIONS = [
    "a photo of a cat", "“Curly” ‘quotes’ don’t matter", "a ﬁne ﬂower ﬀ", "ＡＢＣ\u3000ｆｕｌｌ－ｗｉｄｔｈ １２３",
    "cats &amp; dogs &quot;hi&quot; &lt;3 &#39;x&#39;", "emoji 🐱🔥 ❤️ 👍🏽 cat", "café naïve résumé Ångström",
    "日本語のテキスト 中文 한국어", "a  b\t\tc\n\nd \u3000 e", "<3 &amp; love", "&amp;amp; twice",
    "mojibake cafÃ© â€œquotesâ€\u009d", "Ünïcödé ÀÉÎÕÜ İstanbul Straße ǅ", "x\u00a0y\u2009z", "It's a dog's LIFE, isn't it?",
    "", "   ", "1girl, solo, long_hair, (smile), [blue eyes]", "<|endoftext|> inside", "Hello, world!! wow!",
]
SWEEP_WORDS = ["cat", "ﬁne", "ＲＥＤ", "&amp;", "dog", "café", "“", "sky"]  # one token each after cleaning
POOL = (["cat", "Dog", "RED", "naïve", "über", "'s", "don't", "42", "ﬁ", "ﬂ", "Ａ", "ｂ", "１", "“", "”", "‘", "’",
         "&amp;", "&quot;", "&#39;", "&lt;", "🐱", "❤️", "👍🏽", "日本", "中文", "한국", "Ωμέγα", "Straße", "...", "—", "?",
         ",", "(", ")", "_", "\u00a0", "\u3000", "\t", "\n"] + [" "] * 12)
WEIGHTED = ["a (red:1.3) cat", "((ﬁne)) [dog] “x”", "\\(literal\\) (a [b] c:0.8)", "(unbalanced ＡＢＣ",
            ", ".join(["(cat:1.2)", "[dog]", "sky"] * 30), "(" + " ".join(["word"] * 160) + ":1.1) tail"]


def _captions(rng: random.Random) -> tuple[list[str], int]:
    sweep = {n: " ".join(SWEEP_WORDS[i % len(SWEEP_WORDS)] for i in range(n)) for n in range(231)}
    encoded = [0, 1, 2, 37, 74, 75, 76, 77, 100, 149, 150, 151, 152, 200, 224, 225, 226, 230]
    rand = ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 40))) for _ in range(150)]
    rand += [c + "!" * rng.randint(1, 3) + " wow" for c in rand[:20]]  # SD2's "!" rule
    head = FIXED_CAPTIONS + [sweep[n] for n in encoded]
    return head + [sweep[n] for n in range(231) if n not in encoded] + rand, len(head)


def _image_sizes(rng: random.Random, n: int) -> list[list[int]]:
    sizes = [[1366, 768], [768, 1366], [1920, 1080], [1025, 1024], [1357, 2944], [512, 512], [640, 384], [300, 200],
             [5000, 200], [64, 2000], [2299, 1000], [1000, 1000]]
    while len(sizes) < n:
        aspect = math.exp(rng.uniform(-1.6, 1.6))
        area = rng.uniform(64 * 64, 3000 * 3000)
        sizes.append([max(16, round(math.sqrt(area * aspect))), max(16, round(math.sqrt(area / aspect)))])
    return sizes


def _noise_cases(latents):
    base = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                multires_noise_iterations=None, multires_noise_discount=None, min_timestep=None, max_timestep=None,
                ip_noise_gamma=None, ip_noise_gamma_random_strength=False)
    variants = {
        "plain": {}, "offset": dict(noise_offset=0.1),
        "offset_random_adaptive": dict(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05),
        "multires": dict(multires_noise_iterations=6, multires_noise_discount=0.3),
        "offset_multires": dict(noise_offset=0.05, multires_noise_iterations=4, multires_noise_discount=0.5),
        "ip_gamma": dict(ip_noise_gamma=0.1), "ip_gamma_random": dict(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True),
        "timestep_range": dict(min_timestep=100, max_timestep=900), "fixed_timestep": dict(min_timestep=500, max_timestep=500),
    }
    return {name: {**base, **v} for name, v in variants.items()}


def _record_noise(args: dict, latents, seed: int, tensors: dict, name: str):
    """sdtune's noise for `args`, recording every random draw (kind, tensor key or value) in order."""
    draws = []
    real_randn, real_rand, real_t = noise_mod._randn, noise_mod._rand, noise_mod.sample_timesteps

    def randn(shape, generator, like):
        x = real_randn(shape, generator, like)
        key = f"draw/{name}/{len(draws)}"
        tensors[key] = x.clone()
        draws.append(["randn", key, None])
        return x

    def rand(generator):
        u = real_rand(generator)
        draws.append(["rand", None, u])
        return u

    def timesteps(*a, **k):
        t = real_t(*a, **k)
        if args["min_timestep"] is None or args["min_timestep"] != args["max_timestep"]:  # else no draw
            key = f"draw/{name}/{len(draws)}"
            tensors[key] = t.clone()
            draws.append(["randint", key, None])
        return t

    cfg = noise_mod.NoiseConfig.from_options(argparse.Namespace(**args))
    objective = noise_mod.DiffusionObjective(_scheduler_config(), cfg, noise_mod.LossConfig())
    noise_mod._randn, noise_mod._rand, noise_mod.sample_timesteps = randn, rand, timesteps
    try:
        out = objective.noise_batch(latents.clone(), torch.Generator().manual_seed(seed))
    finally:
        noise_mod._randn, noise_mod._rand, noise_mod.sample_timesteps = real_randn, real_rand, real_t
    return draws, out, objective


def _scheduler_config():
    return json.loads((FAMILIES["sd1"].asset_dir / "scheduler" / "scheduler_config.json").read_text())


def _loss_cases():
    plain = dict(loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0, min_snr_gamma=None,
                 scale_v_pred_loss_like_noise_pred=False, debiased_estimation_loss=False, v_parameterization=False,
                 zero_terminal_snr=False)
    cases = {}
    for loss_type in ("l2", "l1", "huber", "smooth_l1"):
        schedules = ("constant", "exponential", "snr") if loss_type in ("huber", "smooth_l1") else ("snr",)
        for schedule in schedules:
            for scale in ((1.0, 1.5) if loss_type in ("huber", "smooth_l1") else (1.0,)):
                cases[f"{loss_type}_{schedule}_{scale}"] = {**plain, "loss_type": loss_type, "huber_schedule": schedule,
                                                             "huber_scale": scale}
    for v in (False, True):
        p = "v" if v else "eps"
        cases[f"minsnr5_{p}"] = {**plain, "min_snr_gamma": 5.0, "v_parameterization": v}
        cases[f"debiased_{p}"] = {**plain, "debiased_estimation_loss": True, "v_parameterization": v}
        cases[f"minsnr5_debiased_{p}"] = {**plain, "min_snr_gamma": 5.0, "debiased_estimation_loss": True,
                                          "v_parameterization": v}
        cases[f"ztsnr_minsnr5_{p}"] = {**plain, "min_snr_gamma": 5.0, "v_parameterization": v, "zero_terminal_snr": True}
    cases["scale_v"] = {**plain, "scale_v_pred_loss_like_noise_pred": True, "v_parameterization": True}
    cases["scale_v_huber_exp"] = {**plain, "scale_v_pred_loss_like_noise_pred": True, "v_parameterization": True,
                                  "loss_type": "huber", "huber_schedule": "exponential"}
    return cases


def _sdtune_loss(case: dict, pred, target, t):
    ns = argparse.Namespace(**{k: v for k, v in case.items() if k not in ("v_parameterization",)})
    prediction = "v_prediction" if case["v_parameterization"] else "epsilon"
    if case["loss_type"] not in ("huber", "smooth_l1"):
        for k in ("huber_schedule", "huber_c", "huber_scale"):
            setattr(ns, k, None)
    objective = noise_mod.DiffusionObjective.from_options(ns, _scheduler_config(), prediction)
    return objective.per_sample_loss(pred, target, t)


# Differences that docs/sd-scripts-differences.md names; any other is UNEXPECTED.
EXPECTED = {
    "sd2_exclamation": "SD2: sd-scripts turns a caption's '!' into the pad id 0; sdtune keeps OpenCLIP's word '!' (256)",
    "bucket_choice": "bucket choice: sdtune uses the closest log aspect ratio, sd-scripts the raw ratio difference",
    "huber_snr_scale": "--huber_scale with the snr schedule: sd-scripts ignores it, sdtune applies it",
    "ztsnr_snr": "zero terminal SNR: sd-scripts weights with the SNR of the original betas, sdtune of the rescaled ones",
}


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.unexpected = 0
        self.data: dict = {}

    def ok(self, what: str, detail: str = ""):
        self.lines.append(f"AGREE      {what}{': ' + detail if detail else ''}")

    def expected(self, what: str, reason_key: str, detail: str = ""):
        self.lines.append(f"DIFFERENT  {what}{': ' + detail if detail else ''} [documented: {EXPECTED[reason_key]}]")

    def bad(self, what: str, detail: str):
        self.unexpected += 1
        self.lines.append(f"UNEXPECTED {what}: {detail}")


def _compare_tokens(report, inp, kohya, k_tensors, chunkers, captions):
    bang = [i for i, c in enumerate(captions) if "!" in c]
    for family in ("sd1", "sd2"):
        for length in LENGTHS:
            ours = chunkers[(family, length, False)](captions).ids
            theirs = k_tensors[f"ids/{family}/{length}"].long()
            rows = [i for i in range(len(captions)) if not torch.equal(ours[i], theirs[i])]
            if family == "sd2" and set(rows) <= set(bang):
                if rows:
                    report.expected(f"ids {family} {length}: {len(captions) - len(rows)}/{len(captions)} captions",
                                    "sd2_exclamation", f"{len(rows)} captions with '!'")
                else:
                    report.ok(f"ids {family} {length}", f"{len(captions)} captions")
            elif rows:
                report.bad(f"ids {family} {length}", f"{len(rows)} captions differ, e.g. {captions[rows[0]]!r}")
            else:
                report.ok(f"ids {family} {length}", f"{len(captions)} captions")
            w = chunkers[(family, length, True)](inp["weighted_captions"])
            w_ids, w_w = k_tensors[f"wids/{family}/{length}"].long(), k_tensors[f"weights/{family}/{length}"]
            if torch.equal(w.ids, w_ids) and torch.allclose(w.weights, w_w, atol=1e-6):
                report.ok(f"weighted ids and weights {family} {length}", f"{len(inp['weighted_captions'])} captions")
            else:
                report.bad(f"weighted {family} {length}", "ids or weights differ")
    here = kohya.get("sdtune_here", {})
    if "skipped" in here:
        report.lines.append(f"SKIPPED    sdtune under sd-scripts' transformers: {here['skipped']}")
        return
    for family in ("sd1", "sd2"):
        same = all(torch.equal(chunkers[(family, n, False)](captions).ids, torch.tensor(here[f"{family}/{n}"]))
                   for n in LENGTHS)
        what = (f"sdtune ids under transformers {here['transformers']} ({here[f'{family}/class']}) vs "
                f"{__import__('transformers').__version__}, {family}")
        (report.ok(what, "identical, every length") if same else report.bad(what, "ids depend on the version"))


def _compare_states(report, inp, k_tensors, encoders, captions, n_enc):
    from sdtune.text.encode import TextConditioner

    for family in ("sd1", "sd2"):
        tok = chunkers_tok[family]
        for length in LENGTHS:
            ids = k_tensors[f"ids/{family}/{length}"].long()[:n_enc]
            for skip in inp["kohya_clip_skips"]:
                ours_skip = skip if family == "sd1" or skip is None else skip + 1  # SD2: counted on the full tower
                cond = TextConditioner(tok, encoders[family], FAMILIES[family], max_token_length=length, clip_skip=ours_skip)
                with torch.no_grad():
                    ours = cond.encode(TokenBatch(ids, None, [0] * n_enc))
                theirs = k_tensors[f"states/{family}/{length}/{skip}"]
                diff = float((ours - theirs).abs().max())
                what = f"encoder states {family} {length} sd-scripts clip_skip {skip} = sdtune {ours_skip}"
                (report.ok(what, f"max |diff| {diff:.1e}") if diff < 1e-4 else report.bad(what, f"max |diff| {diff}"))


def _bucket_inputs(rng):
    lists = [[[r, r], lo, hi, st] for r in (512, 768, 1024) for lo, hi, st in ((256, 1024, 64), (256, 2048, 64),
                                                                               (320, 1536, 32), (300, 1100, 64))]
    lists += [[[640, 448], 256, 1024, 64], [[512, 768], 128, 2048, 16]]
    cases = []
    sizes = _image_sizes(rng, 1500)
    for reso, lo, hi, step in ([[512, 512], 256, 1024, 64], [[768, 768], 256, 1024, 64], [[640, 448], 256, 1024, 32]):
        for mode in ("upscale", "no_upscale", "fixed"):
            rule = BucketRule(tuple(reso), enable_bucket=mode != "fixed", min_size=lo, max_size=hi, step=step,
                              no_upscale=mode == "no_upscale")
            assigned = [rule.assign(tuple(s)) for s in sizes]
            keep = [i for i, a in enumerate(assigned) if a is not None]
            cases.append({"reso": reso, "min": lo, "max": hi, "step": step, "mode": mode,
                          "sizes": [sizes[i] for i in keep], "sdtune_buckets": [list(assigned[i][0]) for i in keep],
                          "sdtune_resized": [list(assigned[i][1]) for i in keep]})
    crops = [[list(r), list(b)] for c in cases[:3] for b, r in zip(c["sdtune_buckets"][:150], c["sdtune_resized"][:150])]
    return lists, cases, crops


def _compare_buckets(report, inp, kohya):
    for (reso, lo, hi, step), theirs in zip(inp["bucket_lists"], kohya["bucket_lists"]):
        lo2, hi2 = adjust_limits(lo, hi, step)
        ours = sorted(map(list, make_buckets(tuple(reso), lo2, hi2, step)))
        what = f"bucket list {reso} min {lo} max {hi} step {step}"
        if [lo2, hi2] == theirs["limits"] and ours == theirs["buckets"]:
            report.ok(what, f"{len(ours)} buckets, limits {lo2}..{hi2}")
        else:
            report.bad(what, f"limits {[lo2, hi2]} vs {theirs['limits']}, buckets differ")
    for case, theirs in zip(inp["bucket_cases"], kohya["bucket_choices"]):
        what = f"{case['mode']} {case['reso']} step {case['step']}, {len(theirs)} image sizes"
        same_bucket = [i for i, t in enumerate(theirs) if t[0] == case["sdtune_buckets"][i]]
        # upscale mode: sd-scripts' resize for sdtune's bucket; otherwise its own bucket and resize
        col = 2 if case["mode"] == "upscale" else 1
        resize_ok = all(t[col] == case["sdtune_resized"][i] for i, t in enumerate(theirs))
        if not resize_ok:
            bad = next(i for i, t in enumerate(theirs) if t[col] != case["sdtune_resized"][i])
            report.bad(what + ": resize", f"size {case['sizes'][bad]} -> sdtune {case['sdtune_resized'][bad]}, "
                                          f"sd-scripts {theirs[bad][col]} for bucket {case['sdtune_buckets'][bad]}")
        elif len(same_bucket) == len(theirs):
            report.ok(what, "same bucket and resize for every size")
        elif case["mode"] == "upscale":
            # every disagreement must be sdtune picking the log-closer bucket
            def log_error(bucket, size):
                return abs(math.log(bucket[0] / bucket[1] * size[1] / size[0]))

            worse = [i for i, t in enumerate(theirs) if i not in same_bucket and
                     log_error(case["sdtune_buckets"][i], case["sizes"][i]) > log_error(t[0], case["sizes"][i]) + 1e-12]
            if worse:
                report.bad(what, f"{len(worse)} sizes where sdtune's bucket is not log-closer")
            else:
                report.expected(what + f": same bucket for {len(same_bucket)}", "bucket_choice",
                                f"{len(theirs) - len(same_bucket)} log-closer; resize equal to sd-scripts' "
                                "for every chosen bucket")
        else:
            report.bad(what, f"{len(theirs) - len(same_bucket)} sizes in another bucket")
    crops_ok = all(list(crop_box(tuple(r), tuple(b))[:2]) == c[:2] and c[2] == [b[1], b[0]]
                   for (r, b), c in zip(inp["crop_cases"], kohya["crops"]))
    (report.ok("centre crop", f"{len(inp['crop_cases'])} cases") if crops_ok else report.bad("centre crop", "offsets differ"))


def _compare_noise(report, inp, k_tensors, sdtune_noise):
    from sdtune.train.noise import snr_table

    objective = noise_mod.DiffusionObjective(_scheduler_config(), noise_mod.NoiseConfig(), noise_mod.LossConfig())
    snr = snr_table(objective.scheduler)
    d = float(((snr - k_tensors["sched/all_snr"]) / k_tensors["sched/all_snr"]).abs().max())
    (report.ok("SNR table", f"max rel diff {d:.1e}") if d < 1e-5 else report.bad("SNR table", f"max rel diff {d}"))
    zt = noise_mod.prepare_scheduler(_scheduler_config(), "v_prediction", True).alphas_cumprod.float()
    d = float((zt - k_tensors["sched/abar_ztsnr"]).abs().max())
    (report.ok("zero-terminal-SNR alphas_cumprod", f"max |diff| {d:.1e}") if d < 1e-5
     else report.bad("zero-terminal-SNR alphas_cumprod", f"max |diff| {d}"))
    for name, (noise, t, noisy, v) in sdtune_noise.items():
        parts = {"noise": (noise, k_tensors[f"noise/{name}/noise"]), "noisy": (noisy, k_tensors[f"noise/{name}/noisy"]),
                 "v": (v, k_tensors[f"noise/{name}/v"])}
        diffs = {k: float((a - b).abs().max()) for k, (a, b) in parts.items()}
        same_t = torch.equal(t.long(), k_tensors[f"noise/{name}/t"].long())
        if same_t and max(diffs.values()) < 1e-5:
            report.ok(f"noise {name}", ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        else:
            report.bad(f"noise {name}", f"timesteps equal: {same_t}, diffs {diffs}")


def _compare_loss(report, inp, k_tensors, pred, target, t):
    for name, case in inp["loss_cases"].items():
        ours = _sdtune_loss(case, pred, target, t)
        theirs = k_tensors[f"loss/{name}"]
        finite = torch.isfinite(theirs) & torch.isfinite(ours)
        rel = float(((ours - theirs).abs() / theirs.abs().clamp(min=1e-12))[finite].max()) if finite.any() else 0.0
        if rel < 1e-4 and bool((torch.isfinite(theirs) == torch.isfinite(ours)).all()):
            report.ok(f"loss {name}", f"max rel diff {rel:.1e}")
        elif case["loss_type"] in ("huber", "smooth_l1") and case["huber_schedule"] == "snr" and case["huber_scale"] != 1:
            report.expected(f"loss {name}", "huber_snr_scale", f"ratio {float((ours / theirs).mean()):.3f}")
        elif case["zero_terminal_snr"]:
            report.expected(f"loss {name}", "ztsnr_snr", f"max rel diff {rel:.2e}")
        else:
            report.bad(f"loss {name}", f"max rel diff {rel}, ours {ours.tolist()}, sd-scripts {theirs.tolist()}")


chunkers_tok: dict = {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kohya-python", default="/work/kohya/venv-kohya/bin/python")
    p.add_argument("--sd-scripts", default="/work/kohya/sd-scripts")
    p.add_argument("--extra-kohya-path", default=None, help="prepended to sdtune's src on sd-scripts' PYTHONPATH "
                   "(e.g. a folder with pydantic), to also run sdtune's tokenizer under transformers 4")
    p.add_argument("--work", default=None, help="keep the inputs and outputs here")
    p.add_argument("--json", default=None, help="write the report lines here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="sdtune-vs-sd-scripts-"))
    work.mkdir(parents=True, exist_ok=True)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    for family, name in (("sd1", "openai_clip-vit-large-patch14"), ("sd2", "stabilityai_stable-diffusion-2")):
        dest = work / "tokenizers" / name
        if not dest.exists():
            shutil.copytree(FAMILIES[family].asset_dir / "tokenizer", dest)
        chunkers_tok[family] = CLIPTokenizer.from_pretrained(FAMILIES[family].asset_dir / "tokenizer")

    captions, n_enc = _captions(rng)
    tensors: dict[str, torch.Tensor] = {}
    encoders, configs = {}, {}
    for family in ("sd1", "sd2"):
        cfg = tiny_config(FAMILIES[family], "text_encoder")
        cfg = {k: v for k, v in cfg.items()
               if not k.startswith("_") and k not in ("architectures", "model_type", "transformers_version")}
        configs[family] = cfg
        encoders[family] = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
        for k, v in encoders[family].state_dict().items():
            tensors[f"te/{family}/{k}"] = v.detach().clone().contiguous()
    lists, cases, crops = _bucket_inputs(rng)
    latents = torch.randn(3, 4, 16, 24)
    tensors["noise/latents"] = latents
    noise_cases, sdtune_noise = {}, {}
    for i, (name, a) in enumerate(_noise_cases(latents).items()):
        draws, (noise, t, noisy), objective = _record_noise(a, latents, 100 + i, tensors, name)
        noise_cases[name] = {"args": a, "draws": draws}
        sdtune_noise[name] = (noise, t, noisy, objective.scheduler.get_velocity(latents, noise, t))
    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    tensors.update({"loss/pred": pred, "loss/target": target, "loss/t": t})
    inp = {"captions": captions, "lengths": list(LENGTHS), "weighted_captions": WEIGHTED, "encoder_captions": n_enc,
           "encoder_configs": configs, "kohya_clip_skips": [None, 1, 2], "bucket_lists": lists, "bucket_cases": cases,
           "crop_cases": crops, "noise_cases": noise_cases, "loss_cases": _loss_cases()}
    (work / "inputs.json").write_text(json.dumps(inp), encoding="utf-8")
    save_file(tensors, str(work / "inputs.safetensors"))

    env_path = [str(HERE.parent / "src")] + ([args.extra_kohya_path] if args.extra_kohya_path else [])
    env = {"PYTHONPATH": ":".join(env_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(work)}
    with open(work / "sd_scripts_side.log", "w") as log:
        done = subprocess.run([args.kohya_python, str(HERE / "sd_scripts_side.py"), str(work), args.sd_scripts],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        print((work / "sd_scripts_side.log").read_text()[-4000:])
        print(f"the sd-scripts side failed (exit {done.returncode}); its log: {work / 'sd_scripts_side.log'}")
        return 2
    kohya = json.loads((work / "kohya.json").read_text(encoding="utf-8"))
    k_tensors = load_file(str(work / "kohya.safetensors"))

    chunkers = {(f, n, w): ChunkedTokenizer(chunkers_tok[f], FAMILIES[f], n, w) for f in ("sd1", "sd2") for n in LENGTHS
                for w in (False, True)}
    lengths = sorted(set(chunkers[("sd1", 75, False)](captions).lengths))
    report = Report()
    report.lines.append(f"sd-scripts side: {kohya['versions']}; sdtune side: transformers "
                        f"{__import__('transformers').__version__}, torch {torch.__version__}")
    report.lines.append(f"{len(captions)} captions, content lengths {lengths[0]}..{lengths[-1]} "
                        f"({len(lengths)} distinct), {sum('!' in c for c in captions)} with '!'")
    _compare_tokens(report, inp, kohya, k_tensors, chunkers, captions)
    _compare_states(report, inp, k_tensors, encoders, captions, n_enc)
    _compare_buckets(report, inp, kohya)
    _compare_noise(report, inp, k_tensors, sdtune_noise)
    _compare_loss(report, inp, k_tensors, pred, target, t)
    print("\n".join(report.lines))
    print(f"\n{report.unexpected} unexpected difference(s); inputs and outputs in {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": report.lines, "unexpected": report.unexpected}, indent=1))
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
