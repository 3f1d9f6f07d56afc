"""Training state for exact resume.

A state folder holds what accelerate saves (model, optimizer, LR scheduler, gradient scaler, RNG
states) plus our `train_state.json` — step, epoch and the position in the epoch's batch order, and
the options that shaped the run — the EMA weights when EMA is on, and `history.json`, the run's loss
at every step and its saves so far (see train/history.py), which the resumed run continues. Because
every random draw in the loop comes from a generator derived from (seed, epoch, batch, rank),
restoring the position is enough to continue with the very numbers an uninterrupted run would have
drawn.

A state is written to a temporary folder and renamed into place, so a crash or a full disk during
a save leaves the previous state untouched. A state damaged afterwards (a truncated copy, a failing
disk) is refused with one line naming the file: its structure is checked before any model loads
(`check_state_files`), and a file that still fails to load is found at load (`_load_error`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtune.atomic import swap_folder
from sdtune.config import option_names, secret_names
from sdtune.errors import UserError, write_error
from sdtune.train.options import TrainOptions
from sdtune.train.weights import raise_together

STATE_FILE = "train_state.json"
HISTORY_FILE = "history.json"
FORMAT = 1

@dataclass
class Position:
    global_step: int = 0
    epoch: int = 0          # 0-based epoch to continue in
    batch: int = 0          # next batch index within that epoch (this rank's view)
    micro_steps: int = 0    # micro-batches done in total (for logging)


def significant_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that must match on resume: those declared `resume="same"` (every option not
    declared otherwise), without the secrets (a new API key changes nothing in training), even when
    given in a dict that still holds them."""
    hidden = {*option_names(TrainOptions, resume="may_change"), *option_names(TrainOptions, resume="length"),
              *secret_names(TrainOptions)}
    return {k: v for k, v in sorted(options.items()) if k not in hidden}


def save_state(accelerator, directory: Path, position: Position, options: dict[str, Any], ema=None,
               dataset: dict[str, Any] | None = None, history: dict[str, Any] | None = None) -> Path:
    """Write a state folder atomically (all processes call this; the main process renames).

    `history` is the run's record up to this state (RunHistory.record), written inside it so that
    it is never older or newer than the weights it describes."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    failure = None
    try:
        _write_state(accelerator, directory, tmp, position, options, ema, dataset, history)
    except BaseException as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial state filling the disk
        if not isinstance(exc, Exception):  # Ctrl-C twice: abort at once
            raise
        failure = write_error(exc, directory) or exc
    raise_together(failure, accelerator)
    return directory


def _write_state(accelerator, directory: Path, tmp: Path, position: Position, options: dict[str, Any], ema,
                 dataset: dict[str, Any] | None, history: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    failure = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as exc:
        failure = exc
    # every process writes files of its own (random states, FSDP shards): all are written before the
    # main process renames the folder
    raise_together(failure, accelerator)
    if accelerator.is_main_process:
        secret = secret_names(TrainOptions)
        public = {k: v for k, v in options.items() if k not in secret}
        record = {"format": FORMAT, "position": asdict(position), "options": significant_options(options),
                  "all_options": public, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if dataset is not None:
            record["dataset"] = dataset
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
            record["ema_updates"] = ema.updates
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if history is not None:  # compact: a long run's history has a number per step
            (tmp / HISTORY_FILE).write_text(json.dumps(history, separators=(",", ":"), allow_nan=False) + "\n")
        # A kill between the swap's two renames leaves the previous state as <name>.old, which
        # read_state falls back to.
        swap_folder(tmp, directory, directory.with_name(directory.name + ".old"))


def resolve_state_dir(directory: str | Path) -> Path:
    """The folder itself, or `<folder>.old` when a save was killed between its two renames."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not (directory / STATE_FILE).is_file() and (old / STATE_FILE).is_file():
        return old
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    directory = resolve_state_dir(directory)
    path = directory / STATE_FILE
    if not directory.exists():
        raise UserError("the state folder to resume from does not exist", where=str(directory),
                        fix="Check the path given to --resume; states are written as <output_name>-state or "
                            "<output_name>-000004-state in --output_dir.")
    if not path.is_file():
        raise UserError(f"not a training state folder (no {STATE_FILE})", where=str(directory),
                        fix="Pass a folder written by --save_state, such as <output_name>-000004-state.")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt {STATE_FILE} ({exc})", where=str(directory), fix=_DAMAGED_FIX) from None
    if record.get("format") != FORMAT:
        raise UserError(f"state format {record.get('format')} is not supported (expected {FORMAT})", where=str(directory))
    check_state_files(directory)
    return record


