"""Data prepared by `prepare_buckets_latents.py`: each image's bucket and its cached latents, used as recorded.

sd-scripts' documented legacy workflow ends with

    python finetune/prepare_buckets_latents.py train_data meta_clean.json meta_lat.json model.ckpt \\
        --batch_size 4 --max_resolution 512,512 --mixed_precision no
    accelerate launch fine_tune.py --in_json meta_lat.json --train_data_dir train_data ...

with no bucket or cache flag on the training line: the fine_tune.py those documents describe read
each image's `train_resolution`, turned bucketing on and trained every image in that bucket from
the latents the first step had written. sdtune does the same:

* a dataset whose every image has `train_resolution` trains each image in exactly that bucket
  (`build_plan`); resolution and bucket options do not apply to it;
* sdtune's prepare step also records per image how it cached the latents (`sdtune_latents`: the
  VAE precision, the image size and resize it used, whether the mirrored image was cached too).
  `apply_prepared` turns that record into the run's options, once, before training or --dry_run:
  the disk latent cache on, the recorded VAE precision (a float32 cache made by
  `--mixed_precision no` is reused on a GPU too, where the default would be float16), flip_aug
  when mirrored latents were cached (the documented fine_tune.py used them without a flag),
  alpha_mask when prepare stored the images' alpha masks (its --alpha_mask). The
  cache entries are then found by their content key, without a VAE call.

A flag that conflicts with the record gets one line saying that the record wins. No torch.
"""

from __future__ import annotations

from typing import Any

from sdtune.console import plural
from sdtune.data.buckets import Size, cover_size
from sdtune.data.metadata import MetadataRecord, load_records
from sdtune.data.options import DatasetOptions
from sdtune.data.toml_config import dataset_specs

RECORDED = "buckets recorded in the metadata (train_resolution, from prepare_buckets_latents.py)"
# Options that choose buckets; a recorded bucket replaces what they would choose.
BUCKET_FLAGS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale")
DTYPES = ("float32", "float16")


def all_recorded(records: list[MetadataRecord]) -> bool:
    return bool(records) and all(r.train_resolution is not None for r in records)


def latents_record(dtype: str, size: Size, resized: Size, flip: bool, alpha_mask: bool = False) -> dict[str, Any]:
    """What the prepare step writes as an image's `sdtune_latents`."""
    return {"dtype": dtype, "size": list(size), "resized": list(resized), "flip": flip, "alpha_mask": alpha_mask}


def _pair(value) -> Size | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0], value[1]
    return None


def recorded_geometry(record: MetadataRecord, size: Size) -> tuple[Size, Size]:
    """(bucket, resized) of an image with a recorded bucket: the resize prepare recorded while the
    image keeps its size and the resize covers the bucket (a hand-edited train_resolution makes it
    stale), else the smallest cover of the bucket, which is what bucketing itself does."""
    bucket = record.train_resolution
    latents = record.prepared_latents or {}
    resized = _pair(latents.get("resized")) if _pair(latents.get("size")) == tuple(size) else None
    if resized is None or resized[0] < bucket[0] or resized[1] < bucket[1]:
        resized = cover_size(size, bucket)
    return bucket, resized


def apply_prepared(opts: DatasetOptions, *, default_resolution: int | Size | None = None
                   ) -> tuple[DatasetOptions, list[str]]:
    """The run's options with what prepare_buckets_latents.py recorded, and one line per decision."""
    if not (opts.in_json or opts.dataset_config):
        return opts, []
    recorded, others, partial = [], [], []
    for d in dataset_specs(opts, default_resolution=default_resolution):
        records = [r for s in d.subsets for r in load_records(s.metadata_file, s.image_dir)]
        if all_recorded(records):
            recorded.append((d, records))
            continue
        others.append(d)
        with_bucket = sum(r.train_resolution is not None for r in records)
        if with_bucket:
            partial.append(f"{with_bucket} of {plural(len(records), 'image')} in {d.where}")
    notes = []
    if partial:
        notes.append(f"train_resolution is recorded for only {'; '.join(partial)}: the recorded buckets are used "
                     "only when every image of a dataset has one (run prepare_buckets_latents.py on the whole "
                     "metadata); bucketing follows the options")
    if not recorded:
        return opts, notes
    records = [r for _d, rs in recorded for r in rs]
    files = ", ".join(sorted({str(s.metadata_file) for d, _rs in recorded for s in d.subsets}))
    buckets = plural(len({r.train_resolution for r in records}), "bucket")
    line = (f"prepared data: {plural(len(records), 'image')} train in the {buckets} recorded in {files} "
            "(train_resolution)"
            + (", whatever the dataset config's resolution and bucket keys say" if opts.dataset_config else ""))
    given = sorted(f"--{k}" for k in BUCKET_FLAGS if k in opts.model_fields_set)
    if given:
        rest = f"; they apply to the other datasets ({', '.join(d.where for d in others)})" if others else ""
        notes.append(f"{', '.join(given)}: not used for the prepared images: each trains in its recorded bucket, "
                     f"as sd-scripts' fine_tune.py did when the metadata had train_resolution{rest}")
    update, latent_line = _latent_options(opts, recorded, notes)
    notes.insert(0, line + latent_line)
    return (opts.model_copy(update=update) if update else opts), notes


def _latent_options(opts: DatasetOptions, recorded: list, notes: list[str]) -> tuple[dict[str, Any], str]:
    """The cache options that find prepare's latents, and the words for the summary line."""
    latents = [r.prepared_latents for _d, rs in recorded for r in rs]
    dtypes = {lat.get("dtype") for lat in latents if lat}
    if not any(latents):
        return {}, "; no latents were recorded, so the images are encoded as the cache options say"
    if not all(latents) or len(dtypes) != 1 or not dtypes <= set(DTYPES):
        notes.append(f"latents were recorded for {sum(1 for lat in latents if lat)} of {len(latents)} prepared "
                     f"images, in {', '.join(sorted(map(str, dtypes)))}: they are not reused as a whole; run "
                     "prepare_buckets_latents.py again to cache them all alike")
        return {}, ""
    (dtype,) = dtypes
    if opts.color_aug or opts.random_crop or any(s.color_aug or s.random_crop
                                                 for d, _rs in recorded for s in d.subsets):
        notes.append("the prepared latents are not used: color_aug / random_crop change the pixels at every step, "
                     "so the VAE encodes each batch")
        return {}, ""
    update: dict[str, Any] = {"cache_latents_to_disk": True, "no_half_vae": dtype == "float32"}
    if "no_half_vae" in opts.model_fields_set and opts.no_half_vae != (dtype == "float32"):
        notes.append(f"--no_half_vae: {'not used' if opts.no_half_vae else 'on'}: the prepared latents were encoded "
                     f"by a {dtype} VAE and the cache key includes the precision, so the recorded one wins")
    words = f", from the latents prepare cached ({dtype} VAE; no VAE call for them)"
    if all(lat.get("flip") for lat in latents) and not opts.flip_aug:
        update["flip_aug"] = True
        words += "; flip_aug on, since mirrored latents were cached too (--flip_aug at prepare)"
    if all(lat.get("alpha_mask") for lat in latents) and not opts.alpha_mask:
        # the entries were made with the masks and the cache key includes them
        update["alpha_mask"] = True
        words += "; alpha_mask on (masked loss), since prepare stored the alpha masks (--alpha_mask at prepare)"
    if opts.cache_dir:
        notes.append(f"--cache_dir {opts.cache_dir}: the prepared latents are in .sdtune-cache beside the images; "
                     "this run encodes the images again into the given folder")
    return update, words
