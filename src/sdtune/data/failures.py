"""Samples that fail to load while training: reported once, counted, and agreed on by every process.

Planning reads image headers only, and not even those of an image whose size the metadata gives (so
a large dataset starts without opening every file, as in sd-scripts): a damaged file is found when a
batch first loads it. It then gets the line an image skipped in planning gets, once; it is left out of
every later batch without being decoded again, counted with the other skipped images in the run's
summary, and under --strict it stops the run.

With several processes each loads its own batches. A process whose whole batch failed must not skip
a step that the others take: its next batch's gradient all-reduce would pair with their current one,
and the collectives would go out of step until one waits forever. So at each batch every process
learns whether any process's batch came empty, and then all skip that batch together. Skipping
rather than substituting another image: a bucket whose every image is damaged has no substitute, a
substitute would be trained twice in the epoch, and skipping keeps every process's batch positions
(the resume point) and step count equal at the cost of one batch on each process, only when every
image of a batch is damaged. The failures found are shared as well, so that the warning is printed
once (by the main process) and the count is the same on every process.
"""

from __future__ import annotations

from sdtune.data.plan import DatasetPlan, skip_image
from sdtune.errors import UserError


class LoadFailures:
    """What failed to load so far in this run; `admit(batch)` before training on each batch.

    `dataset` (a `BatchDataset`) learns each failure, so that its later batches leave the sample
    out without decoding it; `warn(line)` prints the warning (the main process's only);
    `before_stop()` runs before the error under --strict (closing the progress bar, so that the
    error gets a line of its own).
    """

    def __init__(self, plan: DatasetPlan, dataset=None, *, strict: bool = False, warn=None, before_stop=None):
        self.plan = plan
        self.dataset = dataset
        self.strict = strict
        self.warn = warn or (lambda _line: None)
        self.before_stop = before_stop or (lambda: None)
        self.skipped: list[tuple[str, str]] = []  # (path, reason), like DatasetPlan.skipped
        self._found: set[int] = set()

    def admit(self, batch: dict, accelerator=None) -> bool:
        """Whether to train on `batch`: not when it came empty, or when, with several processes, any
        process's batch at this position did. With several processes this is a collective: every
        process calls it for each of its batches, in order."""
        mine = [(i, r) for i, r in batch.failed if i not in self._found]
        empty = not batch.indices
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flags = torch.tensor([float(empty), float(bool(mine))], device=accelerator.device)
            any_empty, any_new = (bool(v) for v in accelerator.reduce(flags, reduction="max").tolist())
            found = mine
            if any_new:  # rare: only then is the list itself exchanged
                from accelerate.utils import gather_object

                found = [tuple(f) for f in gather_object(mine)]
            self._record(found, mine)
            return not any_empty
        self._record(mine, mine)
        return not empty

    def _record(self, found: list[tuple[int, str]], mine: list[tuple[int, str]]) -> None:
        if self.strict and found:
            self.before_stop()
            if not mine:
                raise UserError("another process failed (its message is above); this one stops with it")
        for index, reason in sorted(found, key=lambda f: f not in mine):  # under --strict, name our own
            if index in self._found:
                continue  # two processes met the same image (repeats) in one step
            self._found.add(index)
            if self.dataset is not None:
                self.dataset.known_bad.add(index)
            skip_image(self.skipped, self.plan.samples[index].path, reason, self.strict, self.warn)
