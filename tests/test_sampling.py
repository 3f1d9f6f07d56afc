"""Sample generation (sdtune.train.sampling) and prompt files (sdtune.train.prompts).

The central checks: what the U-Net sees while sampling is exactly `TextConditioner.encode` of the
caption and of the negative (or empty) prompt, the training path; the starting noise is the seeded
generator's; and a DDIM run computed by hand in this file (betas, timesteps, eps- and v-prediction
updates written from the DDIM paper's formulas) gives the same picture as `sample_images`.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import UserError
from sdtune.train.prompts import SamplePrompt, load_prompts, parse_prompt_line, round_size
from sdtune.train.sampling import (SAMPLERS, SampleSchedule, build_scheduler, check_sampling_options,
                                   normalize_sampler, prompt_seed, sample_images, sample_tag)


# ---------------------------------------------------------------------------------------------
# prompt files


def test_txt_prompts_with_inline_options(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\n"
                 "masterpiece, a red circle --n lowres, blurry --w 640 --h 512 --s 20 --l 5.5 --d 42\n"
                 "  # indented comment\n"
                 "a blue square --D 7 --SS k_euler_a\n"
                 "plain prompt\n")
    prompts = load_prompts(f)
    assert [p.index for p in prompts] == [0, 1, 2]
    first = prompts[0]
    assert (first.prompt, first.negative_prompt, first.width, first.height, first.steps, first.scale, first.seed) == \
        ("masterpiece, a red circle", "lowres, blurry", 640, 512, 20, 5.5, 42)
    assert first.where == f"{f}:3"
    assert (prompts[1].seed, prompts[1].sampler) == (7, "euler_a")
    plain = prompts[2]
    assert (plain.negative_prompt, plain.width, plain.steps, plain.scale, plain.seed, plain.sampler) == \
        (None, None, 30, 7.5, None, None)


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown prompt option --x"),
    ("a cat --w wide", "--w expects a whole number"),
    ("a cat --l high", "--l expects a number"),
    ("a cat --g 3.5", "other model architectures"),
    ("a cat --n", "--n needs a value"),
    ("a cat --d 1 --d 2", "given twice"),
    ("a cat --ss warp", "unknown sampler"),
    ("a cat --w 0", "width must be a whole number"),
])
def test_txt_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "p.txt"
    f.write_text("# header\nfine prompt\n" + line + "\n")
    with pytest.raises(UserError) as err:
        load_prompts(f)
    assert message in str(err.value)
    assert f"{f}:3" in str(err.value)


def test_steps_are_clamped_and_sizes_rounded_like_sd_scripts():
    from sdtune.train.prompts import prompt_from_dict

    assert prompt_from_dict(parse_prompt_line("x --s 5000"), 0, "t").steps == 1000
    assert [round_size(v) for v in (512, 515, 519, 520, 8, 63, 64)] == [512, 512, 512, 520, 64, 64, 64]


def test_toml_prompts_defaults_and_overrides(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[prompt]\nnegative_prompt = "lowres"\nwidth = 768\nsample_steps = 12\nscale = 6\n\n'
                 '[[prompt.subset]]\nprompt = "a cat"\n\n'
                 '[[prompt.subset]]\nprompt = "a dog"\nwidth = 512\nseed = 3\nsample_sampler = "DPM++ 2M Karras"\n')
    a, b = load_prompts(f)
    assert (a.prompt, a.negative_prompt, a.width, a.steps, a.scale, a.seed) == ("a cat", "lowres", 768, 12, 6.0, None)
    assert (b.prompt, b.negative_prompt, b.width, b.seed, b.sampler) == ("a dog", "lowres", 512, 3, "dpm++_2m_karras")
    assert b.index == 1


@pytest.mark.parametrize("text, message", [
    ('[prompts]\nx = 1\n', "no [prompt] table"),
    ('[prompt]\nwidth = 512\n', "no [[prompt.subset]]"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nnegative = "b"\n', "unknown key 'negative'"),
    ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nsteps = 3\n', "did you mean 'sample_steps'"),
    ('[prompt]\n[[prompt.subset]]\nwidth = 512\n', "missing prompt"),
    ('[prompt\n', "not valid TOML"),
])
def test_toml_errors(tmp_path, text, message):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(UserError, match=None) as err:
        load_prompts(f)
    assert message in str(err.value) and str(f) in str(err.value)


def test_json_prompts_dicts_and_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": "a cat", "seed": 9, "scale": 3, "negative_prompt": "ugly"},
                             "a dog --w 320 --h 256"]))
    a, b = load_prompts(f)
    assert (a.prompt, a.seed, a.scale, a.negative_prompt, a.index) == ("a cat", 9, 3.0, "ugly", 0)
    assert (b.prompt, b.width, b.height, b.index) == ("a dog", 320, 256, 1)


@pytest.mark.parametrize("text, message, where", [
    ('{"prompt": "a"}', "expected a list", ""),
    ('[\n"a",\n{"prompt": 3}\n]', "prompt must be text", ": item 2"),
    ('[\n"a",\n{"prompt": "b", "seed": "x"}]', "seed must be a whole number", ": item 2"),
    ('[\n{"prompt": "b", "guidance_scale": 3}]', "other model architectures", ": item 1"),
    ('[\n"a",\n]', "not valid JSON", ":3"),
    ('[]', "holds no prompts", ""),
])
@pytest.mark.slow
def test_json_errors(tmp_path, text, message, where):
    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        load_prompts(f)
    assert message in str(err.value) and f"{f}{where}" in str(err.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "none.txt")
    (tmp_path / "p.yaml").write_text("a")
    with pytest.raises(UserError, match="unknown prompt file type"):
        load_prompts(tmp_path / "p.yaml")


# ---------------------------------------------------------------------------------------------
# samplers, triggers, names


def test_sampler_names_cover_sd_scripts_list_and_refuse_unknown():
    sd_scripts = ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                  "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    assert {normalize_sampler(n) for n in sd_scripts} <= set(SAMPLERS)
    assert normalize_sampler("k_dpm_2_a") == "dpm_2_a"
    assert normalize_sampler("DPM++ 2M") == "dpmsolver++"
    with pytest.raises(UserError) as err:
        normalize_sampler("warp_drive")
    assert "euler_a" in str(err.value) and "--sample_sampler" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_every_sampler_builds_with_the_models_schedule(family):
    from sdtune.families import get_family

    fam = get_family(family)
    config = json.loads((fam.asset_dir / "scheduler" / "scheduler_config.json").read_text())
    expected_betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    for name, (cls_name, _) in SAMPLERS.items():
        if name == "lms":
            continue  # needs scipy, which the project does not install
        sched = build_scheduler(config, fam.prediction_type, name)
        assert type(sched).__name__ == cls_name
        assert sched.config.prediction_type == fam.prediction_type
        assert torch.allclose(sched.betas.double(), expected_betas, atol=1e-9)


def test_sample_schedule_follows_sd_scripts():
    steps = SampleSchedule(every_n_steps=3)
    assert [s for s in range(0, 10) if steps.after_step(s)] == [3, 6, 9]
    assert not steps.after_epoch(1) and not steps.at_start()
    both = SampleSchedule(every_n_steps=3, every_n_epochs=2, at_first=True)  # epochs override steps
    assert not any(both.after_step(s) for s in range(10))
    assert [e for e in range(1, 7) if both.after_epoch(e)] == [2, 4, 6] and both.at_start()
    assert not SampleSchedule().enabled
    assert sample_tag(epoch=3) == "e000003" and sample_tag(step=120) == "000120"


def test_sampling_options_checks():
    with pytest.raises(UserError, match="no prompts"):
        check_sampling_options(None, 10, None, False)
    assert "nothing triggers" in check_sampling_options("p.txt", None, None, False)[0]
    assert "overrides" in check_sampling_options("p.txt", 5, 1, False)[0]
    assert check_sampling_options("p.txt", 5, None, False) == []


def test_prompt_seed_explicit_or_derived():
    assert prompt_seed(SamplePrompt(0, "a", seed=123), 42) == 123
    derived = [prompt_seed(SamplePrompt(i, "a"), 42) for i in range(4)]
    assert len(set(derived)) == 4 and all(0 <= s < 2 ** 32 for s in derived)
    assert derived == [prompt_seed(SamplePrompt(i, "b"), 42) for i in range(4)]  # by index, not text
    assert derived[0] != prompt_seed(SamplePrompt(0, "a"), 43)


# ---------------------------------------------------------------------------------------------
# generation


@pytest.fixture(scope="module")
def sd1():
    from sdtune.testing import build_tiny_model

    return build_tiny_model("sd1", seed=3)


@pytest.fixture(scope="module")
def sd2v():
    from sdtune.testing import build_tiny_model

    return build_tiny_model("sd2-v", seed=4)


def conditioner_for(model, **kw):
    from sdtune.text import TextConditioner

    return TextConditioner(model.tokenizer, model.text_encoder, model.family, **kw)


class UNetSpy:
    """Records each U-Net call's inputs through a forward pre-hook (no change to the model)."""

    def __init__(self, unet):
        self.calls = []
        self.unet = unet
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({"sample": args[0].clone(), "t": args[1], "context": kwargs["encoder_hidden_states"].clone(),
                           "training": module.training, "grad": torch.is_grad_enabled()})

    def close(self):
        self.handle.remove()