# what accelerate writes for every run (the U-Net, its optimizer and LR schedule); the rest varies
_ALWAYS_SAVED = ("model.safetensors", "optimizer.bin", "scheduler.bin")
# under DeepSpeed accelerate writes the LR schedule; the engine writes the rest into its own folder
_DEEPSPEED_FOLDER = "pytorch_model"
_DEEPSPEED_SAVED = ("scheduler.bin",)
# under FSDP accelerate writes sharded folders (torch.distributed.checkpoint: a .metadata file and one
# .distcp file per process) for the model and the optimizer, or one full file each
_FSDP_SHARDED = ("pytorch_model_fsdp_0", "optimizer_0")
_FSDP_FULL = ("pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.bin")
_DAMAGED_FIX = ("Resume from another state folder (an earlier save), or train without --resume. States are written "
                "whole or not at all: a damaged file was damaged later, by the storage or a copy.")


def check_state_files(directory: Path) -> None:
    """Refuse a state whose files are visibly damaged (truncated, or not the format their name says),
    in milliseconds, before any model loads: the safetensors headers against the file sizes, and the
    end-of-archive records of torch's zip files (.bin, .pkl, .pt), which a truncated file lacks."""
    engine = directory / _DEEPSPEED_FOLDER  # DeepSpeed's own checkpoint: weights and optimizer shards
    sharded = (directory / _FSDP_SHARDED[0]).is_dir()
    required = (_DEEPSPEED_SAVED if engine.is_dir() else _DEEPSPEED_SAVED if sharded
                else _FSDP_FULL if (directory / _FSDP_FULL[0]).is_file() else _ALWAYS_SAVED)
    for name in required + (tuple(f"{n}/.metadata" for n in _FSDP_SHARDED) if sharded else ()):
        if not (directory / name).is_file():
            raise UserError(f"incomplete training state: {name} is missing", where=str(directory), fix=_DAMAGED_FIX)
    if engine.is_dir() and not any(engine.glob("*model_states.pt")):
        raise UserError(f"incomplete training state: {_DEEPSPEED_FOLDER}/ holds no model states", where=str(directory),
                        fix=_DAMAGED_FIX)
    for path in sorted(directory.iterdir()) + (sorted(engine.iterdir()) if engine.is_dir() else []):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            problem = _zip_problem(path)
        if problem:
            raise UserError(f"damaged training state: {path.name} is {problem}", where=str(directory), fix=_DAMAGED_FIX)


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return f"truncated ({size} bytes, shorter than its header)"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return f"not a readable safetensors file ({size} bytes)"
    if end != size - 8 - n:
        return f"truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"truncated or corrupt ({path.stat().st_size} bytes; {exc})"
    return None


def check_compatible(record: dict[str, Any], options: dict[str, Any], allow_changes: bool, where: str) -> list[str]:
    """The differences in significant options; refused unless allowed."""
    # filtered again: a state saved by an earlier version may hold a secret among its options
    saved, now = significant_options(record["options"]), significant_options(options)
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs and not allow_changes:
        listed = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"the options differ from the run that saved this state: {listed}", where=where,
                        fix="Resume with the same options, or add --resume_allow_changes to accept the differences.")
    return diffs


def dataset_fingerprint(plan) -> dict[str, Any]:
    """What decides the batch order of every epoch: the trained images (by file name, so a moved
    dataset folder still matches), their subsets and buckets. Saved with the state, so that a resume
    over a changed dataset, whose epochs would no longer continue where they stopped, is noticed."""
    h = hashlib.sha256()
    for s in plan.active:
        h.update(f"{s.subset}\t{Path(s.path).name}\t{s.bucket[0]}x{s.bucket[1]}\n".encode())
    return {"images": len(plan.active), "sha256": h.hexdigest()}


def check_dataset(record: dict[str, Any], now: dict[str, Any], allow_changes: bool, where: str) -> bool:
    """True when the dataset matches the one the state was saved with (or the state predates the
    check); a different one is refused unless allowed."""
    saved = record.get("dataset")
    if saved is None or saved == now:
        return True
    if not allow_changes:
        raise UserError(f"the dataset differs from the run that saved this state ({saved['images']} -> {now['images']} "
                        "images, or other files or buckets): the resumed epoch would not continue where it stopped",
                        where=where, fix="Resume with the same images and bucket options, or add "
                                         "--resume_allow_changes to continue anyway (the order of the epoch changes).")
    return False


