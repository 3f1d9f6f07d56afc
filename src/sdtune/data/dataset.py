"""Batches as tensors: the map-style dataset whose "index" is a `BatchSpec`, and the DataLoader.

One DataLoader item is one whole batch (batch_size=None), a `Batch`: the sampler decides the batch,
a worker loads it.

A sample that fails to load (a corrupt image or cache entry) is dropped from its batch and listed
in `failed`; the trainer reports it once, counts it and stops under --strict (`sdtune.data.failures`).
The dataset itself neither warns nor raises: it may run in a worker process, whose warnings would
land inside the progress bar and whose exceptions reach the trainer wrapped in a traceback.
Spawn-safe: the dataset holds only plain data (paths, numbers, dicts), no open files, lambdas or modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtune.data.images import BadImage, prepare_sample
from sdtune.data.plan import DatasetPlan
from sdtune.data.sampler import BatchSpec, BucketBatchSampler

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """One batch of one bucket, as the loader gives it; rows are the samples that loaded."""

    bucket: tuple[int, int]  # (width, height) in pixels
    epoch: int
    position: int  # the batch's index in its epoch on this process: the resume point is position + 1
    indices: list[int] = field(default_factory=list)  # stable sample index of each row
    subsets: list[int] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)  # raw text from the metadata (not processed)
    tags: list[str | None] = field(default_factory=list)
    caption_options: list[dict[str, Any]] = field(default_factory=list)  # the subset's resolved caption keys
    custom_attributes: list[dict | None] = field(default_factory=list)
    flipped: list[bool] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of samples that did not load
    latent_mean: "torch.Tensor | None" = None  # (B, C, H/8, W/8) float16, when latents are cached
    latent_logvar: "torch.Tensor | None" = None
    images: "torch.Tensor | None" = None  # (B, 3, H, W) float32 in [-1, 1], when they are not
    # (B, 1, H/8, W/8) float32 in [0, 1] when a subset has alpha_mask: from the alpha channel; ones for
    # images without one or whose subset has no alpha_mask; the same values cached or not
    loss_mask: "torch.Tensor | None" = None


try:  # the base class only matters when torch is there; the module stays importable without it
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


class BatchDataset(_Base):
    def __init__(self, plan: DatasetPlan, cache=None):
        self.plan = plan
        # Only what a worker needs: disk paths are small; in-memory latents force num_workers=0.
        self.paths = dict(cache.paths) if cache is not None else None
        self.memory = cache.memory if cache is not None else None
        self.masks = cache.masks if cache is not None else None
        self.masked = any(s.alpha_mask for s in plan.subsets)
        # Samples known not to load: left out without decoding them again. Workers started after an
        # update (each epoch, unless persistent) get it; a persistent worker retries, harmlessly.
        self.known_bad: set[int] = set()

    def __len__(self) -> int:  # not used by the sampler-driven loader; here for completeness
        return len(self.plan.samples)

    def _latents(self, index: int, flip: bool, bucket):
        """(mean, logvar, mask or None) of one cache entry."""
        from sdtune.data.latent_cache import load_entry_with_mask

        key = (index, flip)
        if self.memory and key in self.memory:
            return (*self.memory[key], self.masks.get(key))
        if key not in self.paths:
            raise ValueError("no latent cache entry (the image failed to encode)")
        return load_entry_with_mask(self.paths[key], bucket)

    def __getitem__(self, spec: BatchSpec) -> Batch:
        import numpy as np
        import torch

        plan = self.plan
        rows, means, logvars, images, masks, failed = [], [], [], [], [], []
        cached = self.paths is not None
        for slot, i in enumerate(spec.indices):
            if i in self.known_bad:
                continue
            s = plan.samples[i]
            sub = plan.subsets[s.subset]
            try:
                if cached:
                    mean, logvar, mask = self._latents(i, spec.flips[slot], spec.bucket)
                    if sub.alpha_mask and mask is None:
                        raise ValueError("the latent cache entry has no alpha mask")
                    means.append(mean)
                    logvars.append(logvar)
                else:
                    pixels, mask = prepare_sample(s.path, s.size, s.resized, s.bucket, flip=spec.flips[slot],
                                                  crop_seed=spec.crop_seeds[slot], color_seed=spec.color_seeds[slot],
                                                  interpolation=sub.resize_interpolation, alpha_mask=sub.alpha_mask)
                    images.append(pixels)
                if self.masked:
                    masks.append(torch.as_tensor(mask) if sub.alpha_mask else
                                 torch.ones((spec.bucket[1] // 8, spec.bucket[0] // 8), dtype=torch.float32))
            except (BadImage, OSError, ValueError) as exc:
                failed.append((i, exc.reason if isinstance(exc, BadImage) else str(exc)))
                continue
            rows.append((slot, s, sub))
        batch = Batch(bucket=spec.bucket, epoch=spec.epoch, position=spec.position, failed=failed,
                      captions=[s.caption for _k, s, _u in rows], tags=[s.tags for _k, s, _u in rows],
                      caption_options=[sub.caption_options for _k, _s, sub in rows],
                      custom_attributes=[sub.custom_attributes for _k, _s, sub in rows],
                      subsets=[s.subset for _k, s, _u in rows], indices=[s.index for _k, s, _u in rows],
                      flipped=[spec.flips[k] for k, _s, _u in rows])
        if cached and rows:
            batch.latent_mean = torch.stack(means)
            batch.latent_logvar = torch.stack(logvars)
        elif rows:
            batch.images = torch.from_numpy(np.stack(images))
        if self.masked and rows:
            batch.loss_mask = torch.stack(masks).unsqueeze(1)
        return batch


def make_loader(plan: DatasetPlan, sampler: BucketBatchSampler, cache=None, *, num_workers: int | None = None,
                persistent_workers: bool | None = None, multiprocessing_context: str | None = None,
                pin_memory: bool = False):
    """A DataLoader over `sampler`'s batches. Call `sampler.set_epoch(e, start_batch)` before each epoch.

    Workers decode images; with in-memory latents there is nothing to decode, so none are used.
    A batch may come empty (every sample failed to load): `sdtune.data.failures` decides what to do.
    """
    from torch.utils.data import DataLoader

    opts = plan.loading
    workers = opts.max_data_loader_n_workers if num_workers is None else num_workers
    # sd-scripts' default is 8 workers; more processes than cores only adds start-up time and memory.
    workers = min(workers, os.cpu_count() or 1)
    if cache is not None and cache.memory:
        workers = 0
    persistent = (opts.persistent_data_loader_workers if persistent_workers is None else persistent_workers) and workers > 0
    return DataLoader(BatchDataset(plan, cache), sampler=sampler, batch_size=None, num_workers=workers,
                      persistent_workers=persistent, pin_memory=pin_memory,
                      multiprocessing_context=multiprocessing_context if workers > 0 else None,
                      collate_fn=_identity)


def _identity(batch):
    # A module-level function, not a lambda: workers started with spawn must be able to pickle it.
    return batch
