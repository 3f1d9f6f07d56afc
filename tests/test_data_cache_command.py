"""`sdtune cache` as a user runs it: the latents it writes are the ones `sdtune train` reuses,
without a single VAE encoder call, whatever precision the checkpoint file is stored in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import register_module_forward_hook

from sdtune.cli import main
from sdtune.testing import make_dataset, write_tiny_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachecmd")
    model = write_tiny_model(root / "model32.safetensors", "sd1", seed=0)
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
    err = capsys.readouterr().err
    assert "0 reused, 5 encoded, 0 images skipped" in err

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
    assert again.calls == 0 and "5 reused, 0 encoded" in capsys.readouterr().err


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
