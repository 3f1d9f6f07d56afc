"""Aspect-ratio buckets: the bucket list, which bucket an image goes to, and its resize and crop.

Pure arithmetic (no PIL, no torch) so it is cheap to test and to run for `--dry_run`.

* `make_buckets` is the NovelAI / sd-scripts construction: for every width in steps of
  `bucket_reso_steps` between min and max, the tallest height that keeps the area within
  resolution², plus the transposes and the largest square.
* `select_bucket` picks the bucket with the smallest |log(aspect) difference|. sd-scripts and NovelAI
  compare raw w/h ratios, which over-penalises wide buckets (a 2:1 image is "further" from 2.2:1
  than a 1:2 image from 1:2.2); the log makes wide and tall images symmetric.
* With `bucket_no_upscale` every image keeps its size (or shrinks to the area budget) and its bucket
  is its size rounded down to the step, as in sd-scripts.
* `cover_size` gives the resize that covers a bucket and `crop_box` the crop. Sizes are rounded as
  sd-scripts rounds them, `int(x + 0.5)` (halves up), so the same image is cropped the same way.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from sdtune.console import plural

Size = tuple[int, int]  # (width, height), as sd-scripts and PIL order them


def make_buckets(resolution: Size, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[Size]:
    """All buckets of area at most resolution[0] * resolution[1], sides in [min_size, max_size]."""
    area = resolution[0] * resolution[1]
    square = int(math.sqrt(area) // step) * step
    buckets = {(square, square)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def adjust_limits(min_size: int, max_size: int, step: int) -> tuple[int, int]:
    """sd-scripts rounds the minimum down and the maximum up to multiples of the step."""
    return min_size // step * step, -(-max_size // step) * step


def select_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket of `size`: an exact match, else the smallest |log aspect difference|.

    Ties (equal aspect error) go to the larger bucket, which crops less of a large image.
    """
    if size in buckets:
        return size
    log_ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


