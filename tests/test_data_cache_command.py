"""`sdtune cache` as a user runs it: the latents it writes are the ones `sdtune train` reuses,
without a single VAE encoder call, whatever precision the checkpoint file is stored in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import register_module_forward_hook

from sdtune.cli import main
from sdtune.testing import make_dataset

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_file):
    root = tmp_path_factory.mktemp("cachecmd")
    model = tiny_model_file(root / "model32.safetensors", "sd1", seed=0)
    # the same model stored in float16, as most downloaded checkpoints are
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(model)).items()},
              str(root / "model16.safetensors"), metadata={"format": "pt"})
    return root


def _data(tmp_path: Path) -> list[str]:
    make_dataset(tmp_path / "img", n=5, seed=4, metadata=tmp_path / "meta.json")
    return ["--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(tmp_path / "img"), "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--max_data_loader_n_workers", "0"]


def _entries(tmp_path: Path) -> list[Path]:
    cache = tmp_path / "img" / ".sdtune-cache"
    return sorted(p for p in cache.rglob("*.safetensors") if "text" not in p.relative_to(cache).parts)


class EncoderCalls:
    """Counts forward calls of the VAE's encoder (diffusers' `Encoder`) anywhere in this process."""

    def __enter__(self):
        self.calls = 0

        def hook(module, args, output):
            if type(module).__name__ == "Encoder":
                self.calls += 1

        self.handle = register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("stored", ["model32", "model16"])
def test_train_reuses_what_cache_wrote(ws, tmp_path, capsys, stored):
    data = _data(tmp_path)
    model = str(ws / f"{stored}.safetensors")
    with EncoderCalls() as cache_run:
        assert main(["cache", "--pretrained_model_name_or_path", model, *data]) == 0
    assert cache_run.calls > 0
    entries = _entries(tmp_path)
    assert len(entries) == 5  # one per image (no flip_aug)
    out = capsys.readouterr().out
    assert "0 reused, 5 encoded, 0 images skipped" in out

    with EncoderCalls() as train_run:
        code = main(["train", "--pretrained_model_name_or_path", model, *data, "--output_dir", str(tmp_path / "out"),
                     "--train_batch_size", "1", "--max_train_steps", "1", "--cache_latents_to_disk"])
    assert code == 0
    assert train_run.calls == 0, "training encoded images the cache command had already encoded"
    assert "all 5 entries up to date, no VAE call needed" in capsys.readouterr().out
    assert _entries(tmp_path) == entries

    # a second cache run reuses everything too
    with EncoderCalls() as again:
        assert main(["cache", "--pretrained_model_name_or_path", model, *data]) == 0
    assert again.calls == 0 and "5 reused, 0 encoded" in capsys.readouterr().out


def test_cache_dry_run_needs_no_model_and_writes_nothing(tmp_path, capsys):
    data = _data(tmp_path)
    assert main(["cache", *data, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "5 images" in out and "bucket" in out
    assert not (tmp_path / "img" / ".sdtune-cache").exists()


def test_cache_without_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["cache", *_data(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no model given" in err and "--pretrained_model_name_or_path" in err
    assert torch  # the test module imports torch for the hook


def test_sd_scripts_prepare_buckets_latents_command_line(ws, tmp_path, capsys):
    """sd-scripts' documented step (its own script writes no latents at this snapshot): here the
    latents are cached, out_json gets each image's bucket, and the printed training line reuses them."""
    import json
    import shlex

    make_dataset(tmp_path / "img", n=5, seed=4, metadata=tmp_path / "meta.json")
    with EncoderCalls() as prep:
        code = main(["prepare_buckets_latents", str(tmp_path / "img"), str(tmp_path / "meta.json"),
                     str(tmp_path / "meta_lat.json"), str(ws / "model16.safetensors"), "--batch_size", "2",
                     "--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                     "--bucket_reso_steps", "32", "--mixed_precision", "no", "--skip_existing"])
    assert code == 0 and prep.calls > 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "meta_lat.json").read_text())
    original = json.loads((tmp_path / "meta.json").read_text())
    assert meta.keys() == original.keys()
    entries = _entries(tmp_path)
    assert len(entries) == 5
    for key, record in meta.items():
        assert {k: v for k, v in record.items() if k not in ("train_resolution", "sdtune_latents")} == original[key]
        assert record["sdtune_latents"]["dtype"] == "float32"  # --mixed_precision no
        # the bucket it names is the size the cached latents were encoded at (latents are 1/8 of it)
        entry = next(p for p in entries if p.name.startswith(f"{key}."))
        latent = next(t for t in load_file(str(entry)).values() if t.dim() == 3)  # (4, h/8, w/8)
        assert record["train_resolution"] == [latent.shape[2] * 8, latent.shape[1] * 8], key
        w, h = record["train_resolution"]
        assert w * h <= 64 * 64 and w % 32 == 0 and h % 32 == 0

    # the training line it prints reuses every entry: no VAE encoder call
    line = next(l for l in out.splitlines() if l.startswith("train with the cached latents:"))
    flags = shlex.split(line.split("fine_tune.py) ", 1)[1].split(" ...", 1)[0])
    assert flags[:2] == ["--in_json", str(tmp_path / "meta_lat.json")]
    with EncoderCalls() as train_run:
        code = main(["train", *flags, "--pretrained_model_name_or_path", str(ws / "model16.safetensors"),
                     "--output_dir", str(tmp_path / "out"), "--train_batch_size", "1", "--max_train_steps", "1",
                     "--max_data_loader_n_workers", "0"])
    assert code == 0 and train_run.calls == 0


def test_prepare_buckets_latents_refuses_what_it_cannot_do(ws, tmp_path, capsys):
    make_dataset(tmp_path / "img", n=2, seed=4, metadata=tmp_path / "meta.json")
    base = ["prepare_buckets_latents", str(tmp_path / "img"), str(tmp_path / "meta.json"), str(tmp_path / "o.json"),
            str(ws / "model32.safetensors")]
    assert main([*base, "--mixed_precision", "bf16"]) == 2
    assert "--mixed_precision bf16" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "img" / ".sdtune-cache").exists()


def test_prepare_buckets_latents_script_help():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "finetune" / "prepare_buckets_latents.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: prepare_buckets_latents.py" in proc.stdout
    assert all(name in proc.stdout for name in ("train_data_dir", "in_json", "out_json", "model_name_or_path",
                                                "--max_resolution", "--mixed_precision", "--bucket_no_upscale"))
