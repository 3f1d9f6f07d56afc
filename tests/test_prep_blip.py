"""BLIP captions with a tiny randomly initialised BlipForConditionalGeneration saved to a folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdtune.errors import UserError

from sdtune.testing import BLIP_WORDS as WORDS


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    from sdtune.testing import write_tiny_blip

    return write_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def captioner(blip_dir):
    from sdtune.prep.blip import load_captioner

    return load_captioner(str(blip_dir), device="cpu")


def _images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"im{i}.png"
        Image.new("RGB", (40 + 8 * i, 24), (60 * i, 200 - 50 * i, 30)).save(p)
        paths.append(p)
    return paths


@pytest.mark.slow
def test_beam_search_options_reach_generate(tmp_path, blip_dir, captioner):
    import torch
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    from sdtune.prep.blip import BlipOptions, caption_images

    paths = _images(tmp_path / "data")
    opts = BlipOptions(beam_search=True, num_beams=3, max_length=12, min_length=12)
    result = caption_images(tmp_path / "data", captioner, options=opts, batch_size=2, progress=False)
    assert sorted(result.written) == paths

    # Independent run straight through transformers with the documented settings.
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    tok = AutoTokenizer.from_pretrained(blip_dir)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    for p in paths:
        img = Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        x = torch.tensor(list(img.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1) / 255
        x = ((x - mean[:, None, None]) / std[:, None, None])[None]
        ids = tok("a picture of", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(pixel_values=x, input_ids=ids, num_beams=3, do_sample=False, max_length=12,
                                 min_length=12, repetition_penalty=1.0)
        assert out.shape[1] == 12  # min_length = max_length: [DEC] + 3 prompt tokens + 8 generated tokens
        words = tok.decode(out[0], skip_special_tokens=True).split()
        assert words[:3] == ["a", "picture", "of"]
        caption = p.with_suffix(".caption").read_text()
        # Equal only if beams, lengths and penalty reached generate (the default settings would sample).
        assert caption == " ".join(words[3:]) + "\n"


def test_sampling_is_seeded_skips_existing_and_leaves_global_rng(tmp_path, captioner):
    import torch

    from sdtune.prep.blip import BlipOptions, caption_images

    _images(tmp_path / "data", 2)
    (tmp_path / "data" / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "data" / "im0.cap").write_text("kept\n")
    state = torch.get_rng_state()
    opts = BlipOptions(seed=7, max_length=20, min_length=6)
    first = caption_images(tmp_path / "data", captioner, options=opts, caption_extension=".cap", progress=False)
    assert torch.equal(state, torch.get_rng_state())
    assert [p.name for p in first.skipped_existing] == ["im0.png"] and [p.name for p in first.unreadable] == ["bad.png"]
    assert (tmp_path / "data" / "im0.cap").read_text() == "kept\n"
    text = (tmp_path / "data" / "im1.cap").read_text()
    again = caption_images(tmp_path / "data", captioner, options=opts, caption_extension=".cap", overwrite=True,
                           num_workers=2, progress=False)
    assert len(again.written) == 2
    assert (tmp_path / "data" / "im1.cap").read_text() == text != ""
    assert all(w in {*WORDS} for w in text.split())


def test_option_validation_and_offline_hub():
    from sdtune.prep.blip import BlipOptions, load_captioner

    with pytest.raises(UserError, match="min_length"):
        BlipOptions(min_length=10, max_length=5)
    with pytest.raises(UserError, match="top_p"):
        BlipOptions(top_p=0)
    with pytest.raises(UserError, match="Salesforce/blip-not-here") as err:
        load_captioner("Salesforce/blip-not-here")
    assert "--model_id" in str(err.value)


def test_writing_the_tiny_model_prints_nothing_on_a_machine_without_a_gpu(tmp_path):
    """`sdtune demo` writes it first: transformers' save_pretrained imports DeepSpeed (through accelerate),
    which logged "Setting accelerator to CPU" as the demo's first line. A fresh process, as in the demo."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("DeepSpeed finds the GPU and says nothing anyway")
    script = ("import sys; from sdtune.testing import write_tiny_blip; write_tiny_blip(sys.argv[1]); "
              "print('deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "blip")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "True"  # DeepSpeed was imported, so its notice had its chance
    assert "accelerator" not in output and "WARNING" not in output, output
