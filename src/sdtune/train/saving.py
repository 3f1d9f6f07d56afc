"""When to save, what the files are called, and which old saves to remove.

Names follow sd-scripts so existing scripts and UIs find the files:

    <name>.safetensors                  final model
    <name>-000004.safetensors           after epoch 4 (--save_every_n_epochs)
    <name>-step00001000.safetensors     after step 1000 (--save_every_n_steps)
    <name>-000004-state/ ...            the matching training state (--save_state)
    <name>-state/                       state at the end of training (or on Ctrl-C)

Without --output_name, sd-scripts names the final save `last`, the epoch saves `epoch-000004` and
the step saves `at-step00001000` (`default_names`).

Retention (`--save_last_n_epochs N`, `--save_last_n_steps N`) is computed from the names on disk,
not from an in-memory list, so it keeps working across resumes. No torch here.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdtune.config import implied_value
from sdtune.train.options import SavingOptions

EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": "", "pt": ".pt"}


def default_names(output_name: str | None) -> tuple[str, str, str]:
    """The (final, epoch, step) save names: `--output_name` for all, or sd-scripts' defaults."""
    final = implied_value(SavingOptions, "output_name")
    return (output_name, output_name, output_name) if output_name else (final, "epoch", "at")


def epoch_stem(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}"


def step_stem(name: str, step: int) -> str:
    return f"{name}-step{step:08d}"


@dataclass(frozen=True)
class SavePolicy:
    name: str
    directory: Path
    fmt: str
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps_state: int | None = None
    save_state: bool = False
    epoch_name: str = ""  # the name of the epoch saves, when not `name` (default_names)
    step_name: str = ""   # the name of the step saves, when not `name`

    def model_path(self, stem: str) -> Path:
        return self.directory / (stem + EXTENSIONS[self.fmt])

    def state_path(self, stem: str) -> Path:
        return self.directory / (stem + "-state")

    def due_after_step(self, step: int, max_steps: int) -> bool:
        # The final save covers the last step.
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and step < max_steps

    def due_after_epoch(self, epoch: int, epochs: int) -> bool:
        """`epoch` is 1-based; the last epoch is covered by the final save (as in sd-scripts)."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < epochs

    def prune_epochs(self, current_epoch: int) -> list[Path]:
        """Keep the last N epoch saves (models, and states with their own N)."""
        removed = []
        for keep, state in ((self.last_n_epochs, False), (self.last_n_epochs_state or self.last_n_epochs, True)):
            if keep and self.every_n_epochs:
                oldest_kept = current_epoch - (keep - 1) * self.every_n_epochs
                removed += self._remove(_EPOCH_RE, lambda n: n < oldest_kept, state, self.epoch_name)
        return removed

    def prune_steps(self, current_step: int) -> list[Path]:
        """Keep the step saves of the last N steps (sd-scripts' meaning: steps, not files)."""
        removed = []
        for keep, state in ((self.last_n_steps, False), (self.last_n_steps_state or self.last_n_steps, True)):
            if keep:
                removed += self._remove(_STEP_RE, lambda n: n < current_step - keep, state, self.step_name)
        return removed

    def _remove(self, pattern: re.Pattern, too_old, state: bool, name: str = "") -> list[Path]:
        removed, name = [], name or self.name
        if not self.directory.is_dir():
            return removed
        ext = "-state" if state else EXTENSIONS[self.fmt]
        for path in sorted(self.directory.iterdir()):
            if not path.name.startswith(name + "-") or not path.name.endswith(ext):
                continue
            core = path.name[len(name) + 1:len(path.name) - len(ext) if ext else None]
            m = pattern.fullmatch(core)
            if not m or (not state and core.endswith("-state")) or not too_old(int(m.group(1))):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        return removed


# "-ema": the EMA weights saved beside a model (--ema without --save_ema) go with it
_EPOCH_RE = re.compile(r"(\d{6})(?:-ema)?")
_STEP_RE = re.compile(r"step(\d{8})(?:-ema)?")
