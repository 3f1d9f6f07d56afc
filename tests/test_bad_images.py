"""An image that is damaged but whose size the metadata gives: planning does not open it, so it is
found when a batch first loads it. Before, a raw UserWarning appeared inside the progress bar at
every epoch and the summary did not count it. Now: one warning line, the image left out of every
later batch, counted in the summary with the other skipped images; under --strict one error line.
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.testing import make_dataset, write_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

BAD = "img_000.png"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    write_tiny_model(root / "model.safetensors", "sd1", seed=0)
    meta = make_dataset(root / "data", n=2, seed=0, metadata=root / "meta.json")
    assert all("image_size" in m for m in meta.values())  # so planning reads no header
    data = (root / "data" / BAD).read_bytes()
    (root / "data" / BAD).write_bytes(data[:len(data) // 2])  # the header is intact, the pixels cut off
    return root


def _train(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(ws / "model.safetensors"),
            "--in_json", str(ws / "meta.json"), "--train_data_dir", str(ws / "data"), "--output_dir", str(out), "--output_name", "N", "--resolution", "64",
            "--train_batch_size", "1", "--max_train_epochs", "2", "--learning_rate", "1e-3", "--seed", "1", *extra]


def _lines(text: str) -> list[str]:
    return [line.strip() for chunk in text.split("\n") for line in chunk.split("\r") if line.strip()]


def test_a_damaged_image_is_reported_once_and_counted(ws, tmp_path, capsys, recwarn):
    assert main(_train(ws, tmp_path / "out", "--max_data_loader_n_workers", "0")) == 0
    captured = capsys.readouterr()
    lines = _lines(captured.out + captured.err)
    assert not [str(w.message) for w in recwarn if BAD in str(w.message)]  # no Python warning, in any epoch
    assert "UserWarning" not in captured.err
    about = [line for line in lines if BAD in line and "steps:" not in line and "->" not in line]
    warned = [line for line in about if line.startswith("warning:")]
    assert len(warned) == 1, about  # two epochs, one line
    assert warned[0].endswith("skipped") and "cannot be decoded" in warned[0]
    assert re.search(r"\b1 images? skipped: 1 cannot be decoded", captured.out)  # the closing count

    summary = json.loads((tmp_path / "out" / "N-train_summary.json").read_text())
    assert [Path(s["path"]).name for s in summary["skipped_images"]] == [BAD]
    assert summary["skipped_images"][0]["reason"].startswith("cannot be decoded")
    # 2 images, batch 1: 2 batches per epoch, 2 epochs; the damaged image's batch is left out of both
    assert summary["steps"] == 2


def test_strict_stops_at_the_damaged_image_with_one_line(ws, tmp_path, capsys):
    # one worker process: the failure crosses the process boundary as data, not as a wrapped traceback
    assert main(_train(ws, tmp_path / "out", "--max_data_loader_n_workers", "1", "--strict")) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in _lines(captured.err) if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and BAD in errors[0], captured.err
    assert "cannot be decoded" in errors[0] and "--strict" in errors[0]
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_failed_sample_is_not_decoded_again(ws):
    """Once found, the loader leaves it out without opening it: the sample's batch comes back empty
    with no failure listed, even after the file is readable again."""
    from PIL import Image

    from sdtune.data import BucketBatchSampler, build_plan
    from sdtune.data.dataset import BatchDataset
    from sdtune.data.failures import LoadFailures
    from sdtune.data.options import DatasetOptions

    opts = DatasetOptions(in_json=str(ws / "meta.json"), train_data_dir=str(ws / "data"), resolution="64")
    plan = build_plan(opts, seed=0)
    bad = next(s.index for s in plan.samples if Path(s.path).name == BAD)
    spec = next(b for b in BucketBatchSampler(plan, seed=0).epoch_batches(0) if bad in b.indices)
    dataset = BatchDataset(plan)
    failures = LoadFailures(plan, dataset)
    batch = dataset[spec]
    assert batch.indices == [] and [i for i, _r in batch.failed] == [bad]
    assert failures.admit(batch) is False and len(failures.skipped) == 1
    assert failures.admit(dataset[spec]) is False and len(failures.skipped) == 1  # counted once

    copy = ws.parent / "bad_images_readable"
    copy.mkdir(exist_ok=True)
    Image.new("RGB", (96, 64)).save(copy / BAD)
    plan.samples[bad] = dataclasses.replace(plan.samples[bad], path=str(copy / BAD))
    assert dataset[spec].indices == [] and dataset[spec].failed == []  # not opened
    assert BatchDataset(plan)[spec].indices == [bad]  # a fresh loader does open it
