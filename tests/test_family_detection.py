"""One family detector for --dry_run and loading, clear words at its edges, and the SD2 forward probe."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune import checkpoint as ck
from sdtune.checkpoint.detect import detect_from_header, detect_single_file
from sdtune.checkpoint.header import CheckpointView
from sdtune.checkpoint.probe import is_v_prediction, mean_offset
from sdtune.cli import main
from sdtune.errors import UserError
from sdtune.families import SD2
from sdtune.testing import build_tiny_model, make_dataset, write_tiny_model
from sdtune.text.encode import clip_skip_note
from sdtune.train.plan import peek_family

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    for fam in ("sd1", "sd2", "sd2-v"):
        write_tiny_model(root / f"{fam}.safetensors", fam, seed=0)
    write_tiny_model(root / "sd1-diffusers", "sd1", seed=0, fmt="diffusers")
    write_tiny_model(root / "sd2-v.ckpt", "sd2-v", seed=0)
    # the same SD2 weights with the prediction type said only in other tools' words
    sd = load_file(root / "sd2-v.safetensors")
    sd.pop("v_pred")
    save_file(sd, root / "bare.safetensors")  # no marker at all
    save_file(sd, root / "pt.safetensors", metadata={"modelspec.prediction_type": "v_prediction"})
    save_file(sd, root / "arch.safetensors", metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})
    make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    return root


def _data(ws: Path, out: Path) -> list[str]:
    return ["--in_json", str(ws / "meta.json"), "--train_data_dir", str(ws / "data"), "--output_dir", str(out),
            "--max_data_loader_n_workers", "0", "--learning_rate", "1e-4"]


# ------------------------------------------------------------------------------------------- one detector


@pytest.mark.parametrize("name,family,bucket", [("pt", "sd2-v", "768x768"), ("arch", "sd2-v", "768x768"),
                                                ("bare", "sd2", "512x512"), ("sd1", "sd1", "512x512")])
@pytest.mark.slow
def test_the_dry_run_plans_the_family_that_loading_detects(ws, tmp_path, capsys, name, family, bucket):
    # SD 2.x 768-v trains at 768 px by default, the others at 512 (no --resolution, no bucketing:
    # every image goes to the one square bucket)
    path = ws / f"{name}.safetensors"
    assert ck.load_model(path, verbose=False).family.name == family
    assert peek_family(str(path))[0].name == family
    assert main(["train", "--pretrained_model_name_or_path", str(path), *_data(ws, tmp_path / "o"), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^\s+{bucket.replace('x', r'x')}\s+2\s", printed, re.M), printed


@pytest.mark.slow
def test_header_detection_imports_no_torch(ws):
    import subprocess
    import sys

    code = ("import sys; from sdtune.train.plan import peek_family; "
            f"f, _ = peek_family({str(ws / 'pt.safetensors')!r}); g, _ = peek_family({str(ws / 'sd2-v.ckpt')!r}); "
            "print(f.name, g.name, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["sd2-v", "sd2-v", "False"]


class _Callback:
    """Stands for the training-callback objects some Lightning .ckpt files pickle."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.slow
def test_a_diffusers_folder_and_a_ckpt_read_the_same_without_loading(ws, tmp_path, capfd):
    assert peek_family(str(ws / "sd1-diffusers"))[0] == ck.load_model(ws / "sd1-diffusers", verbose=False).family
    assert peek_family(str(ws / "sd2-v.ckpt"))[0].name == "sd2-v" == ck.load_model(ws / "sd2-v.ckpt", verbose=False).family.name
    # a .ckpt that pickles more than tensors: its structure is not read, nothing in it runs, loading decides
    sd = torch.load(ws / "sd2-v.ckpt", weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "callbacks": _Callback()}, tmp_path / "lightning.ckpt")
    family, why = peek_family(str(tmp_path / "lightning.ckpt"))
    assert family is None and "read only when the model is loaded" in why
    assert "pickled code ran" not in capfd.readouterr().out


