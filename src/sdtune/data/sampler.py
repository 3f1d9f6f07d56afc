"""Which samples go into which batch, for every epoch and rank, reproducibly.

For epoch e, with a private `random.Random` seeded from (seed, e) — the same on every rank, never
the global RNG:

1. each (dataset, bucket) group lists its samples `num_repeats` times and is shuffled;
2. it is cut into batches of the dataset's batch size (the last one may be smaller: no image is
   dropped, as in sd-scripts);
3. the batches of all buckets are shuffled together;
4. rank r takes batches r, r+W, r+2W, ... of the first floor(n/W)*W, so every rank gets distinct
   samples and the same number of batches.

A batch's flips and crop/colour seeds come from (seed, epoch, batch number, slot), so they do not
depend on worker count or timing. The position (epoch, batch) is all a resume needs.
No torch: the sampler is a plain iterable that `torch.utils.data.DataLoader(sampler=...)` accepts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sdtune.data.buckets import Size
from sdtune.data.plan import DatasetPlan
from sdtune.seeds import augmentation_seed, epoch_order_rng


@dataclass(frozen=True)
class BatchSpec:
    """One batch: picklable, small, and enough for a worker to produce the tensors."""

    epoch: int
    position: int  # index of this batch in the rank's epoch: the resume position
    number: int  # index among all ranks' batches of the epoch
    dataset: int
    bucket: Size
    indices: tuple[int, ...]
    flips: tuple[bool, ...]
    crop_seeds: tuple[int | None, ...]
    color_seeds: tuple[int | None, ...]


class BucketBatchSampler:
    """Yields the `BatchSpec`s of one rank for the current epoch, from the current position."""

    def __init__(self, plan: DatasetPlan, *, seed: int | None = None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.plan = plan
        self.seed = plan.seed if seed is None else seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch to iterate, from batch `start_batch` (to resume mid-epoch)."""
        self.epoch = epoch
        self.start = start_batch

    def epoch_batches(self, epoch: int) -> list[BatchSpec]:
        """All batches of this rank for `epoch`."""
        plan = self.plan
        rng = epoch_order_rng(self.seed, epoch)
        raw: list[tuple[int, Size, list[int]]] = []
        for (d, bucket), indices in plan.groups().items():
            pool = [i for i in indices for _ in range(plan.repeats(plan.samples[i]))]
            rng.shuffle(pool)
            size = plan.datasets[d].batch_size
            raw.extend((d, bucket, pool[k:k + size]) for k in range(0, len(pool), size))
        rng.shuffle(raw)
        usable = len(raw) // self.world_size * self.world_size
        out = []
        for position, number in enumerate(range(self.rank, usable, self.world_size)):
            d, bucket, indices = raw[number]
            flips, crops, colors = [], [], []
            for slot, i in enumerate(indices):
                subset = plan.subsets[plan.samples[i].subset]
                r = random.Random(augmentation_seed(self.seed, epoch, number, slot))
                flips.append(subset.flip_aug and r.random() < 0.5)
                crops.append(r.getrandbits(63) if subset.random_crop else None)
                colors.append(r.getrandbits(63) if subset.color_aug else None)
            out.append(BatchSpec(epoch, position, number, d, bucket, tuple(indices), tuple(flips), tuple(crops),
                                 tuple(colors)))
        return out

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch)[self.start:])

    def __len__(self) -> int:
        return max(0, self.plan.batches_per_epoch(self.world_size) - self.start)