def no_upscale_bucket(size: Size, max_area: int, step: int) -> tuple[Size, Size]:
    """(bucket, resized size) under bucket_no_upscale, following sd-scripts' rounding.

    An image larger than the area budget shrinks to it keeping its aspect; the side that rounds to
    a step with the smaller aspect error is the one kept exact. The bucket is the (resized) size
    rounded down to the step, so at most step-1 pixels are cropped per side.
    """
    w, h = size
    if w * h > max_area:
        aspect = w / h
        ideal_w = math.sqrt(max_area * aspect)
        ideal_h = max_area / ideal_w

        def to_step(x: float) -> int:
            return round_half_up(x) // step * step

        bw_w = to_step(ideal_w)
        bh_w = to_step(bw_w / aspect)
        bh_h = to_step(ideal_h)
        bw_h = to_step(bh_h * aspect)
        err_w = abs(bw_w / bh_w - aspect) if bh_w else math.inf
        err_h = abs(bw_h / bh_h - aspect) if bh_h else math.inf
        if err_w < err_h:
            resized = (bw_w, round_half_up(bw_w / aspect))
        else:
            resized = (round_half_up(bh_h * aspect), bh_h)
    else:
        resized = (w, h)
    bucket = (resized[0] // step * step, resized[1] // step * step)
    return bucket, resized


def round_half_up(x: float) -> int:
    """sd-scripts' rounding of sizes, `int(x + 0.5)`: halves go up (Python's round() goes to even)."""
    return int(x + 0.5)


def cover_size(size: Size, bucket: Size) -> Size:
    """The size of the image's aspect that covers the bucket, one side exact, as sd-scripts computes it.

    The scale is a float and the other side `int(side * scale + 0.5)`, the same expression as
    sd-scripts, so a side landing on .5 (1366x768 to cover 1024x576: 1024.5) rounds up to 1025
    there and here, and the crop takes the same pixels.
    """
    w, h = size
    bw, bh = bucket
    if w * bh > h * bw:  # relatively wider than the bucket: heights match, width overflows
        return max(bw, round_half_up(w * (bh / h))), bh
    return bw, max(bh, round_half_up(h * (bw / w)))


@dataclass(frozen=True)
class Geometry:
    """How one image becomes one bucket-sized training image.

    The image is resized to `resized` (covers the bucket) and the `crop` box (left, top, right,
    bottom, in resized pixels) of exactly the bucket's size is kept.
    """

    bucket: Size
    resized: Size
    crop: tuple[int, int, int, int]


def crop_box(resized: Size, bucket: Size, offset: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """The bucket-sized box in the resized image: centred, or at `offset` (random crop)."""
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized {resized} does not cover bucket {bucket}")
    left, top = offset if offset is not None else (excess_w // 2, excess_h // 2)
    return left, top, left + bucket[0], top + bucket[1]


def random_offset(resized: Size, bucket: Size, rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, resized[0] - bucket[0]), rng.randint(0, resized[1] - bucket[1])


def source_box(size: Size, resized: Size, crop: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """Map a crop box in resized pixels back to the original image (for PIL's resize(box=...))."""
    sx, sy = resized[0] / size[0], resized[1] / size[1]
    left, top, right, bottom = crop
    return left / sx, top / sy, right / sx, bottom / sy


class BucketRule:
    """One dataset's bucketing settings, applied to image sizes."""

    def __init__(self, resolution: Size, *, enable_bucket: bool, min_size: int = 256, max_size: int = 1024,
                 step: int = 64, no_upscale: bool = False):
        self.resolution = resolution
        self.enable_bucket = enable_bucket
        self.step = step
        self.no_upscale = enable_bucket and no_upscale
        self.min_size, self.max_size = adjust_limits(min_size, max_size, step)
        self.max_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.buckets = [resolution]
        elif self.no_upscale:
            self.buckets = []  # one bucket per distinct image size, made on demand
        else:
            self.buckets = make_buckets(resolution, self.min_size, self.max_size, step)
        # the buckets by log aspect ratio, for a binary search instead of a scan per image
        order = sorted(self.buckets, key=lambda b: math.log(b[0] / b[1]))
        self._sorted, self._logs = order, [math.log(b[0] / b[1]) for b in order]
        self._exact = set(self.buckets)

    def _select(self, size: Size) -> Size:
        """`select_bucket(size, self.buckets)` in O(log n): the nearest log aspects are next to
        where the image's would sort; the same key then decides among them (ties included)."""
        if size in self._exact:
            return size
        logs = self._logs
        log_ar = math.log(size[0] / size[1])
        i = bisect.bisect_left(logs, log_ar)
        below = abs(logs[i - 1] - log_ar) if i > 0 else math.inf
        above = abs(logs[i] - log_ar) if i < len(logs) else math.inf
        best = min(below, above)
        lo, hi = i, i
        while lo > 0 and abs(logs[lo - 1] - log_ar) <= best:
            lo -= 1
        while hi < len(logs) and abs(logs[hi] - log_ar) <= best:
            hi += 1
        if hi - lo == 1:  # the usual case: one nearest bucket
            return self._sorted[lo]
        return min(self._sorted[lo:hi], key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))

    def assign(self, size: Size) -> tuple[Size, Size] | None:
        """(bucket, resized) for an image of `size`, or None when it is too small for any bucket."""
        if self.no_upscale:
            bucket, resized = no_upscale_bucket(size, self.max_area, self.step)
            if bucket[0] < self.step or bucket[1] < self.step:
                return None
            return bucket, resized
        bucket = self._select(size)
        return bucket, cover_size(size, bucket)

    def describe(self) -> str:
        w, h = self.resolution
        if not self.enable_bucket:
            return f"no bucketing: every image resized and centre-cropped to {w}x{h}"
        if self.no_upscale:
            return f"buckets from image sizes (no upscaling), area <= {w}x{h}, step {self.step}"
        return (f"{plural(len(self.buckets), 'bucket')}, area <= {w}x{h}, sides {self.min_size}..{self.max_size} "
                f"in steps of {self.step}")