@pytest.mark.parametrize("name,expected", [("pt.safetensors", (768, 768)), ("sd2-v.ckpt", (768, 768)),
                                           ("sd1-diffusers", (512, 512))])
@pytest.mark.slow
def test_training_builds_the_plan_once_at_the_detected_family_resolution(ws, tmp_path, monkeypatch, name, expected):
    import sdtune.data
    from sdtune.train.build import model_and_plan as _model_and_plan
    from sdtune.train.options import TrainOptions

    calls = []
    real = sdtune.data.build_plan

    def counted(*args, **kwargs):
        calls.append(kwargs.get("default_resolution"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sdtune.data, "build_plan", counted)
    opts = TrainOptions(pretrained_model_name_or_path=str(ws / name), output_dir=str(tmp_path),
                        in_json=str(ws / "meta.json"), train_data_dir=str(ws / "data"))
    model, plan = _model_and_plan(opts, 0, torch.float32, False)
    assert len(calls) == 1
    assert model.family.resolution == expected[0]
    assert plan.datasets[0].resolution == expected


# ------------------------------------------------------------------------------------------- clear words


def test_v2_on_an_sd1_file_says_it_is_an_sd1_file(ws, tmp_path, capsys):
    for path in (ws / "sd1.safetensors", ws / "sd1-diffusers"):
        with pytest.raises(UserError, match=r"--v2 says Stable Diffusion 2\.x, but this is a Stable Diffusion 1\.x model"):
            ck.load_model(path, v2=True, verbose=False)
    code = main(["train", "--pretrained_model_name_or_path", str(ws / "sd1.safetensors"), "--v2",
                 *_data(ws, tmp_path / "o"), "--dry_run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Stable Diffusion 1.x model" in err and "Drop --v2" in err


@pytest.mark.slow
def test_v_parameterization_on_a_file_marked_epsilon_warns_once(ws, capsys):
    # sdtune's SD1 files say ModelSpec prediction_type "epsilon"; the Diffusers folder's scheduler too
    for path in (ws / "sd1.safetensors", ws / "sd1-diffusers"):
        model = ck.load_model(path, v_parameterization=True)
        assert model.family.prediction_type == "v_prediction"
        warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "epsilon" in warnings[0] and "--v_parameterization" in warnings[0]
    ck.load_model(ws / "bare.safetensors", v_parameterization=True)  # nothing said: nothing to contradict
    assert "warning:" not in capsys.readouterr().out


@pytest.mark.slow
def test_sd2_clip_skip_maps_onto_sd_scripts_counting(ws, tmp_path, capsys):
    """The note's sd-scripts number, used the way sd-scripts uses it (hidden_states[-N] of the loaded
    encoder, then the final layer norm), gives exactly sdtune's conditioning."""
    from sdtune.text import TextConditioner

    model = build_tiny_model("sd2", seed=0)
    layers = model.text_encoder.config.num_hidden_layers  # 4 loaded, of a 5-layer tower
    note = clip_skip_note(model.family, layers, 3)
    theirs = int(re.search(r"calls this layer --clip_skip (\d+)", note)[1])
    assert theirs == 2 and "layer 3 of 5" in note
    conditioner = TextConditioner(model.tokenizer, model.text_encoder, model.family, clip_skip=3)
    prompt = "a red circle"
    with torch.no_grad():
        ours = conditioner.encode([prompt])
        ids = conditioner.tokenize([prompt]).ids[:, 0]
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-theirs]
        sd_scripts = model.text_encoder.final_layer_norm(hidden)  # transformers 5: no text_model level
    torch.testing.assert_close(ours, sd_scripts, rtol=0, atol=1e-6)
    assert clip_skip_note(model.family, layers, None) is None
    assert clip_skip_note(build_tiny_model("sd1").family, 4, 2) is None  # SD 1.x counts alike

    # printed once per run, in training
    argv = ["train", "--pretrained_model_name_or_path", str(ws / "sd2.safetensors"), *_data(ws, tmp_path / "o"),
            "--resolution", "64", "--max_train_steps", "1", "--clip_skip", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("sd-scripts counts the 4 layers it loads") == 1


# ------------------------------------------------------------------------------------------- the SD2 probe


def test_the_probe_decision_on_constructed_outputs():
    latent = torch.full((1, 4, 8, 8), 0.5)
    # an epsilon model at t=999 returns about its input (nearly pure noise in, the noise out)
    assert not is_v_prediction(mean_offset(latent + 0.05 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), latent))
    # a v model returns about -x0 scaled: far below its input
    assert is_v_prediction(mean_offset(latent - 2.5, latent))
    assert not is_v_prediction(mean_offset(latent - 1.0, latent))  # the threshold itself is epsilon (strictly below -1)
    assert is_v_prediction(mean_offset((latent - 1.01).half(), latent))


def _full_size_sd2_view(**extra_shapes):
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
              "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
              "cond_stage_model.model.token_embedding.weight": (49408, 1024), **extra_shapes}
    return shapes


@pytest.mark.slow
def test_the_probe_is_for_full_size_sd2_u_nets_without_a_marker(ws):
    wide = [(-1) ** i * 0.12 for i in range(320)]  # std 0.12: ComfyUI's statistic says v
    view = CheckpointView(_full_size_sd2_view(), {}, lambda name: wide)
    found = detect_single_file(view)
    assert found.probe and found.family.name == "sd2-v" and "forward probe" in found.prediction_reason
    assert "std 0.120 > 0.09" in found.prediction_reason
    assert not detect_single_file(CheckpointView(_full_size_sd2_view(v_pred=(0,)), {})).probe  # a marker decides
    assert not detect_single_file(view, v_parameterization=False).probe  # a flag decides
    inpainting = _full_size_sd2_view(**{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    assert not detect_single_file(CheckpointView(inpainting, {})).probe  # the web UI probes 4-channel U-Nets only
    # a tiny random SD2 U-Net is no real SD2 U-Net: the probe's threshold means nothing for it
    found, _ = detect_from_header(ws / "bare.safetensors")
    assert not found.probe and "probe" not in found.reason and found.family.name == "sd2"
    assert "probe" not in ck.load_model(ws / "bare.safetensors", verbose=False).detection


@pytest.mark.slow
def test_the_probe_runs_the_files_u_net_on_the_constant_inputs(ws):
    from sdtune.checkpoint.load import _probe, _single_file_configs
    from sdtune.checkpoint.io import read_state_dict

    sd, _ = read_state_dict(ws / "bare.safetensors")
    found = detect_single_file(CheckpointView.of_state_dict(sd, {}))
    cfg, _ = _single_file_configs(sd, {}, SD2, None, ws / "bare.safetensors")
    probed = _probe(sd, cfg["unet"], found, "bare")
    offset = float(re.search(r"mean\(output - input\) = (-?[\d.]+)", probed.prediction_reason)[1])
    # the U-Net as loaded for training, on a constant 0.5 latent and a two-token 0.5 context at t=999
    unet = ck.load_model(ws / "bare.safetensors", verbose=False).unet.float()
    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5)
        expected = (unet(x, torch.tensor([999]), torch.full((1, 2, 32), 0.5)).sample - x).mean().item()
    assert offset == pytest.approx(expected, abs=1e-3)
    assert probed.family.name == ("sd2-v" if expected < -1 else "sd2") and not probed.probe


def test_header_values_are_the_tensors_values(tmp_path):
    from sdtune.checkpoint.header import read_ckpt_view, read_safetensors_view

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t_{dt}": torch.randn(320, generator=gen).to(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    save_file(tensors, tmp_path / "v.safetensors")
    torch.save({"state_dict": tensors}, tmp_path / "v.ckpt")
    for view in (read_safetensors_view(tmp_path / "v.safetensors"), read_ckpt_view(tmp_path / "v.ckpt")):
        for name, t in tensors.items():
            assert view.shapes[name] == (320,)
            assert view.values(name) == t.float().tolist(), name
