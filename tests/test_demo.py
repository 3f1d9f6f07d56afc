"""`sdtune demo` runs the whole workflow and leaves every artefact it promises."""

import json

import pytest
from safetensors import safe_open

from sdtune.cli import main

pytestmark = pytest.mark.slow  # trains or runs subprocesses: left out of `make test-fast`


def test_demo_runs_the_whole_workflow(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo", str(root), "--steps", "4", "--images", "8"]) == 0
    out = capsys.readouterr().out
    for command in ("$ sdtune tag", "$ sdtune caption", "$ sdtune merge", "$ sdtune cache", "$ sdtune train"):
        assert command in out
    meta = json.loads((root / "meta.json").read_text())
    assert len(meta) == 8 and all(v.get("caption") and v.get("tags") for v in meta.values())
    assert len(list((root / "images" / ".sdtune-cache").glob("*.safetensors"))) == 8  # latents; text/ holds embeddings
    model = root / "output" / "demo.safetensors"
    with safe_open(str(model), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
    assert sorted(p.name for p in (root / "output" / "sample").glob("*_grid.png")) == ["demo_000002_grid.png",
                                                                                      "demo_000004_grid.png"]
    assert (root / "output" / "demo-loss.png").stat().st_size > 1000
    summary = json.loads((root / "output" / "demo-train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["outputs"] == [str(model)]
    assert list((root / "logs").rglob("events.out.tfevents.*"))
