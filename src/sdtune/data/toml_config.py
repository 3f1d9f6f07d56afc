"""Dataset configs in sd-scripts' fine-tuning schema, and the legacy --in_json form, as one structure.

    [general]                  defaults for every dataset and subset
    [[datasets]]               dataset keys (resolution, batch_size, buckets) and subset defaults
      [[datasets.subsets]]     metadata_file (required), image_dir, num_repeats, captions, augmentation

A subset key is looked up in the subset, its dataset, [general], the command line (with its
default), in that order; a dataset key in the dataset, [general], the command line. `None` means
"not set" at every level, as in sd-scripts (so a config cannot un-set what the command line sets).
Without --dataset_config, --in_json and --train_data_dir make one dataset with one subset, as
sd-scripts' fine_tune.py builds it.

Every error names the file, the table (e.g. `datasets[0].subsets[1]`) and the key. Keys sd-scripts
parses but that have no meaning or no implementation here (face_crop_aug_range, network_multiplier
!= 1) are refused instead of ignored. No torch.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.config import read_toml, suggest
from sdtune.data.buckets import Size
from sdtune.data.images import FILTERS
from sdtune.data.options import CAPTION_KEYS, DatasetOptions, parse_resolution
from sdtune.errors import UserError

_BOOL, _INT, _FLOAT, _STR = "bool", "int", "float", "str"

# key -> type; "ascendable" subset keys may also be set in [[datasets]] or [general].
SUBSET_ASCENDABLE: dict[str, str] = {
    "num_repeats": _INT, "shuffle_caption": _BOOL, "caption_separator": _STR, "keep_tokens": _INT,
    "keep_tokens_separator": _STR, "secondary_separator": _STR, "enable_wildcard": _BOOL, "color_aug": _BOOL,
    "flip_aug": _BOOL, "random_crop": _BOOL, "caption_prefix": _STR, "caption_suffix": _STR,
    "token_warmup_min": _INT, "token_warmup_step": _FLOAT, "caption_dropout_rate": _FLOAT,
    "caption_dropout_every_n_epochs": _INT, "caption_tag_dropout_rate": _FLOAT, "alpha_mask": _BOOL,
    "face_crop_aug_range": "list", "custom_attributes": "dict", "resize_interpolation": _STR,
}
SUBSET_ONLY: dict[str, str] = {"metadata_file": _STR, "image_dir": _STR, "is_validation": _BOOL}
DATASET_KEYS: dict[str, str] = {
    "batch_size": _INT, "resolution": "resolution", "enable_bucket": _BOOL, "min_bucket_reso": _INT,
    "max_bucket_reso": _INT, "bucket_reso_steps": _INT, "bucket_no_upscale": _BOOL, "network_multiplier": _FLOAT,
    "validation_seed": _INT, "validation_split": _FLOAT, "resize_interpolation": _STR,
}
DREAMBOOTH_KEYS = ("caption_extension", "caption_extention", "class_tokens", "is_reg", "cache_info",
                   "conditioning_data_dir")
# Command-line flag of each key whose name differs (sd-scripts' config keys vs its flags).
CLI_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

_MINIMUM = {"num_repeats": 0, "keep_tokens": 0, "token_warmup_min": 0, "token_warmup_step": 0,
            "caption_dropout_every_n_epochs": 0, "batch_size": 1, "min_bucket_reso": 8, "max_bucket_reso": 8,
            "bucket_reso_steps": 8, "caption_dropout_rate": 0, "caption_tag_dropout_rate": 0}


@dataclass(frozen=True)
class SubsetSpec:
    index: int  # across all datasets, in config order
    dataset_index: int
    metadata_file: Path
    image_dir: Path | None
    num_repeats: int
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    resize_interpolation: str | None
    # Resolved caption keys (CAPTION_KEYS) for sdtune.text; this package never processes captions.
    caption_options: dict[str, Any]
    custom_attributes: dict[str, Any] | None = None
    where: str = ""
    # sdtune's key: every image of the subset is held out for the validation loss, none is trained on
    is_validation: bool = False
    # the loss is weighted by the image's alpha channel (masked loss)
    alpha_mask: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    index: int
    resolution: Size
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: tuple[SubsetSpec, ...] = field(default_factory=tuple)
    where: str = ""
    # None: not set in the config; the trainer's --validation_split / --validation_seed apply
    validation_split: float | None = None
    validation_seed: int | None = None
    # every image trains in the bucket its metadata records (train_resolution, see sdtune.data.prepared)
    recorded_buckets: bool = False


def _check_type(value: Any, kind: str, key: str, where: str) -> Any:
    ok = {
        _BOOL: isinstance(value, bool),
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        _STR: isinstance(value, str),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "resolution": isinstance(value, (int, list, str)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        expected = {"resolution": "a number or [width, height]", "list": "a list", "dict": "a table"}.get(kind, kind)
        raise UserError(f"{key} = {value!r} has the wrong type, expected {expected}", where=where)
    if key in _MINIMUM and value < _MINIMUM[key]:
        raise UserError(f"{key} = {value!r} must be at least {_MINIMUM[key]}", where=where)
    if key in ("caption_dropout_rate", "caption_tag_dropout_rate") and value > 1:
        raise UserError(f"{key} = {value!r} is a probability, at most 1", where=where)
    if key == "resolution":
        parse_resolution(value, f"{where}: resolution")
    if key == "resize_interpolation" and value not in FILTERS:
        raise UserError(f"resize_interpolation = {value!r} is not known", where=where,
                        fix=f"Use one of: {', '.join(FILTERS)}.")
    return value


def _check_table(table: dict, allowed: dict[str, str], where: str, level: str) -> None:
    for key, value in table.items():
        if key in allowed:
            _check_type(value, allowed[key], key, f"{where}.{key}")
            continue
        if key in DREAMBOOTH_KEYS:
            raise UserError(f"{key!r} is a DreamBooth key; fine-tuning subsets take captions from metadata_file",
                            where=where, fix="Remove it (put captions in the metadata file).")
        hint = ""
        if key in SUBSET_ONLY and level != "subset":
            hint = f" here; {key} belongs in a [[datasets.subsets]] table"
        elif key in DATASET_KEYS and level == "subset":
            hint = f" in a subset; {key} belongs in [[datasets]] or [general]"
        elif isinstance(value, (dict, list)) and level == "general" and key == "datasets":
            hint = ""
        raise UserError(f"unknown key {key!r}{hint or suggest(key, allowed)}", where=where)


def _refuse_unsupported(values: dict[str, Any], where: str) -> None:
    if values.get("face_crop_aug_range") is not None:
        raise UserError("face crop augmentation is not supported", where=f"{where}.face_crop_aug_range",
                        fix="Remove it.")
    if values.get("network_multiplier") not in (None, 1, 1.0):
        raise UserError("network_multiplier applies to LoRA networks, not to full fine-tuning",
                        where=f"{where}.network_multiplier", fix="Remove it.")
    split = values.get("validation_split")
    if split is not None and not 0 <= split < 1:
        raise UserError(f"validation_split = {split} is outside [0, 1)", where=f"{where}.validation_split",
                        fix="Use a fraction such as 0.1 (10% of each subset's images held out).")


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise UserError("dataset config not found", where=str(path), fix="Check --dataset_config.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"not valid JSON ({exc})", where=str(path)) from None
        if not isinstance(data, dict):
            raise UserError("expected an object with a \"datasets\" list", where=str(path))
        return data
    return read_toml(path, "dataset config")


def _path(value: str | None, config_dir: Path | None) -> Path | None:
    """Relative paths are taken from the working directory (as sd-scripts does), else beside the config."""
    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists() and config_dir is not None and (config_dir / p).exists():
        return config_dir / p
    return p


def _lookup(key: str, tables: list[dict], options: DatasetOptions, default: Any = None) -> Any:
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    cli = CLI_NAME.get(key, key)
    if cli in DatasetOptions.model_fields:
        value = getattr(options, cli)
        if value is not None:
            return value
    return default


def dataset_specs(options: DatasetOptions, *, default_resolution: int | Size | None = None) -> list[DatasetSpec]:
    """The datasets and subsets of a run, every key resolved by the precedence rules."""
    where, data, config_dir = _read_config(options)
    top = {k: v for k, v in data.items()}
    general = top.pop("general", {}) or {}
    datasets = top.pop("datasets", None)
    for key in top:
        raise UserError(f"unknown top-level key {key!r}{suggest(key, ['general', 'datasets'])}", where=where,
                        fix="A dataset config has [general] and [[datasets]] tables only.")
    if not isinstance(general, dict):
        raise UserError("[general] must be a table", where=where)
    _check_table(general, {**SUBSET_ASCENDABLE, **DATASET_KEYS}, f"{where}: [general]", "general")
    _refuse_unsupported(general, f"{where}: [general]")
    if not isinstance(datasets, list) or not datasets:
        raise UserError("no [[datasets]] tables", where=where, fix="Add [[datasets]] with [[datasets.subsets]].")
    specs: list[DatasetSpec] = []
    for d_index, dataset in enumerate(datasets):
        first_subset = sum(len(d.subsets) for d in specs)
        specs.append(_dataset_spec(dataset, d_index, f"{where}: datasets[{d_index}]", general, options,
                                   default_resolution, config_dir, first_subset))
    return specs


def _read_config(options: DatasetOptions) -> tuple[str, dict[str, Any], Path | None]:
    """(where, the config as a dict, the folder its relative paths start from)."""
    if options.dataset_config:
        where = str(options.dataset_config)
        return where, load_config_file(options.dataset_config), Path(options.dataset_config).resolve().parent
    if options.in_json:
        subset = {k: v for k, v in (("metadata_file", options.in_json), ("image_dir", options.train_data_dir))
                  if v is not None}
        return "--in_json", {"datasets": [{"subsets": [subset]}]}, None
    raise UserError("no dataset given", where="--dataset_config",
                    fix="Pass --dataset_config FILE.toml, or --in_json META.json with --train_data_dir DIR.")


def _dataset_spec(dataset: Any, d_index: int, d_where: str, general: dict[str, Any], options: DatasetOptions,
                  default_resolution: int | Size | None, config_dir: Path | None, first_subset: int) -> DatasetSpec:
    if not isinstance(dataset, dict):
        raise UserError("each [[datasets]] entry must be a table", where=d_where)
    dataset = dict(dataset)
    subsets = dataset.pop("subsets", None)
    _check_table(dataset, {**SUBSET_ASCENDABLE, **DATASET_KEYS}, d_where, "dataset")
    _refuse_unsupported(dataset, d_where)
    if not isinstance(subsets, list) or not subsets:
        raise UserError("dataset has no [[datasets.subsets]]", where=d_where,
                        fix="Add a [[datasets.subsets]] table with metadata_file (and image_dir).")
    d_tables = [dataset, general]
    resolution, buckets = _bucket_settings(d_tables, d_where, options, default_resolution)
    subset_specs = _subset_specs(subsets, d_index, d_where, d_tables, options, config_dir, first_subset)
    if not subset_specs:
        raise UserError("every subset of this dataset was skipped", where=d_where)
    if all(s.is_validation for s in subset_specs):
        raise UserError("every subset of this dataset is a validation subset: it has nothing to train on",
                        where=d_where, fix="Add a training subset, or drop is_validation from one.")
    return DatasetSpec(index=d_index, resolution=resolution, batch_size=int(_lookup("batch_size", d_tables, options)),
                       **buckets, subsets=tuple(subset_specs), where=d_where,
                       validation_split=_lookup("validation_split", d_tables, options),
                       validation_seed=_lookup("validation_seed", d_tables, options))


def _bucket_settings(d_tables: list[dict[str, Any]], d_where: str, options: DatasetOptions,
                     default_resolution: int | Size | None) -> tuple[Size, dict[str, Any]]:
    """The dataset's resolution and bucket keys, checked against each other."""
    raw_res = _lookup("resolution", d_tables, options, default_resolution)
    if raw_res is None:
        raise UserError("no training resolution", where=f"{d_where}.resolution",
                        fix="Set resolution in the dataset config or pass --resolution 512.")
    resolution = parse_resolution(raw_res, f"{d_where}.resolution")
    step = _lookup("bucket_reso_steps", d_tables, options)
    min_reso = _lookup("min_bucket_reso", d_tables, options)
    max_reso = _lookup("max_bucket_reso", d_tables, options)
    enable_bucket = bool(_lookup("enable_bucket", d_tables, options))
    no_upscale = bool(_lookup("bucket_no_upscale", d_tables, options))
    if step % 8:
        raise UserError(f"bucket_reso_steps = {step} is not a multiple of 8 (the VAE downsamples by 8)",
                        where=f"{d_where}.bucket_reso_steps", fix="Use 64 (the default) or another multiple of 8.")
    if enable_bucket and not no_upscale:
        lo, hi = min_reso // step * step, -(-max_reso // step) * step
        if lo == 0:  # sd-scripts rounds it down to 0 and then divides by the 0-wide bucket
            raise UserError(f"min_bucket_reso = {min_reso} is below bucket_reso_steps = {step}: the smallest "
                            "bucket side would be 0", where=f"{d_where}.min_bucket_reso",
                            fix=f"Use a min_bucket_reso of at least {step}, or a smaller bucket_reso_steps.")
        if min(resolution) < lo or max(resolution) > hi:
            raise UserError(f"resolution {resolution[0]}x{resolution[1]} is outside the bucket sides {lo}..{hi}",
                            where=f"{d_where}.resolution",
                            fix="Lower min_bucket_reso or raise max_bucket_reso to include the resolution.")
    return resolution, dict(enable_bucket=enable_bucket, min_bucket_reso=min_reso, max_bucket_reso=max_reso,
                            bucket_reso_steps=step, bucket_no_upscale=no_upscale)


