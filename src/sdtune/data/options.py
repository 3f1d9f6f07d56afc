"""Command-line dataset options: sd-scripts' fine_tune.py dataset flags, typed, with its defaults.

The training command composes its options class by inheriting from `DatasetOptions`, so the field
names are exactly sd-scripts' flag names. Values here are the "command line" level of the dataset
precedence (subset > dataset > general > command line > default, see `toml_config`). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import field_validator, model_validator

from sdtune.config import Field, Options
from sdtune.errors import UserError

G_DATA = "Dataset"
G_BUCKET = "Buckets"
G_CAPTION = "Captions"
G_AUG = "Augmentation"
G_CACHE = "Latent cache and loading"

# The caption keys are handed, resolved per subset, to the text module (`sdtune.text`) as a dict.
CAPTION_KEYS = (
    "caption_prefix", "caption_suffix", "shuffle_caption", "caption_separator", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "enable_wildcard", "token_warmup_min", "token_warmup_step",
)


def parse_resolution(value: str | int | list | tuple, where: str) -> tuple[int, int]:
    """sd-scripts' resolution: "512", "512,768" (width, height), 512 or [512, 768]."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        raise UserError(f"resolution {value!r} is not a number or a width,height pair", where=where,
                        fix='Use e.g. 512 or "512,768".') from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"resolution {value!r} must be one or two positive numbers", where=where,
                        fix='Use e.g. 512 or "512,768".')
    if parts[0] % 8 or parts[1] % 8:
        raise UserError(f"resolution {value!r} is not a multiple of 8 (the VAE downsamples by 8)", where=where,
                        fix="Round it to a multiple of 64, e.g. 512 or 768.")
    return parts[0], parts[1]


