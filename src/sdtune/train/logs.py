"""What a run leaves behind besides the model: tracker logs, a summary file, a loss curve.

    RunLogger       scalars and sample images to TensorBoard (`--logging_dir`) and/or wandb
    TrainProgress   the console bar: step, running-mean loss, lr, epoch; tqdm adds it/s and ETA
    write_summary   `train_summary.json`: options, steps, time, final loss, outputs (atomic)
    write_history   `history.json`: the loss at every step and the saves of the whole run (atomic)
    trained_settings  what the run trained with (resolution, clip skip, total batch), for the summary and ModelSpec
    plot_loss       a PNG of the loss curve (matplotlib, optional)

Only the main process should create a `RunLogger`. TensorBoard goes through
`torch.utils.tensorboard` (tensorboard is an optional extra) rather than accelerate's trackers, so
that logging does not depend on how the loop is launched and image logging needs no extra glue.
The layout is sd-scripts': `<logging_dir>/<log_prefix><timestamp>/<tracker name>/events.*`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sdtune.atomic import write_bytes
from sdtune.errors import UserError

__all__ = ["RunLogger", "TrainProgress", "RunningMean", "default_run_name", "load_tracker_config",
           "sanitize_config", "wandb_init_args", "write_summary", "write_history", "trained_settings", "plot_loss",
           "running_mean", "LOG_WITH"]

LOG_WITH = ("tensorboard", "wandb", "all")
# Beyond the options declared secret: names ending so hold credentials (huggingface_token) in a mapping
# that did not come from the options; max_token_length does not.
_SECRET_ENDINGS = ("api_key", "_token", "token", "password", "secret")


def default_run_name(log_prefix: str | None = None) -> str:
    """sd-scripts' run folder name: the prefix, then the local start time."""
    return f"{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"


