"""Data: metadata, dataset config, buckets, images, latent cache, sampler, loader.

One image's way from disk to a batch:

    DatasetOptions (options.py)             sd-scripts' dataset flags, the command-line level
      -> dataset_specs (toml_config.py)     [general]/[[datasets]]/[[datasets.subsets]] or --in_json,
                                            every key resolved: subset > dataset > general > CLI > default
      -> build_plan (plan.py)               metadata (metadata.py) + image headers (images.py) ->
                                            Sample(index, subset, path, caption, tags, size, bucket, resized);
                                            buckets from buckets.py; bad images skipped and counted
      -> ensure_latent_cache (latent_cache.py)   optional: VAE posterior (mean, logvar) per image and flip,
                                            content-addressed on disk or in memory
      -> BucketBatchSampler (sampler.py)    batches per (seed, epoch, rank): one bucket per batch
      -> make_loader (dataset.py)           DataLoader; workers decode images or read cache entries

Public API for the trainer (plan, sampler and options import no torch):

    plan = build_plan(options, seed=seed, default_resolution=family.resolution)   # -> DatasetPlan
    print(plan.summary(num_processes, grad_accum)); print(cache_plan_summary(plan))  # --dry_run
    plan.check_fill(num_processes, grad_accum)            # UserError if one step cannot be filled
    plan.steps_per_epoch(num_processes, grad_accum)
    cache = ensure_latent_cache(plan, vae, device=..., dtype=None, rank=r, world_size=w)  # if options.caches_latents
    plan = cache.plan                                      # images that failed to decode are left out
    sampler = BucketBatchSampler(plan, seed=seed, rank=r, world_size=w)
    loader = make_loader(plan, sampler, cache)             # cache=None: batches carry images
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        for batch in loader:                               # a Batch; batch.position + 1 is the resume point
            latents = sample_latents(batch.latent_mean, batch.latent_logvar, generator) \
                      * vae.config.scaling_factor          # or vae.encode(batch.images) ... the same pixels

Captions are not processed here: each batch carries the raw caption and tags and the subset's
resolved caption options (a dict of sdtune.text's CaptionOptions keys).
"""

from sdtune.data.options import DatasetOptions
from sdtune.data.plan import DatasetPlan, Sample, build_plan
from sdtune.data.sampler import BatchSpec, BucketBatchSampler

__all__ = ["DatasetOptions", "DatasetPlan", "Sample", "build_plan", "BatchSpec", "BucketBatchSampler",
           "ensure_latent_cache", "cache_plan_summary", "sample_latents", "make_loader"]


def __getattr__(name):
    # torch-using parts load on first use, so `import sdtune.data` stays light for --help and --dry_run.
    if name in ("ensure_latent_cache", "cache_plan_summary", "sample_latents", "LatentCache"):
        from sdtune.data import latent_cache

        return getattr(latent_cache, name)
    if name in ("make_loader", "BatchDataset"):
        from sdtune.data import dataset

        return getattr(dataset, name)
    raise AttributeError(name)