class DatasetOptions(Options):
    # Where the images and their metadata are may change on resume: the dataset itself is compared by
    # its fingerprint (train.state.dataset_fingerprint), so a moved folder resumes and a changed one is refused.
    in_json: str | None = Field(None, "metadata file (JSON or JSONL) of the images (legacy form; or use --dataset_config)",
                                group=G_DATA, metavar="FILE", resume="may_change")
    train_data_dir: str | None = Field(None, "folder of the images named in --in_json", group=G_DATA, metavar="DIR",
                                       resume="may_change")
    dataset_config: str | None = Field(None, "dataset config (TOML or JSON, sd-scripts' fine-tuning schema)",
                                       group=G_DATA, metavar="FILE")
    resolution: str | None = Field(None, 'training resolution: "512" or "width,height" (default: the model\'s)',
                                   group=G_DATA, metavar="W[,H]")
    train_batch_size: int = Field(1, "images per batch and process", group=G_DATA, ge=1)
    dataset_repeats: int = Field(1, "times each image is seen per epoch", group=G_DATA, ge=1)
    strict: bool = Field(False, "fail on a corrupt, unreadable or too small image instead of skipping it", group=G_DATA,
                         resume="may_change")
    dry_run: bool = Field(False, "print the buckets, steps per epoch and cache plan, then exit", group=G_DATA,
                          resume="may_change")

    enable_bucket: bool = Field(False, "aspect-ratio bucketing: train at several resolutions of about the same area",
                                group=G_BUCKET)
    min_bucket_reso: int = Field(256, "smallest bucket side", group=G_BUCKET, ge=8)
    max_bucket_reso: int = Field(1024, "largest bucket side", group=G_BUCKET, ge=8)
    bucket_reso_steps: int = Field(64, "bucket sides are multiples of this", group=G_BUCKET, ge=8)
    bucket_no_upscale: bool = Field(False, "never enlarge an image: small images get their own smaller bucket",
                                    group=G_BUCKET)

    shuffle_caption: bool = Field(False, "shuffle the comma-separated tags of each caption", group=G_CAPTION)
    caption_separator: str = Field(",", "tag separator", group=G_CAPTION)
    keep_tokens: int = Field(0, "keep the first N tags in place when shuffling", group=G_CAPTION, ge=0)
    keep_tokens_separator: str = Field("", "tags before this separator stay in place", group=G_CAPTION)
    secondary_separator: str | None = Field(None, "separator for tag groups shuffled as one", group=G_CAPTION)
    caption_prefix: str | None = Field(None, "text put before every caption", group=G_CAPTION)
    caption_suffix: str | None = Field(None, "text put after every caption", group=G_CAPTION)
    caption_dropout_rate: float = Field(0.0, "probability of training a sample with an empty caption",
                                        group=G_CAPTION, ge=0, le=1)
    caption_dropout_every_n_epochs: int = Field(0, "drop all captions every N-th epoch", group=G_CAPTION, ge=0)
    caption_tag_dropout_rate: float = Field(0.0, "probability of dropping each tag", group=G_CAPTION, ge=0, le=1)
    enable_wildcard: bool = Field(False, "{a|b} wildcards and multi-line captions", group=G_CAPTION)
    token_warmup_min: int = Field(1, "tags used at the start of the token warm-up", group=G_CAPTION, ge=0)
    token_warmup_step: float = Field(0, "steps (or a fraction < 1 of the run) of the token warm-up", group=G_CAPTION, ge=0)

    flip_aug: bool = Field(False, "random horizontal flips", group=G_AUG)
    alpha_mask: bool = Field(False, "masked loss: weight the loss by each image's alpha channel (transparent areas "
                             "are not learned; images without alpha count in full)", group=G_AUG)
    color_aug: bool = Field(False, "random hue / gamma shifts (not with latent caching)", group=G_AUG)
    random_crop: bool = Field(False, "random instead of centre crops (not with latent caching)", group=G_AUG)
    face_crop_aug_range: str | None = Field(None, "not supported by sdtune", group=G_AUG)
    resize_interpolation: Literal["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"] | None = Field(
        None, "resize filter (default: area when shrinking, lanczos when enlarging)", group=G_AUG)

    cache_latents: bool = Field(False, "encode every image with the VAE once, before training, and keep the latents "
                                "in memory", group=G_CACHE)
    cache_latents_to_disk: bool = Field(False, "cache latents on disk and reuse them in later runs (implies "
                                        "--cache_latents)", group=G_CACHE)
    cache_dir: str | None = Field(None, "where disk caches go (default: a .sdtune-cache folder beside each "
                                  "subset's images)", group=G_CACHE, metavar="DIR", resume="may_change")
    vae: str | None = Field(None, "a separate VAE (.safetensors/.ckpt file, Diffusers folder or hub id) that encodes "
                            "the images and samples and is saved in the trained model in place of the model's own",
                            group="Model", metavar="PATH")
    vae_batch_size: int = Field(4, "images per VAE call when caching", group=G_CACHE, ge=1, resume="may_change")
    no_half_vae: bool = Field(False, "run the VAE in float32 (default: float16 on GPU; CPU always uses float32)",
                              group=G_CACHE)
    skip_cache_check: bool = Field(False, "trust cache entries that exist without checking their header and shapes",
                                   group=G_CACHE, resume="may_change")
    max_data_loader_n_workers: int = Field(8, "image-decoding worker processes (0: decode in the main process)",
                                           group=G_CACHE, ge=0, resume="may_change")
    persistent_data_loader_workers: bool = Field(False, "keep the workers alive between epochs", group=G_CACHE,
                                                 resume="may_change")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_resolution(value, "--resolution")
            except UserError as exc:
                raise ValueError(exc.what) from None
        return value

    @model_validator(mode="after")
    def _dataset_checks(self):
        if self.face_crop_aug_range is not None:
            raise UserError("face crop augmentation is not supported", where="--face_crop_aug_range",
                            fix="Drop the option; crop the images beforehand if faces must stay in frame.")
        if self.dataset_config and (self.in_json or self.train_data_dir):
            # sd-scripts ignores them with a warning; an accepted option must act, so we refuse.
            raise UserError("--in_json / --train_data_dir cannot be combined with --dataset_config",
                            where="--dataset_config", fix="Put image_dir and metadata_file in the dataset config's "
                            "subsets and drop the two flags.")
        return self

    @property
    def caches_latents(self) -> bool:
        return self.cache_latents or self.cache_latents_to_disk

    def caption_options(self) -> dict:
        return {key: getattr(self, key) for key in CAPTION_KEYS}

    def loading(self) -> "LoadingOptions":
        return LoadingOptions(source=str(self.dataset_config or self.in_json), strict=self.strict,
                              caches_latents=self.caches_latents, cache_latents_to_disk=self.cache_latents_to_disk,
                              cache_dir=self.cache_dir, vae_batch_size=self.vae_batch_size,
                              no_half_vae=self.no_half_vae, skip_cache_check=self.skip_cache_check,
                              max_data_loader_n_workers=self.max_data_loader_n_workers,
                              persistent_data_loader_workers=self.persistent_data_loader_workers)


@dataclass(frozen=True)
class LoadingOptions:
    """What a planned dataset's loader and latent cache need of the options: the plan carries this,
    not the whole options object. Fields keep the options' names and meanings."""

    source: str  # the dataset config or metadata file, for messages
    strict: bool
    caches_latents: bool
    cache_latents_to_disk: bool
    cache_dir: str | None
    vae_batch_size: int
    no_half_vae: bool
    skip_cache_check: bool
    max_data_loader_n_workers: int
    persistent_data_loader_workers: bool
