"""Detection, precision, and bad input: hostile pickles, corrupt files, overwriting the source."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune import checkpoint as ck
from sdtune.checkpoint.detect import detect_diffusers, detect_single_file
from sdtune.checkpoint.header import CheckpointView
from sdtune.errors import UserError
from sdtune.testing import build_tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for fam in ("sd1", "sd2", "sd2-v"):
        out[fam] = ck.save_model(build_tiny_model(fam), root / f"{fam}.safetensors", fmt="safetensors", progress=False)
    return out


def _bare(path: Path, tmp: Path) -> Path:
    """The file with every prediction-type hint removed (no v_pred key, no metadata)."""
    sd = load_file(path)
    sd.pop("v_pred", None)
    save_file(sd, tmp / f"bare-{path.name}")
    return tmp / f"bare-{path.name}"


def _detect(sd, metadata, **flags):
    found = detect_single_file(CheckpointView.of_state_dict(sd, metadata), **flags)
    return found.family, found.reason


@pytest.mark.slow
def test_detection_of_each_family_and_each_override(files, tmp_path):
    assert ck.load_model(files["sd1"], verbose=False).family.name == "sd1"
    assert ck.load_model(files["sd2"], verbose=False).family.name == "sd2"
    assert ck.load_model(files["sd2-v"], verbose=False).family.name == "sd2-v"
    bare = _bare(files["sd2-v"], tmp_path)
    sd = load_file(bare)
    fam, why = _detect(sd, {})
    assert fam.name == "sd2" and "epsilon" in why and "OpenCLIP" in why
    assert _detect(sd, {"modelspec.prediction_type": "v"})[0].name == "sd2-v"
    assert _detect(sd, {"modelspec.architecture": "stable-diffusion-v2-768-v"})[0].name == "sd2-v"
    assert _detect({**sd, "v_pred": torch.tensor([])}, {})[0].name == "sd2-v"
    fam, why = _detect({**sd, "v_pred": torch.tensor([])}, {}, v_parameterization=False)
    assert fam.name == "sd2" and "given" in why
    assert _detect(sd, {}, v_parameterization=True)[0].name == "sd2-v"
    # no text encoder: the U-Net's cross-attention width (tiny: 32) says nothing, --v2 decides
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.")}
    assert _detect(unet_only, {})[0].name == "sd1"
    assert _detect(unet_only, {}, v2=True)[0].name == "sd2"
    sd1 = load_file(files["sd1"])
    assert _detect(sd1, {}, v_parameterization=True)[0].prediction_type == "v_prediction"
    # a v-prediction override is written into the output as the v_pred marker
    model = ck.load_model(bare, v_parameterization=True, verbose=False)
    assert model.family.name == "sd2-v"
    assert "v_pred" in load_file(ck.save_model(model, tmp_path / "v.safetensors", fmt="safetensors", progress=False))


def test_diffusers_detection_reads_activation_and_scheduler():
    assert detect_diffusers({}, {"hidden_act": "quick_gelu"}, {}).family.name == "sd1"
    assert detect_diffusers({}, {"hidden_act": "gelu"}, {"prediction_type": "epsilon"}).family.name == "sd2"
    assert detect_diffusers({}, {"hidden_act": "gelu"}, {"prediction_type": "v_prediction"}).family.name == "sd2-v"
    assert detect_diffusers({}, {"hidden_act": "gelu"}, {}, v2=True).family.name == "sd2"


@pytest.mark.slow
@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("float", torch.float32)])
def test_save_precision_casts_every_float_tensor_in_every_format(files, tmp_path, precision, dtype):
    model = ck.load_model(files["sd2-v"], verbose=False)
    ref = load_file(files["sd2-v"])
    single = load_file(ck.save_model(model, tmp_path / "m.safetensors", fmt="safetensors", precision=precision, progress=False))
    ckpt = torch.load(ck.save_model(model, tmp_path / "m.ckpt", fmt="ckpt", precision=precision, progress=False),
                      weights_only=True)["state_dict"]
    for got in (single, ckpt):
        assert sorted(got) == sorted(ref)
        for k, v in ref.items():
            assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
    ck.save_model(model, tmp_path / "d", fmt="diffusers_safetensors", precision=precision, progress=False)
    unet = load_file(tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors")
    own = model.unet.state_dict()
    assert all(unet[k].dtype == dtype and torch.equal(unet[k], own[k].to(dtype)) for k in own)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_ckpt_whose_pickle_would_run_code_runs_nothing(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refused") as err:
        ck.load_model(tmp_path / "evil.ckpt", verbose=False)
    assert "evil.ckpt" in str(err.value)
    assert not _Evil.marker.exists()
    # the same with a plain pickle, not torch's zip container
    (tmp_path / "evil2.ckpt").write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(UserError):
        ck.load_model(tmp_path / "evil2.ckpt", verbose=False)
    assert not _Evil.marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t.safetensors", "t.ckpt"])
def test_truncated_and_corrupt_files_give_a_clear_error_naming_them(files, tmp_path, name):
    good = files["sd1"] if name.endswith(".safetensors") else ck.save_model(
        ck.load_model(files["sd1"], verbose=False), tmp_path / "good.ckpt", fmt="ckpt", progress=False)
    data = Path(good).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        ck.load_model(tmp_path / name, verbose=False)
    assert name in str(err.value)
    (tmp_path / name).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match=name):
        ck.load_model(tmp_path / name, verbose=False)


def test_incomplete_and_non_sd_files_are_refused(files, tmp_path):
    sd = load_file(files["sd1"])
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors")
    with pytest.raises(UserError, match="not a Stable Diffusion|missing"):
        ck.load_model(tmp_path / "novae.safetensors", verbose=False)
    save_file({"foo": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(UserError, match="foo.safetensors"):
        ck.load_model(tmp_path / "foo.safetensors", verbose=False)


@pytest.mark.slow
def test_saving_never_overwrites_the_input_and_is_atomic(files, tmp_path):
    model = ck.load_model(files["sd1"], verbose=False)
    before = Path(files["sd1"]).read_bytes()
    with pytest.raises(UserError, match="never modified"):
        ck.save_model(model, files["sd1"], fmt="safetensors")
    assert Path(files["sd1"]).read_bytes() == before
    with pytest.raises(UserError, match=r"\.ckpt"):
        ck.save_model(model, tmp_path / "x.safetensors", fmt="ckpt")
    # a failing save leaves the previous file and no temporary behind
    out = ck.save_model(model, tmp_path / "o.safetensors", fmt="safetensors", progress=False)
    good = out.read_bytes()
    model.passthrough["bad"] = torch.zeros(2, dtype=torch.complex64)  # no safetensors dtype: the writer fails
    with pytest.raises(KeyError):
        ck.save_model(model, out, fmt="safetensors", progress=False)
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hf download someone/not-cached"):
        ck.load_model("someone/not-cached", verbose=False)


@pytest.mark.slow
def test_convert_command_between_formats(files, tmp_path, capsys):
    from sdtune.cli import main

    assert main(["convert", str(files["sd2-v"]), str(tmp_path / "d"), "--save_precision", "bf16"]) == 0
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "m.ckpt")]) == 0
    got = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    ref = load_file(files["sd2-v"])
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k].bfloat16()) for k in ref)
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "m.ckpt")]) == 2
    assert "already exists" in capsys.readouterr().err