def check_remaining(record: dict[str, Any], max_steps: int, where: str) -> None:
    """Refuse a resume with nothing left to train: the step count covers the whole run."""
    done = record["position"]["global_step"]
    if done >= max_steps:
        raise UserError(f"this state is at step {done} and the run ends at step {max_steps}: nothing is left to train "
                        "(the step count covers the whole run, including the steps before the state; sd-scripts' "
                        "fine_tune.py counts from the resume instead)", where=where,
                        fix=f"To train N more steps, pass --max_train_steps {done}+N (or a larger --max_train_epochs).")


# Schedules whose learning rate at a step does not depend on the run's length: a run continued to a
# larger --max_train_steps from a state then equals one run of that length.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def length_change_note(record: dict[str, Any], options: dict[str, Any]) -> str | None:
    """A note when the resumed run is longer or shorter than the saved one and its learning-rate
    schedule depends on the length (or the warm-up is a fraction of it)."""
    saved = record.get("all_options") or {}
    keys = option_names(TrainOptions, resume="length")
    if all(saved.get(k) == options.get(k) for k in keys):
        return None
    fractional = _fractional_warmup(options.get("lr_warmup_steps"))
    if options.get("lr_scheduler") in LENGTH_FREE_SCHEDULES and not fractional:
        return None
    changed = ", ".join(f"--{k} {saved.get(k)} -> {options.get(k)}" for k in keys if saved.get(k) != options.get(k))
    return (f"the training length changed ({changed}): the {options.get('lr_scheduler')} schedule"
            f"{' with its fractional warm-up' if fractional else ''} is rebuilt over the new length and continues "
            "from the state's step, so the result differs from one run of the new length (constant schedules match)")


def follow_new_length(lr_scheduler) -> None:
    """After loading a state into a schedule rebuilt over a new length: the optimizer's learning rate
    is still the saved run's value at the state's step (0 at the end of a cosine run); set it from the
    new schedule, so that the next step already follows it. For schedules given as a function of the
    step (every diffusers schedule); others keep the saved value."""
    import torch

    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _fractional_warmup(warmup) -> bool:
    text = str(warmup or 0).strip()
    if text.endswith("%"):
        return True
    try:
        return 0 < float(text) < 1
    except ValueError:  # refused with its own message when the schedule is built
        return False


def load_state(accelerator, directory: str | Path, ema=None) -> Position:
    from safetensors.torch import load_file

    directory = resolve_state_dir(directory)
    record = read_state(directory)
    try:
        accelerator.load_state(str(directory))
    except Exception as exc:
        raise _load_error(exc, directory) from exc
    if ema is not None:
        ema_file = directory / "ema.safetensors"
        if not ema_file.is_file():
            raise UserError("this state has no EMA weights but --ema is on", where=str(directory),
                            fix="Resume without --ema, or from a state saved with --ema.")
        try:
            tensors = load_file(str(ema_file))
        except Exception as exc:
            raise _load_error(exc, directory, ema_file) from exc
        ema.load_state_dict(tensors, record.get("ema_updates", 0))
    return Position(**record["position"])


def _load_error(exc: Exception, directory: Path, file: Path | None = None) -> Exception:
    """A UserError naming the file of the state that could not be read; the error itself when no file
    of the state is at fault (a bug keeps its traceback).

    The readers (safetensors, torch's zip reader) do not say which file they were reading, and damage
    inside a file passes the cheap checks of `check_state_files`: the files are tried one by one."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return UserError(f"incomplete training state: {Path(exc.filename).name} is missing", where=str(directory),
                         fix=_DAMAGED_FIX)
    for path in [file] if file else sorted(directory.iterdir()):
        problem = _read_problem(path)
        if problem:
            return UserError(f"damaged training state: {path.name} cannot be read ({problem})", where=str(directory),
                             fix=_DAMAGED_FIX)
    if isinstance(exc, RuntimeError) and ("size mismatch" in str(exc) or "Missing key" in str(exc)):
        return UserError(f"the training state does not fit this model ({str(exc).splitlines()[0]})",
                         where=str(directory), fix="Resume with the model and options the state was saved with.")
    return exc


def _read_problem(path: Path) -> str | None:
    """Why a file of a state cannot be read in full, or None."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix in (".bin", ".pkl", ".pt"):
            load(path, map_location="cpu")  # the reader accelerate's load_state uses (weights only)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