def sanitize_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON-able values, without secrets (API keys, tokens) — safe to log or share."""
    from sdtune.config import secret_names
    from sdtune.train.options import TrainOptions

    declared = secret_names(TrainOptions)
    out = {}
    for key, value in options.items():
        if key in declared or key.lower().endswith(_SECRET_ENDINGS):
            continue
        out[key] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return str(value)  # Path, enums, dtypes


def load_tracker_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """`--log_tracker_config`: a TOML whose tables are per-tracker init arguments ([wandb], [tensorboard])."""
    from sdtune.config import read_toml

    data = read_toml(path, "tracker config")
    for key, value in data.items():
        if key not in ("wandb", "tensorboard"):
            raise UserError(f"unknown tracker {key!r}", where=str(path), fix="Use [wandb] or [tensorboard] tables.")
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a table of init arguments", where=str(path))
    return data


def wandb_init_args(project: str, run_name: str, logging_dir: str | Path | None, config: Mapping[str, Any],
                    kwargs: Mapping[str, Any], api_key: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """What `wandb.init` gets, and the environment it reads the API key from.

    The key goes to wandb through WANDB_API_KEY for this process only, not through `wandb.login`, which
    would store it in ~/.netrc: a key given on the command line reaches no file.
    """
    args: dict[str, Any] = {"project": project, "name": run_name, "config": dict(config)}
    if logging_dir is not None:
        args["dir"] = str(logging_dir)
    args.update(kwargs)
    return args, ({"WANDB_API_KEY": api_key} if api_key else {})


class RunLogger:
    """Scalars and images to the chosen trackers, keyed by optimizer step.

    `log_with` None with a `logging_dir` means TensorBoard, as in sd-scripts. With neither, every
    call does nothing, so the loop needs no `if`.
    """

    def __init__(self, logging_dir: str | Path | None, log_with: str | None, run_name: str | None = None,
                 config: Mapping[str, Any] | None = None, *, tracker_name: str = "finetuning",
                 init_kwargs: Mapping[str, Mapping[str, Any]] | None = None, wandb_api_key: str | None = None):
        if log_with is None and logging_dir is not None:
            log_with = "tensorboard"
        if log_with is not None and log_with not in LOG_WITH:
            raise UserError(f"unknown tracker {log_with!r}", where="--log_with", fix=f"Use one of: {', '.join(LOG_WITH)}.")
        if log_with in ("tensorboard", "all") and logging_dir is None:
            raise UserError(f"--log_with {log_with} needs a folder for the TensorBoard logs", where="--logging_dir",
                            fix="Pass --logging_dir DIR.")
        init_kwargs = init_kwargs or {}
        self.run_name = run_name or default_run_name()
        self.config = sanitize_config(config or {})
        self.log_dir: Path | None = None
        self._tb = None
        self._wandb = None
        if log_with in ("tensorboard", "all"):
            self._tb = self._open_tensorboard(Path(logging_dir) / self.run_name / tracker_name,
                                              init_kwargs.get("tensorboard", {}))
        if log_with in ("wandb", "all"):
            self._wandb = self._open_wandb(tracker_name, logging_dir, init_kwargs.get("wandb", {}), wandb_api_key)

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def _open_tensorboard(self, log_dir: Path, kwargs: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard logging needs the tensorboard package", where="--log_with",
                            fix="pip install tensorboard (or 'sdtune[tensorboard]').") from None
        self.log_dir = log_dir
        writer = SummaryWriter(log_dir=str(log_dir), **kwargs)
        if self.config:
            # Markdown code block so TensorBoard's text tab shows it as written.
            writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, sort_keys=True) + "\n```", 0)
        return writer

    def _open_wandb(self, project: str, logging_dir, kwargs: Mapping[str, Any], api_key: str | None):
        try:
            import wandb
        except ImportError:
            raise UserError("wandb logging needs the wandb package", where="--log_with",
                            fix="pip install wandb, or use --log_with tensorboard.") from None
        args, env = wandb_init_args(project, self.run_name, logging_dir, self.config, kwargs, api_key)
        if logging_dir is not None:
            Path(logging_dir).mkdir(parents=True, exist_ok=True)
        os.environ.update(env)
        return wandb.init(**args)

    def log(self, step: int, values: Mapping[str, float] | None = None, **scalars: float) -> None:
        """Scalars at an optimizer step: `log(10, {"loss/average": 0.1}, lr=1e-5)`."""
        merged = {**(values or {}), **scalars}
        if not merged or not self.active:
            return
        clean = {k: float(v) for k, v in merged.items() if v is not None}
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_images(self, step: int, name: str, paths: Sequence[str | Path],
                   captions: Sequence[str] | None = None) -> None:
        """PNG files (e.g. the samples of one sampling point) as `<name>/00`, `<name>/01`, ..."""
        if not self.active or not paths:
            return
        import numpy as np
        from PIL import Image

        for i, path in enumerate(paths):
            tag = f"{name}/{i:02d}"
            caption = captions[i] if captions and i < len(captions) else None
            if self._tb is not None:
                with Image.open(path) as im:
                    array = np.asarray(im.convert("RGB"))
                self._tb.add_image(tag, array, step, dataformats="HWC")
            if self._wandb is not None:
                import wandb

                self._wandb.log({f"{name}_{i}": wandb.Image(str(path), caption=caption)}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunningMean:
    """Mean of the last `window` values in O(1) per update (the bar's and the log's loss)."""

    def __init__(self, window: int = 50):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.values: deque[float] = deque(maxlen=window)
        self._sum = 0.0

    def add(self, value: float) -> float:
        if len(self.values) == self.values.maxlen:
            self._sum -= self.values[0]
        self.values.append(value)
        self._sum += value
        return self.mean

    @property
    def mean(self) -> float:
        return self._sum / len(self.values) if self.values else float("nan")


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean of each point over up to `window` points (shorter at the start)."""
    out, acc = [], RunningMean(window)
    for v in values:
        out.append(acc.add(v))
    return out


