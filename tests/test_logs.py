"""Run logs (sdtune.train.logs): TensorBoard events read back with tensorboard's own reader,
the summary JSON, the loss plot, and the progress bar's running mean against numpy."""

import importlib.util
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from sdtune.errors import UserError
from sdtune.train.logs import (RunLogger, TrainProgress, load_tracker_config, plot_loss, running_mean,
                               sanitize_config, write_summary)


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_images_and_config(tmp_path):
    png = tmp_path / "s.png"
    Image.new("RGB", (24, 16), (200, 10, 30)).save(png)
    config = {"learning_rate": 1e-5, "wandb_api_key": "SECRET", "output_dir": tmp_path}
    logger = RunLogger(tmp_path / "logs", "tensorboard", "run1", config)
    for step in (1, 2, 3):
        logger.log(step, {"loss/current": 0.5 / step, "lr/unet": 1e-5}, grad_norm=float(step))
    logger.log_images(3, "samples", [png, png])
    logger.close()
    logger.close()  # a second close is harmless

    log_dir = tmp_path / "logs" / "run1" / "finetuning"  # sd-scripts' layout
    assert logger.log_dir == log_dir
    acc = read_events(log_dir)
    tags = acc.Tags()
    assert {"loss/current", "lr/unet", "grad_norm"} <= set(tags["scalars"])
    loss = acc.Scalars("loss/current")
    assert [e.step for e in loss] == [1, 2, 3]
    assert np.allclose([e.value for e in loss], [0.5, 0.25, 0.5 / 3])
    assert [e.value for e in acc.Scalars("grad_norm")] == [1.0, 2.0, 3.0]
    assert set(tags["images"]) == {"samples/00", "samples/01"}
    image = acc.Images("samples/01")[0]
    assert image.step == 3 and (image.width, image.height) == (24, 16)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert (decoded == [200, 10, 30]).all()
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "learning_rate" in config_text and "SECRET" not in config_text


def test_tracker_selection_rules(tmp_path):
    # sd-scripts: a logging_dir alone means TensorBoard.
    logger = RunLogger(tmp_path / "l", None, "r")
    assert logger.active and logger.log_dir == tmp_path / "l" / "r" / "finetuning"
    logger.close()
    with pytest.raises(UserError, match="--logging_dir"):
        RunLogger(None, "tensorboard")
    with pytest.raises(UserError, match="unknown tracker"):
        RunLogger(tmp_path, "comet")
    off = RunLogger(None, None)
    off.log(1, loss=1.0)  # no trackers: a no-op, not an error
    off.log_images(1, "samples", ["missing.png"])
    assert not off.active and not (tmp_path / "l2").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        RunLogger(tmp_path, "wandb")
    assert "pip install wandb" in str(err.value)


def test_tracker_config_file(tmp_path):
    good = tmp_path / "t.toml"
    good.write_text('[wandb]\nentity = "me"\ntags = ["a"]\n')
    assert load_tracker_config(good) == {"wandb": {"entity": "me", "tags": ["a"]}}
    bad = tmp_path / "b.toml"
    bad.write_text('[comet]\nx = 1\n')
    with pytest.raises(UserError, match="unknown tracker 'comet'"):
        load_tracker_config(bad)


def test_summary_json(tmp_path):
    options = {"learning_rate": 2e-6, "max_token_length": 150, "output_dir": tmp_path / "out",
               "wandb_api_key": "k", "huggingface_token": "t", "optimizer_args": ("a=1",), "nan": float("nan")}
    path = write_summary(tmp_path / "run" / "train_summary.json", options, steps=40, seconds=8.0, final_loss=0.125,
                         outputs=[tmp_path / "out" / "last.safetensors"], epochs=2, loss_plot=tmp_path / "loss.png",
                         last_ema=float("inf"))
    data = json.loads(path.read_text())
    assert data["steps"] == 40 and data["seconds"] == 8.0 and data["steps_per_second"] == 5.0
    assert data["final_loss"] == 0.125 and data["epochs"] == 2 and data["last_ema"] is None
    assert data["outputs"] == [str(tmp_path / "out" / "last.safetensors")]
    assert data["loss_plot"] == str(tmp_path / "loss.png")
    opts = data["options"]
    assert opts["learning_rate"] == 2e-6 and opts["max_token_length"] == 150
    assert opts["output_dir"] == str(tmp_path / "out") and opts["optimizer_args"] == ["a=1"] and opts["nan"] is None
    assert "wandb_api_key" not in opts and "huggingface_token" not in opts
    assert data["tool"].startswith("sdtune ")
    assert [p.name for p in path.parent.iterdir()] == ["train_summary.json"]  # no temp file left behind
    # NaN final loss is null, and the file stays strict JSON.
    write_summary(path, {}, 0, 0.0, float("nan"), [])
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))["final_loss"] is None


def test_sanitize_keeps_ordinary_token_options():
    kept = sanitize_config({"max_token_length": 75, "keep_tokens": 1, "token_warmup_step": 0, "hub_token": "x"})
    assert set(kept) == {"max_token_length", "keep_tokens", "token_warmup_step"}


def test_running_mean_against_numpy():
    values = list(np.random.default_rng(0).normal(size=300))
    expected = [np.mean(values[max(0, i - 49):i + 1]) for i in range(len(values))]
    assert np.allclose(running_mean(values, 50), expected, atol=1e-12)


def test_progress_bar_shows_running_mean_and_lr():
    out = io.StringIO()
    bar = TrainProgress(10, window=3, file=out)
    for loss in (1.0, 2.0, 3.0, 10.0):
        mean = bar.update(loss, lr=1e-4, epoch=1)
    bar.close()
    assert mean == pytest.approx(5.0)  # (2 + 3 + 10) / 3
    text = out.getvalue()
    assert "4/10" in text and "loss=5.0000" in text and "lr=1.00e-04" in text and "it/s" in text


@pytest.mark.slow
def test_loss_plot_is_a_valid_png(tmp_path):
    steps = list(range(1, 201))
    losses = [1.0 / s + 0.05 * ((s * 7919) % 13) / 13 for s in steps]
    losses[10] = float("nan")  # a NaN step must not break the plot
    path = plot_loss(tmp_path / "plots" / "loss.png", steps, losses)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (800, 450)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # The running-mean line is drawn in matplotlib's tab:orange (255, 127, 14).
    orange = (np.abs(rgb - [255, 127, 14]).sum(axis=-1) < 40).sum()
    assert orange > 200
    with pytest.raises(ValueError):
        plot_loss(tmp_path / "x.png", [1, 2], [1.0])


def test_loss_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails
    assert plot_loss(tmp_path / "loss.png", [1], [1.0]) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()
