"""Validation loss: a held-out split of the dataset, and a loss that is comparable across a run and across runs.

The split follows sd-scripts' `split_train_val` so its dataset TOMLs (`validation_split`,
`validation_seed` at dataset level, or `--validation_split` / `--validation_seed`) hold out the same
images: per subset, the images in metadata order are shuffled by `random.Random(validation_seed)`
(a private generator; sd-scripts reseeds the global one), the first ceil(n * (1 - split)) train and
the rest validate. sd-scripts takes round(n * split) from the end for validation, which overlaps the
training part when both round up (3 images at 0.5: 2 train, 2 validate); here the parts are disjoint.
The held-out images leave the training plan through `DatasetPlan.excluded`, so the sampler, the
latent cache, the text cache and the step counts never see them.

The loss removes every source of randomness so that a change in the number means a change in the
weights: the VAE posterior mean (no sample), the caption without shuffling, dropout or warm-up, fixed
timesteps evenly spaced inside the training range (sd-scripts' choice: 200, 400, 600, 800 for the full
range), and noise drawn from a CPU generator seeded by (validation_seed, image index), so it does not
depend on the device, the batch composition or how often validation ran before. The loss itself is
the training objective's (prediction type, loss type, min-SNR and other weights), without the noise
augmentations (offset, multires, input perturbation), which are random by design.

Latents are encoded once, before the first step, and kept in memory (64 KiB per 512x512 image); with a
frozen text encoder the conditioning is encoded once too.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from sdtune.console import plural
from sdtune.errors import UserError

if TYPE_CHECKING:
    import torch

    from sdtune.data.plan import DatasetPlan, Sample

# sd-scripts' NUM_VALIDATION_TIMESTEPS
NUM_TIMESTEPS = 4


def split_plan(plan: "DatasetPlan", split: float, seed: int) -> tuple["DatasetPlan", list["Sample"]]:
    """(training plan, held-out samples). A dataset's own `validation_split` / `validation_seed`
    win over `split` / `seed` (the command line), as every dataset key does; a subset with
    `is_validation = true` is held out whole, and the split applies to the other subsets."""
    held: list = []
    asked = []
    for d in plan.datasets:
        validation_subsets = {sub.index for sub in d.subsets if getattr(sub, "is_validation", False)}
        held += [s for s in plan.active if s.subset in validation_subsets]
        fraction = getattr(d, "validation_split", None)
        fraction = split if fraction is None else fraction
        if not fraction:
            continue
        asked.append(f"{d.where}: validation_split {fraction}")
        d_seed = getattr(d, "validation_seed", None)
        d_seed = seed if d_seed is None else d_seed
        for sub in d.subsets:
            if sub.index in validation_subsets:
                continue
            samples = [s for s in plan.active if s.subset == sub.index]
            # random.Random(seed).shuffle draws exactly what random.seed(seed); random.shuffle does
            random.Random(d_seed).shuffle(samples)
            train = math.ceil(len(samples) * (1 - fraction))
            held += samples[train:]
    if not held:
        if asked:
            raise UserError(f"the validation split holds out no image ({asked[0]} of each subset, rounded down)",
                            where="--validation_split", fix="Raise validation_split, or add images.")
        return plan, []
    held.sort(key=lambda s: s.index)
    return replace(plan, excluded=plan.excluded | {s.index for s in held}), held


def validation_timesteps(low: int, high: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """`count` timesteps evenly inside [low, high), the ends left out (sd-scripts' linspace(...)[1:-1])."""
    if high <= low + 1:
        return [low]
    step = (high - low) / (count + 1)
    return sorted({int(low + step * k) for k in range(1, count + 1)})


def fixed_caption(raw_caption: str | None, raw_tags: str | None, options, seed: int, index: int) -> str:
    """The caption of a held-out image without augmentation (prefix, suffix and the separator kept)."""
    from sdtune.text import build_caption, process_caption

    fixed = options.model_copy(update={"shuffle_caption": False, "caption_dropout_rate": 0.0,
                                       "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
                                       "token_warmup_step": 0})
    # with wildcards a multi-line caption still picks one line: the one (seed, index) picks, at every validation
    return process_caption(build_caption(raw_caption, raw_tags, options), fixed, seed=seed, epoch=1, index=index)


class Validator:
    """The held-out batches with their fixed inputs; `loss(unet, encode)` is the validation loss."""

    def __init__(self, plan: "DatasetPlan", held_out: list["Sample"], objective, *, seed: int,
                 max_batches: int | None = None):
        from sdtune.text import CaptionOptions

        self.plan = plan
        self.objective = objective
        self.seed = seed
        low, high = objective.noise_cfg.timestep_range(objective.num_train_timesteps)
        self.timesteps = validation_timesteps(low, high)
        groups: dict[tuple, list] = defaultdict(list)
        for s in held_out:
            groups[(s.dataset, s.bucket)].append(s)
        self.batches: list[list] = []
        for (d, _bucket), samples in sorted(groups.items()):
            size = plan.datasets[d].batch_size
            self.batches += [samples[k:k + size] for k in range(0, len(samples), size)]
        if max_batches is not None:
            self.batches = self.batches[:max_batches]
        options = [CaptionOptions.from_dict(s.caption_options, where=f"subset {i + 1}") for i, s in enumerate(plan.subsets)]
        self.captions = [[fixed_caption(s.caption, s.tags, options[s.subset], seed, s.index) for s in b]
                         for b in self.batches]
        self.latents: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []  # per batch: the loss masks when a subset has alpha_mask
        self.cond: list[torch.Tensor] | None = None

    @property
    def images(self) -> int:
        return sum(len(b) for b in self.batches)

    def describe(self) -> str:
        return (f"validation: {plural(self.images, 'held-out image')} in {plural(len(self.batches), 'batch')}, "
                f"timesteps {', '.join(map(str, self.timesteps))}, seed {self.seed}")

    def encode_images(self, vae, device, scaling: float, *, strict: bool = False, progress: bool = True) -> None:
        """The scaled posterior means of the held-out images, once (kept on the CPU)."""
        import numpy as np
        import torch
        from tqdm import tqdm

        from sdtune.data.images import BadImage, prepare_sample

        masked = any(s.alpha_mask for s in self.plan.subsets)
        kept_batches, kept_captions = [], []
        for batch, captions in tqdm(list(zip(self.batches, self.captions)), desc="encoding validation images",
                                    unit="batch", leave=False, disable=not progress or len(self.batches) < 4):
            pixels, rows, masks = [], [], []
            for s, caption in zip(batch, captions):
                sub = self.plan.subsets[s.subset]
                try:
                    x, mask = prepare_sample(s.path, s.size, s.resized, s.bucket, interpolation=sub.resize_interpolation,
                                             alpha_mask=sub.alpha_mask)
                    pixels.append(x)
                    masks.append(torch.from_numpy(mask) if mask is not None else
                                 torch.ones((s.bucket[1] // 8, s.bucket[0] // 8), dtype=torch.float32))
                    rows.append((s, caption))
                except (BadImage, OSError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, BadImage) else str(exc)
                    if strict:
                        raise UserError(f"cannot load validation image: {reason}", where=s.path,
                                        fix="Fix or remove it, or drop --strict to skip it.") from None
                    warnings.warn(f"{s.path}: {reason}; left out of the validation set", stacklevel=2)
            if not rows:
                continue
            with torch.no_grad():
                x = torch.from_numpy(np.stack(pixels)).to(device, vae.dtype)
                self.latents.append((vae.encode(x).latent_dist.mean.float() * scaling).cpu())
            self.masks.append(torch.stack(masks).unsqueeze(1) if masked else None)
            kept_batches.append([s for s, _c in rows])
            kept_captions.append([c for _s, c in rows])
        self.batches, self.captions = kept_batches, kept_captions
        if not self.batches:
            raise UserError("no validation image could be loaded", where="--validation_split",
                            fix="See the warnings above.")

    def encode_captions(self, encode: Callable[[list[str]], "torch.Tensor"]) -> None:
        """With a frozen text encoder the conditioning never changes: encode it once (kept on the CPU)."""
        import torch

        with torch.no_grad():
            self.cond = [encode(captions).float().cpu() for captions in self.captions]

    def noise(self, sample_index: int, shape) -> list["torch.Tensor"]:
        """One noise tensor per validation timestep for this image, the same at every validation."""
        import torch

        from sdtune.seeds import derive

        gen = torch.Generator().manual_seed(derive(self.seed, sample_index))
        return [torch.randn(shape, generator=gen) for _ in self.timesteps]

    def loss(self, predictor, model, encode: Callable[[list[str]], "torch.Tensor"] | None = None, *,
             device="cpu") -> float:
        """The mean over held-out images and fixed timesteps of the training objective's per-image loss.

        `predictor` (train.predict.Predictor) asks `model` for its predictions exactly as training does;
        `encode(captions)` gives the conditioning when the text encoder trains (else the cached one is used).
        """
        import torch

        if not self.latents:
            raise RuntimeError("encode_images() first")
        if self.cond is None and encode is None:
            raise RuntimeError("encode_captions() first, or pass encode")
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for b, (batch, latents, mask) in enumerate(zip(self.batches, self.latents, self.masks)):
                    latents = latents.to(device)
                    with predictor.autocast():
                        cond = self.cond[b].to(device) if self.cond is not None else encode(self.captions[b])
                    noises = [self.noise(s.index, latents.shape[1:]) for s in batch]
                    for k, t in enumerate(self.timesteps):
                        noise = torch.stack([n[k] for n in noises]).to(device)
                        ts = torch.full((len(batch),), t, dtype=torch.long, device=device)
                        prediction = predictor.predict(model, latents, cond, noise=noise, timesteps=ts, weights=mask)
                        total += float(predictor.per_sample_loss(prediction).double().sum())
                        count += len(batch)
        finally:
            model.train(was_training)
        return total / count


def check_options(opts, held_out: list) -> None:
    """Validation flags without a held-out set would do nothing: refuse them."""
    given = [f"--{k}" for k in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")
             if getattr(opts, k) is not None]
    if given and not held_out:
        raise UserError(f"{', '.join(given)} given but no images are held out for validation",
                        where=given[0], fix="Add --validation_split 0.1 (or, in the dataset config, validation_split or a "
                            "subset with is_validation = true).")