class TrainProgress:
    """The training bar: `steps 120/1000 [00:40<04:53, 3.0it/s, loss=0.1123, lr=1.00e-05, epoch=2]`."""

    def __init__(self, total: int, *, initial: int = 0, disable: bool = False, window: int = 50, file=None):
        from tqdm.auto import tqdm

        self.loss = RunningMean(window)
        # `initial` for a resumed run: the ETA then counts only the steps still to do.
        self.bar = tqdm(total=total, initial=initial, desc="steps", disable=disable, dynamic_ncols=True,
                        smoothing=0.1, file=file)

    def update(self, loss: float, lr: float | None = None, epoch: int | None = None, steps: int = 1) -> float:
        """Advance by `steps` optimizer steps; returns the running-mean loss."""
        mean = self.loss.add(float(loss))
        postfix = {"loss": f"{mean:.4f}"}
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        if epoch is not None:
            postfix["epoch"] = epoch
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps)
        return mean

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self.bar.write(message, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def trained_settings(datasets: Sequence[Any], *, clip_skip: int, num_processes: int,
                     gradient_accumulation_steps: int) -> dict[str, Any]:
    """The values the run trained with, not the raw flags (which may be unset or overridden by the dataset config).

    `datasets` are the plan's datasets (`.resolution` as (width, height), `.batch_size`). With several,
    the resolution recorded is the largest in area (the first of equals) and every one is listed; the
    batch size per process is the largest. `clip_skip` is the one the conditioner resolved (in sdtune's
    numbering, default included).
    """
    sizes = [tuple(d.resolution) for d in datasets]
    pick = max(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], -i))
    batch = max(int(d.batch_size) for d in datasets)
    out: dict[str, Any] = {
        "resolution": f"{sizes[pick][0]}x{sizes[pick][1]}",
        "clip_skip": int(clip_skip),
        "batch_size_per_process": batch,
        "num_processes": int(num_processes),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "total_batch_size": batch * int(num_processes) * int(gradient_accumulation_steps),
    }
    if len(sizes) > 1:
        out["resolution_of"] = f"dataset {pick + 1} of {len(sizes)} (the largest)"
        out["dataset_resolutions"] = [f"{w}x{h}" for w, h in sizes]
    return out


def write_summary(path: str | Path, options: Mapping[str, Any], steps: int, seconds: float, final_loss: float | None,
                  outputs: Iterable[str | Path], *, steps_this_run: int | None = None, **extra: Any) -> Path:
    """`train_summary.json`: what ran, for how long, how it ended, what it wrote. Atomic.

    `steps` counts the whole run; `steps_this_run`, the steps of this process's `seconds` when it
    resumed a run (the speed is theirs). `extra` adds fields (epochs, samples, loss_plot, family, ...).
    Secrets are dropped from the options; NaN/inf become null, since JSON has no such numbers.
    """
    from sdtune import __version__

    path = Path(path)
    done = steps if steps_this_run is None else steps_this_run
    summary = {
        "tool": f"sdtune {__version__}",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": int(steps),
        "seconds": round(float(seconds), 3),
        "steps_per_second": round(done / seconds, 4) if seconds > 0 else None,
        "final_loss": _jsonable(None if final_loss is None else float(final_loss)),
        "outputs": [str(p) for p in outputs],
        **{k: _jsonable(v) for k, v in extra.items()},
        "options": sanitize_config(options),
    }
    write_bytes(path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path


def write_history(path: str | Path, record: Mapping[str, Any]) -> Path:
    """The run's record (RunHistory.record: steps, losses, outputs, gaps) as JSON, for re-plotting or
    comparing runs. Atomic; compact, since a long run has a number per step."""
    path = Path(path)
    write_bytes(path, (json.dumps(_jsonable(dict(record)), separators=(",", ":"), allow_nan=False)
                               + "\n").encode("utf-8"))
    return path


def plot_loss(path: str | Path, steps: Sequence[int], losses: Sequence[float], *, window: int | None = None,
              title: str = "training loss") -> Path | None:
    """Raw losses as faint points and their running mean as a line; None (and a notice) without matplotlib.

    Uses matplotlib's object API with the Agg canvas directly, so it never changes the process's
    pyplot backend or opens a window.
    """
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed, so no loss plot was drawn (pip install matplotlib)")
        return None
    import io

    path = Path(path)
    points = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v)]
    window = window or max(1, min(100, len(points) // 20))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=4, alpha=0.3, color="tab:blue", label="loss", linewidths=0)
        ax.plot(xs, running_mean(ys, window), color="tab:orange", linewidth=1.8, label=f"mean of last {window}")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no finite losses", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
    return path