def run(model, conditioner, prompts, tmp_path, sampler="ddim", seed=1, tag="000010", name="run"):
    return sample_images(model, conditioner, prompts, sampler=sampler, out_dir=tmp_path, name=name, tag=tag,
                         device="cpu", seed=seed, progress=False)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.mark.slow
def test_unet_sees_the_training_conditioning(sd1, tmp_path):
    # clip skip 2 and 150 tokens: a path where a second encoding function would easily differ.
    cond = conditioner_for(sd1, clip_skip=2, max_token_length=150)
    caption = "a red circle on a blue background, " + "simple shapes, " * 30
    prompts = [SamplePrompt(0, caption, negative_prompt="lowres, blurry", width=64, height=64, steps=2, seed=5),
               SamplePrompt(1, "a green square", width=64, height=64, steps=2, seed=6)]
    spy = UNetSpy(sd1.unet)
    try:
        run(sd1, cond, prompts, tmp_path)
    finally:
        spy.close()
    assert len(spy.calls) == 4  # 2 prompts x 2 steps, CFG batched
    with torch.no_grad():
        expected = {text: cond.encode([text]) for text in (caption, "lowres, blurry", "a green square", "")}
    for call, (pos, neg) in zip(spy.calls, [(caption, "lowres, blurry")] * 2 + [("a green square", "")] * 2):
        uncond, c = call["context"].chunk(2)
        assert c.shape == (1, 152, 32)
        torch.testing.assert_close(c, expected[pos], rtol=0, atol=1e-6)
        torch.testing.assert_close(uncond, expected[neg], rtol=0, atol=1e-6)
        assert not call["training"] and not call["grad"]
    # The empty negative is what caption dropout trains on.
    torch.testing.assert_close(expected[""], cond.empty_embedding(1).detach(), rtol=0, atol=0)


