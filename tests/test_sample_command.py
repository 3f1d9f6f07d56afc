"""`sdtune sample`: a base model's images, with a hypernetwork at a chosen multiplier.

References: the base model's image is made by training's sampler on the freshly loaded model with no
hypernetwork code on its path; the image with a trained hypernetwork is the sample image that a
hypernetwork training run wrote at its last step, compared with the command's image from the saved
`.pt`. Every run here is in-process with one compute thread: the CPU kernels' summation order (and so
the last bit of an image) depends on the thread count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = "a red square --s 3 --w 64 --h 64\nblue circle --s 3 --w 64 --h 64 --d 7 --l 1\n"
SEED = 3


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_file):
    """A tiny SD1 model file, a prompt file (one prompt with CFG and a derived seed, one without CFG
    and with its own seed) and a hypernetwork with large weights (Xavier initialisation)."""
    from sdtune.hypernetwork import files
    from sdtune.hypernetwork.module import new_hypernetwork
    from sdtune.hypernetwork.spec import Structure

    root = tmp_path_factory.mktemp("sample-command")
    tiny_model_file(root / "model.safetensors", "sd1")
    (root / "prompts.txt").write_text(PROMPTS)
    # the tiny U-Net's context widths: 16, 32, 64 (blocks) and 32 (text)
    strong = new_hypernetwork((16, 32, 64), Structure(activation_func="relu", weight_initialization="XavierNormal"),
                              seed=5)
    files.save(strong, root / "strong.pt")
    return root


def sample(root: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--pretrained_model_name_or_path", str(root / "model.safetensors"), "--prompts",
                 str(root / "prompts.txt"), "--seed", str(SEED), "--output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def base_images(workspace):
    """The base model's images from training's sampler, called here on the plain loaded model."""
    from sdtune.checkpoint import load_model
    from sdtune.text import TextConditioner
    from sdtune.train.prompts import load_prompts
    from sdtune.train.sampling import sample_images

    model = load_model(str(workspace / "model.safetensors"), verbose=False)
    conditioner = TextConditioner(model.tokenizer, model.text_encoder, model.family)
    return list(sample_images(model, conditioner, load_prompts(workspace / "prompts.txt"), sampler="ddim",
                              out_dir=workspace / "reference", name=None, tag="ref", device="cpu", seed=SEED,
                              progress=False))


def test_multiplier_zero_is_the_base_model_and_one_changes_the_image(workspace, base_images, tmp_path):
    assert sample(workspace, tmp_path / "zero", "--hypernetwork", str(workspace / "strong.pt"),
                  "--hypernetwork_multiplier", "0") == 0
    assert sample(workspace, tmp_path / "one", "--hypernetwork", str(workspace / "strong.pt")) == 0
    assert sample(workspace, tmp_path / "none") == 0
    # names: <file stem>_x<multiplier>_<prompt index>_<seed>; the first prompt's seed derived from --seed
    zero = sorted((tmp_path / "zero").glob("strong_x0_0*.png"))
    one = sorted((tmp_path / "one").glob("strong_x1_0*.png"))
    none = sorted((tmp_path / "none").glob("base_0*.png"))
    assert [p.name.split("_", 2)[2] for p in zero] == [p.name.split("_", 1)[1] for p in base_images]
    assert zero[1].name == "strong_x0_01_7.png" and (tmp_path / "zero" / "strong_x0_grid.png").is_file()
    for z, o, n, ref in zip(zero, one, none, base_images):
        assert np.array_equal(pixels(z), pixels(ref)), z.name
        assert np.array_equal(pixels(n), pixels(ref)), n.name
        assert np.abs(pixels(o).astype(int) - pixels(ref).astype(int)).mean() > 1, o.name


@pytest.mark.slow  # trains (one step of a tiny model): ~10 s alone, longer on a loaded machine
@pytest.mark.parametrize("precision", ["no", "bf16"])  # bf16: the frozen model's compute copy and autocast
def test_the_image_equals_the_training_runs_sample(workspace, tmp_path, precision):
    from sdtune.testing import make_dataset

    make_dataset(tmp_path / "data", n=2, seed=0, metadata=tmp_path / "meta.json")
    assert main(["train", "--pretrained_model_name_or_path", str(workspace / "model.safetensors"), "--in_json",
                 str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "data"), "--output_dir",
                 str(tmp_path / "run"), "--output_name", "hn", "--resolution", "64", "--train_batch_size", "2",
                 "--learning_rate", "1e-2", "--seed", str(SEED), "--max_data_loader_n_workers", "0",
                 "--hypernetwork_module", "hypernetwork_nai", "--max_train_steps", "1", "--sample_every_n_steps", "1",
                 "--sample_prompts", str(workspace / "prompts.txt"), "--mixed_precision", precision]) == 0
    trained = sorted((tmp_path / "run" / "sample").glob("hn_000001_0*.png"))
    assert len(trained) == 2
    assert sample(workspace, tmp_path / "out", "--hypernetwork", str(tmp_path / "run" / "hn.pt"), "--mixed_precision",
                  precision) == 0
    for image in trained:
        mine = tmp_path / "out" / image.name.replace("hn_000001_", "hn_x1_")
        assert np.array_equal(pixels(mine), pixels(image)), image.name


def error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_a_hypernetwork_of_another_family_is_refused_or_noted(workspace, tmp_path, capsys):
    from sdtune.hypernetwork import files
    from sdtune.hypernetwork.module import new_hypernetwork
    from sdtune.hypernetwork.spec import Structure

    files.save(new_hypernetwork((1024,), Structure(), seed=1), tmp_path / "sd2text.pt")
    line = error_line(capsys, sample(workspace, tmp_path / "a", "--hypernetwork", str(tmp_path / "sd2text.pt")))
    assert "none of the hypernetwork's widths (1024)" in line and "16, 32, 64" in line
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    # some pairs act: the web UIs apply such a file; sdtune too, and says which pairs never act
    files.save(new_hypernetwork((32, 1024), Structure(), seed=1), tmp_path / "mixed.pt")
    (tmp_path / "one.txt").write_text("x --s 1 --w 64 --h 64")
    assert sample(workspace, tmp_path / "b", "--hypernetwork", str(tmp_path / "mixed.pt"), "--prompts",
                  str(tmp_path / "one.txt")) == 0
    out = capsys.readouterr()
    assert "width 1024 never act" in out.out + out.err and "pairs for 32 act" in out.out + out.err
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["mixed_x1_00_" + str(_derived_seed()) + ".png"]


def _derived_seed() -> int:
    from sdtune.seeds import sample_image_seed

    return sample_image_seed(SEED, 0)


def test_an_existing_image_is_never_replaced_silently(workspace, tmp_path, capsys):
    args = ["sample", "--pretrained_model_name_or_path", str(workspace / "model.safetensors"), "--prompt",
            "x --s 1 --w 64 --h 64 --d 9", "--output_dir", str(tmp_path)]
    (tmp_path / "base_00_9.png").write_bytes(b"mine")
    line = error_line(capsys, main(args))
    assert "base_00_9.png already exists" in line and "--overwrite" in line
    assert (tmp_path / "base_00_9.png").read_bytes() == b"mine"
    assert main([*args, "--overwrite"]) == 0
    assert pixels(tmp_path / "base_00_9.png").shape == (64, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base_00_9.png"]  # one prompt: no grid


@pytest.mark.parametrize("extra, expected", [
    (["--hypernetwork", "missing.pt"], "missing.pt: hypernetwork file not found"),
    (["--hypernetwork", "strong.pt", "--hypernetwork_multiplier", "nan"], "--hypernetwork_multiplier: must be a finite"),
    (["--hypernetwork_multiplier", "0.5"], "--hypernetwork_multiplier: a multiplier without a hypernetwork"),
    (["--prompt", "a cat"], "give either --prompt TEXT or --prompts FILE"),
    (["--sampler", "warp9"], "--sampler: unknown sampler 'warp9'"),
    (["--device", "nonsense"], "--device: not a device: 'nonsense'"),
])
def test_bad_input_is_one_line(workspace, tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.chdir(workspace)
    line = error_line(capsys, sample(workspace, tmp_path / "out", *extra))
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_one_line(workspace, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device: CUDA is not available" in error_line(capsys, sample(workspace, tmp_path / "o", "--device", "cuda"))


def test_prompt_problems_are_one_line(workspace, tmp_path, capsys):
    base = ["sample", "--pretrained_model_name_or_path", str(workspace / "model.safetensors"), "--output_dir",
            str(tmp_path / "out")]
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    assert "the file holds no prompts. Add at least one prompt, or drop --prompts" in \
        error_line(capsys, main([*base, "--prompts", str(tmp_path / "empty.txt")]))
    assert "prompt file not found. Check --prompts" in error_line(capsys, main([*base, "--prompts", "nowhere.txt"]))
    assert "--prompt: no prompt given" in error_line(capsys, main(base))
    assert "--prompt: the prompt is empty" in error_line(capsys, main([*base, "--prompt", "  "]))
    assert "--prompt: unknown prompt option --x" in error_line(capsys, main([*base, "--prompt", "a cat --x 1"]))
    missing_model = ["sample", "--pretrained_model_name_or_path", str(tmp_path / "nomodel.safetensors"),
                     "--output_dir", str(tmp_path / "out"), "--prompt", "a cat --s 1"]
    assert "nomodel.safetensors" in error_line(capsys, main(missing_model))
    (tmp_path / "afile").write_text("")
    into_file = ["sample", "--pretrained_model_name_or_path", str(workspace / "model.safetensors"), "--output_dir",
                 str(tmp_path / "afile"), "--prompt", "a cat --s 1"]
    assert "afile: is a file, not a folder" in error_line(capsys, main(into_file))


def test_vae_decodes_in_place_of_the_models_own(workspace, tmp_path, tiny_model_file):
    """--vae: the images are those of training's sampler on the model with that VAE put in directly
    (another seed's tiny VAE, built here), and differ from the model's own VAE's."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from sdtune.checkpoint import load_model
    from sdtune.testing import build_tiny_model
    from sdtune.text import TextConditioner
    from sdtune.train.prompts import load_prompts
    from sdtune.train.sampling import sample_images

    other = tiny_model_file(tmp_path / "other.safetensors", "sd1", seed=1)
    prefix = "first_stage_model."  # a VAE file in the original layout, as VAE downloads are
    save_file({k[len(prefix):]: v for k, v in load_file(str(other)).items() if k.startswith(prefix)},
              str(tmp_path / "vae.safetensors"))
    assert sample(workspace, tmp_path / "own") == 0
    assert sample(workspace, tmp_path / "vae", "--vae", str(tmp_path / "vae.safetensors")) == 0

    model = load_model(str(workspace / "model.safetensors"), verbose=False)
    model = dataclasses.replace(model, vae=build_tiny_model("sd1", seed=1).vae)
    conditioner = TextConditioner(model.tokenizer, model.text_encoder, model.family)
    reference = list(sample_images(model, conditioner, load_prompts(workspace / "prompts.txt"), sampler="ddim",
                                   out_dir=tmp_path / "reference", name=None, tag="ref", device="cpu", seed=SEED,
                                   progress=False))
    with_vae = sorted((tmp_path / "vae").glob("base_0*.png"))
    own = sorted((tmp_path / "own").glob("base_0*.png"))
    assert len(with_vae) == len(reference) == len(own) == 2
    for v, ref, o in zip(with_vae, reference, own):
        assert np.array_equal(pixels(v), pixels(ref)), v.name
        assert not np.array_equal(pixels(v), pixels(o)), v.name


def test_a_missing_vae_is_one_line(workspace, tmp_path, capsys):
    assert sample(workspace, tmp_path / "out", "--vae", str(tmp_path / "nope.safetensors")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.safetensors" in err and "--vae" in err, err