def _subset_specs(subsets: list, d_index: int, d_where: str, d_tables: list[dict[str, Any]], options: DatasetOptions,
                  config_dir: Path | None, first_index: int) -> list[SubsetSpec]:
    seen: set[Path] = set()
    specs = []
    for s_index, subset in enumerate(subsets):
        s_where = f"{d_where}.subsets[{s_index}]"
        if not isinstance(subset, dict):
            raise UserError("each [[datasets.subsets]] entry must be a table", where=s_where)
        _check_table(subset, {**SUBSET_ASCENDABLE, **SUBSET_ONLY}, s_where, "subset")
        _refuse_unsupported(subset, s_where)
        if not subset.get("metadata_file"):
            raise UserError("fine-tuning subsets need metadata_file", where=s_where,
                            fix="Add metadata_file = \"meta.json\" (made by `sdtune merge`).")
        s_tables = [subset, *d_tables]
        metadata_file = _path(subset["metadata_file"], config_dir)
        if metadata_file.resolve() in seen:
            warnings.warn(f"{s_where}: metadata_file {metadata_file} is listed twice in this dataset; "
                          "the duplicate subset is skipped (as sd-scripts does)", stacklevel=4)
            continue
        seen.add(metadata_file.resolve())
        repeats = _lookup("num_repeats", s_tables, options, 1)
        if repeats < 1:
            warnings.warn(f"{s_where}: num_repeats = {repeats}, the subset is skipped", stacklevel=4)
            continue
        caption = {key: _lookup(key, s_tables, options) for key in CAPTION_KEYS}
        specs.append(SubsetSpec(
            index=first_index + len(specs), dataset_index=d_index, metadata_file=metadata_file,
            image_dir=_path(subset.get("image_dir"), config_dir), num_repeats=int(repeats),
            flip_aug=bool(_lookup("flip_aug", s_tables, options)),
            color_aug=bool(_lookup("color_aug", s_tables, options)),
            random_crop=bool(_lookup("random_crop", s_tables, options)),
            resize_interpolation=_lookup("resize_interpolation", s_tables, options),
            caption_options=caption, custom_attributes=_lookup("custom_attributes", s_tables, options),
            where=s_where, is_validation=bool(subset.get("is_validation", False)),
            alpha_mask=bool(_lookup("alpha_mask", s_tables, options))))
    return specs
