"""The one place that touches trained weights across processes.

Data-parallel training (today) keeps a whole replica on every process behind a DDP wrapper; sharded
training (DeepSpeed ZeRO-3, FSDP) keeps a slice on each. Everything that reads the weights for
something other than the training step itself comes through here: unwrapping, a full view for
saving and checksums, and "the main process does this while the others wait" for saving, validation
and sampling. Sharded engines change this class, not the trainer, the targets or the savers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from sdtune.errors import UserError


class Weights:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.world = accelerator.num_processes

    def prepare(self, *objects):
        """Hand modules, optimizer and schedule to the engine (wrapping or sharding them)."""
        return self.accelerator.prepare(*objects)

    def unwrap(self, module):
        """The module inside its engine wrapper (DDP, compile), for a forward pass on one process."""
        return self.accelerator.unwrap_model(module)

    @contextlib.contextmanager
    def full(self, module) -> Iterator[Any]:
        """The unwrapped module with every weight present, for reading (saving, sampling, checksums).

        With replicas every process already holds them all; a sharded engine gathers them here for
        the duration of the block.
        """
        yield self.unwrap(module)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` on the main process while the others wait; a failure stops every process.

        A failure on the main process alone (a full disk while saving) would otherwise leave the
        others waiting at the next collective until its timeout instead of stopping with it. Returns
        `work()`'s value on the main process, None elsewhere.
        """
        self.accelerator.wait_for_everyone()
        failure, result = None, None
        try:
            if self.is_main:
                result = work()
        except Exception as exc:  # raised on every process below, so that none waits for the main one
            failure = exc
        raise_together(failure, self.accelerator)
        return result

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any of them (a collective: all must call it)."""
        return any_process(flag, self.accelerator)

    def checksums(self, modules: Sequence) -> list[float]:
        """Every process's sum of the modules' weights (in float64), gathered: replicas must agree."""
        import torch

        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for module in modules:
                with self.full(module) as m:
                    total = total + sum(p.detach().double().sum().cpu() for p in m.parameters())
        return self.accelerator.gather(total.reshape(1).to(self.device)).tolist()


def raise_together(error: BaseException | None, accelerator) -> None:
    """Raise on every process when any process failed; a barrier otherwise."""
    if any_process(error is not None, accelerator) and error is None:
        error = UserError("another process failed (its message is above); this one stops with it")
    if error is not None:
        raise error


def any_process(flag: bool, accelerator) -> bool:
    """True on every process when `flag` is true on any of them (a collective: all must call it)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="max").item())
