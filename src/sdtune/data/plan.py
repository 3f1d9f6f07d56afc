"""The dataset plan: every image of every subset with its size, bucket and resize, before any pixel
is decoded. Built once at the start of a run (`build_plan`), printed by --dry_run, consumed by the
latent cache, the sampler and the loader. No torch.
"""

from __future__ import annotations

import gc
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from sdtune.console import plural
from sdtune.data.buckets import BucketRule, Size
from sdtune.data.images import BadImage
from sdtune.data.metadata import load_records
from sdtune.data.options import DatasetOptions, LoadingOptions
from sdtune.data.prepared import RECORDED, all_recorded, recorded_geometry
from sdtune.data.sizes import read_sizes
from sdtune.data.toml_config import DatasetSpec, SubsetSpec, dataset_specs
from sdtune.errors import UserError


@dataclass(frozen=True, slots=True)  # slots: a million samples in a fraction of the memory
class Sample:
    """One image of one subset. `index` is stable for the run (its position in `plan.samples`)."""

    index: int
    subset: int
    dataset: int
    path: str
    caption: str | None
    tags: str | None
    size: Size  # as displayed, after EXIF rotation
    bucket: Size
    resized: Size  # cover size before the crop


@dataclass
class DatasetPlan:
    datasets: list[DatasetSpec]
    subsets: list[SubsetSpec]
    samples: list[Sample]
    seed: int
    loading: LoadingOptions
    # Images left out, with the reason: unreadable, too small, failed to encode.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: set[int] = field(default_factory=set)

    # -- structure --------------------------------------------------------------------------------

    @property
    def active(self) -> list[Sample]:
        return [s for s in self.samples if s.index not in self.excluded]

    def groups(self) -> dict[tuple[int, Size], list[int]]:
        """(dataset, bucket) -> sample indices (without repeats), in a stable order."""
        out: dict[tuple[int, Size], list[int]] = defaultdict(list)
        for s in self.active:
            out[(s.dataset, s.bucket)].append(s.index)
        return dict(sorted(out.items()))

    def repeats(self, sample: Sample) -> int:
        return self.subsets[sample.subset].num_repeats

    def total_samples(self) -> int:
        """Samples per epoch, repeats included."""
        return sum(self.repeats(s) for s in self.active)

    def total_batches(self) -> int:
        n = 0
        for (d, _bucket), indices in self.groups().items():
            count = sum(self.repeats(self.samples[i]) for i in indices)
            n += math.ceil(count / self.datasets[d].batch_size)
        return n

    def batches_per_epoch(self, num_processes: int = 1) -> int:
        """Batches each process gets per epoch (the remainder that cannot go to every rank is dropped)."""
        return self.total_batches() // num_processes

    def steps_per_epoch(self, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> int:
        return math.ceil(self.batches_per_epoch(num_processes) / gradient_accumulation_steps)

    def check_fill(self, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> None:
        """A UserError when one optimizer step cannot be filled from an epoch of data."""
        batch = max(d.batch_size for d in self.datasets)
        need = batch * num_processes * gradient_accumulation_steps
        have = self.total_samples()
        if have < need or self.batches_per_epoch(num_processes) == 0:
            raise UserError(
                f"the dataset has {plural(have, 'sample')} per epoch (repeats included) in "
                f"{plural(len(self.groups()), 'bucket')}, but one optimizer step needs batch size {batch} x "
                f"{plural(num_processes, 'process')} x {plural(gradient_accumulation_steps, 'accumulation step')} "
                f"= {need}",
                where=self.loading.source,
                fix="Add images, raise num_repeats / --dataset_repeats, or lower the batch size, process count or "
                    "--gradient_accumulation_steps.")

    def without(self, failures: dict[int, str]) -> "DatasetPlan":
        """The plan without samples that failed later (e.g. could not be decoded for caching)."""
        skipped = self.skipped + [(self.samples[i].path, reason) for i, reason in failures.items()]
        return replace(self, skipped=skipped, excluded=self.excluded | set(failures))

    def caption_options(self, sample: Sample) -> dict[str, Any]:
        return self.subsets[sample.subset].caption_options

    # -- reporting --------------------------------------------------------------------------------

    def summary(self, num_processes: int = 1, gradient_accumulation_steps: int = 1) -> str:
        lines = []
        active = self.active
        per_subset = Counter(x.subset for x in active)
        held_out = Counter(x.subset for x in self.samples if x.index in self.excluded)
        groups = self.groups()
        total = sum(self.repeats(s) for s in active)
        for d in self.datasets:
            rule = RECORDED if d.recorded_buckets else _rule(d).describe()
            lines.append(f"dataset {d.index} ({d.where}): batch size {d.batch_size}; {rule}")
            for s in d.subsets:
                n = per_subset[s.index]
                if getattr(s, "is_validation", False):
                    held = held_out[s.index]
                    lines.append(f"  subset {s.index}: validation only, {plural(held, 'image')} held out from "
                                 f"{s.metadata_file}")
                    continue
                extras = [k for k in ("flip_aug", "color_aug", "random_crop") if getattr(s, k)]
                lines.append(f"  subset {s.index}: {plural(n, 'image')} x {plural(s.num_repeats, 'repeat')} from "
                             f"{s.metadata_file}"
                             + (f" ({', '.join(extras)})" if extras else ""))
            lines.append("  bucket       images  samples  batches")
            for (di, bucket), indices in groups.items():
                if di != d.index:
                    continue
                count = sum(self.repeats(self.samples[i]) for i in indices)
                bar = "#" * max(1, round(30 * count / max(1, total)))
                lines.append(f"  {bucket[0]:>4}x{bucket[1]:<5} {len(indices):>7}  {count:>7}  "
                             f"{math.ceil(count / d.batch_size):>7}  {bar}")
        lines.append(f"{plural(len(active), 'image')}, {plural(total, 'sample')} per epoch, "
                     f"{plural(self.total_batches(), 'batch')}; with {plural(num_processes, 'process')} and "
                     f"{plural(gradient_accumulation_steps, 'accumulation step')}: "
                     f"{plural(self.batches_per_epoch(num_processes), 'batch')} and "
                     f"{plural(self.steps_per_epoch(num_processes, gradient_accumulation_steps), 'optimizer step')} "
                     "per epoch")
        crops = [s for s in active if _crop_fraction(s) > 0.25]
        if crops:
            lines.append(f"{plural(len(crops), 'image')} {'loses' if len(crops) == 1 else 'lose'} more than 25% of "
                         f"the area to cropping (extreme aspect ratios), e.g. {crops[0].path} "
                         f"{crops[0].size[0]}x{crops[0].size[1]} -> {crops[0].bucket[0]}x{crops[0].bucket[1]}")
        if self.skipped:
            lines.append(skipped_summary(self.skipped))
        return "\n".join(lines)


def skipped_summary(skipped: list[tuple[str, str]]) -> str:
    """'3 images skipped: 2 unreadable, 1 cannot be decoded': the count of (path, reason) pairs by reason."""
    reasons = Counter(r.split(" (")[0] for _p, r in skipped)
    return f"{plural(len(skipped), 'image')} skipped: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())


def _crop_fraction(s: Sample) -> float:
    return 1.0 - (s.bucket[0] * s.bucket[1]) / (s.resized[0] * s.resized[1])


def _rule(d: DatasetSpec) -> BucketRule:
    return BucketRule(d.resolution, enable_bucket=d.enable_bucket, min_size=d.min_bucket_reso,
                      max_size=d.max_bucket_reso, step=d.bucket_reso_steps, no_upscale=d.bucket_no_upscale)


def build_plan(options: DatasetOptions, *, seed: int, default_resolution: int | Size | None = None,
               warn=None, recorded_buckets: bool = True) -> DatasetPlan:
    """Read the dataset config (or --in_json), every metadata file and every image header.

    Unreadable or too-small images are skipped and listed in `plan.skipped` (an error under
    --strict). `warn(str)` receives one line per skipped image (default: a console warning). A dataset whose
    every image has a `train_resolution` trains each image in that bucket (unless
    `recorded_buckets=False`, for the step that records them).
    """
    # Python's cycle collector scans every live object again and again while millions of records and
    # samples are made (a third of planning a million images); none of them forms a cycle, so it waits
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(options, seed=seed, default_resolution=default_resolution, warn=warn,
                     recorded_buckets=recorded_buckets)
    finally:
        if collecting:
            gc.enable()


def _plan(options: DatasetOptions, *, seed: int, default_resolution: int | Size | None, warn,
          recorded_buckets: bool) -> DatasetPlan:
    from sdtune.console import note  # the level and log file of --console_log_* apply

    warn = warn or (lambda msg: note(f"warning: {msg}"))
    if options.caches_latents and (options.color_aug or options.random_crop):
        _refuse_cached_aug("the command line", options.color_aug)
    specs = dataset_specs(options, default_resolution=default_resolution)
    subsets = [s for d in specs for s in d.subsets]
    for s in subsets:
        if options.caches_latents and (s.color_aug or s.random_crop):
            _refuse_cached_aug(s.where, s.color_aug)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for position, d in enumerate(specs):
        loaded = [(s, load_records(s.metadata_file, s.image_dir)) for s in d.subsets]
        if recorded_buckets and all_recorded([r for _s, records in loaded for r in records]):
            d = specs[position] = replace(d, enable_bucket=True, recorded_buckets=True)
        rule = _rule(d)
        while loaded:  # each subset's records are dropped once planned: less memory at the peak
            s, records = loaded.pop(0)
            need = [r.path for r in records if r.image_size is None]
            read = dict(zip(need, read_sizes(need, min(8, max(1, options.max_data_loader_n_workers)),
                                             disk=bool(options.cache_latents_to_disk or options.cache_dir),
                                             cache_dir=options.cache_dir)))
            for r in records:
                size = r.image_size or read[r.path]
                if isinstance(size, BadImage):
                    skip_image(skipped, str(r.path), size.reason, options.strict, warn)
                    continue
                assigned = recorded_geometry(r, size) if d.recorded_buckets else rule.assign(size)
                if assigned is None:
                    skip_image(skipped, str(r.path), f"too small ({size[0]}x{size[1]}) for a bucket of step "
                               f"{d.bucket_reso_steps}", options.strict, warn)
                    continue
                bucket, resized = assigned
                samples.append(Sample(len(samples), s.index, d.index, r.file, r.caption, r.tags, size, bucket,
                                      resized))
    if not samples:
        raise UserError("no usable images in the dataset", where=str(options.dataset_config or options.in_json),
                        fix="See the warnings above.")
    return DatasetPlan(specs, subsets, samples, seed, options.loading(), skipped)


def skip_image(skipped: list, path: str, reason: str, strict: bool, warn) -> None:
    """Leave an image out: a UserError under --strict, else one warning line and an entry in `skipped`."""
    if strict:
        raise UserError(f"bad image: {reason}", where=path, fix="Fix or remove it, or drop --strict to skip it.")
    skipped.append((path, reason))
    warn(f"{path}: {reason}; skipped")


def _refuse_cached_aug(where: str, color: bool) -> None:
    what = "color_aug" if color else "random_crop"
    raise UserError(f"{what} changes the pixels at every step, so its latents cannot be cached", where=where,
                    fix=f"Drop {what}, or drop --cache_latents / --cache_latents_to_disk (the VAE then encodes "
                        "in each step).")