@pytest.mark.slow
def test_same_seed_same_image_other_seed_other_image(sd1, tmp_path):
    cond = conditioner_for(sd1)
    prompts = [SamplePrompt(0, "a red circle", width=64, height=64, steps=2),
               SamplePrompt(1, "a red circle", width=64, height=64, steps=2, seed=11)]
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    a = run(sd1, cond, prompts, tmp_path / "a", sampler="euler_a")  # ancestral: noise at every step
    b = run(sd1, cond, prompts, tmp_path / "b", sampler="euler_a")
    c = run(sd1, cond, prompts, tmp_path / "c", sampler="euler_a", seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling touched the global RNG"
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    derived = prompt_seed(prompts[0], 1)
    assert [p.name for p in a] == [f"run_000010_00_{derived}.png", "run_000010_01_11.png"]
    assert a.grid.name == "run_000010_grid.png"
    # Run seed 2 changes the prompt without --d, not the one with --d 11.
    assert np.abs(pixels(a[0]) - pixels(c[0])).max() > 0
    assert (pixels(a[1]) == pixels(c[1])).all()
    # Same seed but another prompt index -> another derived seed -> another image.
    assert np.abs(pixels(a[0]) - pixels(a[1])).max() > 0
    with Image.open(a[1]) as im:
        assert im.size == (64, 64)
        assert "Seed: 11" in im.text["parameters"] and "Sampler: euler_a" in im.text["parameters"]
    with Image.open(a.grid) as grid:
        assert grid.width == 128 and grid.height > 64


@pytest.mark.slow
def test_modes_devices_and_grads_are_restored(sd1, tmp_path):
    cond = conditioner_for(sd1)
    sd1.unet.train()
    sd1.unet.conv_in.eval()  # a mixed state must come back as it was, not as all-train
    sd1.text_encoder.eval()
    try:
        spy = UNetSpy(sd1.unet)
        run(sd1, cond, [SamplePrompt(0, "x", width=64, height=64, steps=1, scale=1.0)], tmp_path)
        spy.close()
        assert len(spy.calls) == 1 and spy.calls[0]["context"].shape[0] == 1  # scale 1: no uncond pass
        assert not spy.calls[0]["training"]
        assert sd1.unet.training and not sd1.unet.conv_in.training and sd1.unet.conv_out.training
        assert not sd1.text_encoder.training
    finally:
        sd1.unet.eval()


def _ddim_by_hand(model, cond, uncond, seed, steps, scale, width, height):
    """DDIM (eta 0) written from the paper with SD's scaled-linear betas and 'leading' spacing + offset 1."""
    unet, vae = model.unet, model.vae
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    ratio = 1000 // steps
    timesteps = [i * ratio + 1 for i in reversed(range(steps))]
    x = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed)).double()
    v_pred = model.family.prediction_type == "v_prediction"
    with torch.no_grad():
        for t in timesteps:
            out = unet(torch.cat([x, x]).float(), torch.tensor(t), encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_u, out_c = out.double().chunk(2)
            out = out_u + scale * (out_c - out_u)
            a_t = alphas[t]
            a_prev = alphas[t - ratio] if t - ratio >= 0 else alphas[0]
            if v_pred:
                x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
                eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
            else:
                eps = out
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        image = vae.decode((x / vae.config.scaling_factor).float()).sample[0]
    return ((image / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_ddim_matches_a_hand_written_ddim(family, sd1, sd2v, tmp_path):
    model = sd1 if family == "sd1" else sd2v
    cond = conditioner_for(model)
    prompt = SamplePrompt(0, "a yellow triangle", negative_prompt="green", width=72, height=64, steps=2, scale=4.0,
                          seed=21)
    (path,) = run(model, cond, [prompt], tmp_path)
    with torch.no_grad():
        expected = _ddim_by_hand(model, cond.encode([prompt.prompt]), cond.encode(["green"]), 21, 2, 4.0, 72, 64)
    got = pixels(path)
    assert got.shape == (64, 72, 3)
    assert np.abs(got - expected).max() <= 1  # float order of operations may flip a rounding


@pytest.mark.slow
def test_odd_sizes_are_rounded_down_to_multiples_of_8(sd1, tmp_path):
    cond = conditioner_for(sd1)
    (path,) = run(sd1, cond, [SamplePrompt(0, "x", width=70, height=67, steps=1, scale=1.0)], tmp_path)
    with Image.open(path) as im:
        assert im.size == (64, 64)
