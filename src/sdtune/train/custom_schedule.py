"""`--lr_scheduler_type`: any torch learning-rate scheduler class, by name or class path.

A bare name is a `torch.optim.lr_scheduler` class (`StepLR`, `OneCycleLR`, ...); a dotted one is
imported (`mypkg.schedules.MySchedule`). The class gets the optimizer and `--lr_scheduler_args`.

accelerate advances a prepared scheduler once per process for every optimizer step, which would
make `StepLR step_size=100` decay after 50 optimizer steps on two GPUs. The class is therefore
wrapped so that it advances exactly once per optimizer step: its step counts mean optimizer steps
on any number of processes (sd-scripts passes the class to accelerate as it is).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from sdtune.errors import UserError

WHERE = "--lr_scheduler_type"


def import_scheduler_class(path: str) -> type:
    module_name, _, cls_name = path.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name!r} ({exc})", where=WHERE,
                        fix="Give a torch.optim.lr_scheduler class name (StepLR) or an importable class path.") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        from sdtune.config import suggest

        names = [n for n in dir(torch.optim.lr_scheduler) if n[0].isupper()] if module_name.startswith("torch.") else []
        raise UserError(f"{module_name} has no {cls_name!r}{suggest(cls_name, names)}", where=WHERE)
    if isinstance(cls, type) and issubclass(cls, ReduceLROnPlateau):
        raise UserError(f"{cls_name} steps on a validation metric, which the training loop does not pass to it",
                        where=WHERE, fix="Use a step-based scheduler (StepLR, CosineAnnealingLR, OneCycleLR, ...).")
    if not (isinstance(cls, type) and issubclass(cls, LRScheduler)):
        raise UserError(f"{path} is not a torch learning-rate scheduler class", where=WHERE)
    return cls


def build_custom_scheduler(path: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], num_processes: int):
    from sdtune.train.optim import accepted_arguments

    cls = import_scheduler_class(path)
    try:
        scheduler = cls(optimizer, **kwargs)
    except TypeError as exc:
        raise UserError(f"{cls.__name__} rejected the arguments ({exc}).{accepted_arguments(cls, ('optimizer', 'last_epoch'))}",
                        where="--lr_scheduler_args") from None
    except (ValueError, KeyError) as exc:
        raise UserError(f"{cls.__name__} rejected the arguments ({exc})", where="--lr_scheduler_args") from None
    return PerOptimizerStep(scheduler, num_processes)


class PerOptimizerStep(LRScheduler):
    """Advances the wrapped scheduler once every `calls_per_step` calls of step().

    An LRScheduler to accelerate (which wraps and checkpoints only those), but LRScheduler.__init__
    is not called: it would set the optimizer's learning rates itself. Its state records optimizer
    steps, so a state saved on N processes resumes on any other number.
    """

    def __init__(self, scheduler: LRScheduler, calls_per_step: int):  # noqa: D107 - see the class
        self.scheduler, self.calls_per_step, self.calls = scheduler, calls_per_step, 0
        self.optimizer = scheduler.optimizer
        self._step_count = 0  # accelerate counts skipped accumulation steps here

    def step(self, *args, **kwargs) -> None:
        self.calls += 1
        if self.calls % self.calls_per_step == 0:
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def get_lr(self) -> list[float]:
        return self.scheduler.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "optimizer_steps": self.calls // self.calls_per_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.calls = state_dict["optimizer_steps"] * self.calls_per_step
