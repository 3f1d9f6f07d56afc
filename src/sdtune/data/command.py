"""`sdtune cache`: sort images into buckets and cache their VAE latents on disk (what sd-scripts'
prepare_buckets_latents.py / tools/cache_latents.py do), so that training starts without encoding.

    sdtune cache --pretrained_model_name_or_path model.safetensors --dataset_config data.toml
    sdtune cache --in_json meta.json --train_data_dir img --resolution 512 --enable_bucket --dry_run

It always caches to disk (the point of the command); `train` with --cache_latents_to_disk then
reuses every entry without a VAE call.
"""

from __future__ import annotations

from sdtune.config import Field, add_options, parse_options
from sdtune.data.options import DatasetOptions


class CacheOptions(DatasetOptions):
    pretrained_model_name_or_path: str | None = Field(
        None, "the model whose VAE encodes the images (a .safetensors/.ckpt file or a Diffusers folder)",
        group="Model", metavar="PATH")
    device: str | None = Field(None, "device for the VAE (default: cuda when available, else cpu)", group="Model")


def add_arguments(parser) -> None:
    add_options(parser, CacheOptions)


def run(args) -> int:
    from sdtune.data.latent_cache import cache_plan_summary
    from sdtune.data.plan import build_plan
    from sdtune.errors import UserError

    # The command always caches to disk; the flag makes the plan refuse uncacheable augmentations.
    opts = parse_options(CacheOptions, args).model_copy(update={"cache_latents_to_disk": True})
    if opts.dry_run:
        plan = build_plan(opts, seed=0)
        print(plan.summary())
        print(cache_plan_summary(plan))
        return 0
    if not opts.pretrained_model_name_or_path:
        raise UserError("no model given", where="--pretrained_model_name_or_path",
                        fix="Pass the checkpoint whose VAE the training will use (and --vae if training uses one).")
    cache_latents(opts)
    return 0


def cache_latents(opts: CacheOptions, *, v2: bool | None = None, recorded_buckets: bool = True):
    """Load the model's VAE, plan the dataset and fill the disk cache; returns the cache, whose plan
    holds the images that are cached (unreadable ones left out). `recorded_buckets=False` buckets by
    the options even where the metadata records buckets (the step that records them)."""
    import torch

    from sdtune.checkpoint import load_model, load_vae
    from sdtune.checkpoint.detect import detect_from_header, needs_loading_to_plan
    from sdtune.console import plural
    from sdtune.data.latent_cache import cache_folder, ensure_latent_cache
    from sdtune.data.plan import build_plan
    from sdtune.data.writable import check_cache_folders

    def planned(resolution):
        plan = build_plan(opts, seed=0, default_resolution=resolution, recorded_buckets=recorded_buckets)
        # an unwritable cache folder stops the command now, not after the model loaded
        check_cache_folders([cache_folder(s.path, opts.cache_dir) for s in plan.active], "the latent cache")
        return plan

    source = opts.pretrained_model_name_or_path
    found, _ = detect_from_header(source, v2=v2)  # the family loading detects, from the header alone
    plan = planned(found.family.resolution) if found and not needs_loading_to_plan(source, found) else None
    model = load_model(source, v2=v2)
    vae = load_vae(opts.vae, like=model.vae) if opts.vae else model.vae  # the VAE training will encode with
    plan = plan or planned(model.family.resolution)
    print(plan.summary())
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = ensure_latent_cache(plan, vae, device=device, to_disk=True)
    print(f"latent cache: {cache.reused} reused, {cache.encoded} encoded, "
          f"{plural(len(cache.plan.skipped), 'image')} skipped")
    return cache

