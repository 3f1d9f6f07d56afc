"""Saving a model as an original-layout single file or a Diffusers folder.

Everything comes from the in-memory `SDModel` (the source file is never re-read), every format
honours `precision`, and every output is written to a temporary name and renamed into place.
Without `precision`, tensors keep their dtypes (bit-exact conversion); with it, every floating
tensor is cast, including passthrough ones, so a "fp16 file" is fp16 throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtune.errors import UserError

from . import text_encoder as te
from .convert import to_original
from .io import atomic_path, write_pickle, write_safetensors
from .load import CONFIGS_KEY, PASSTHROUGH_FILE
from .modelspec import build_modelspec

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
PRECISIONS = ("float", "fp16", "bf16")
_SUFFIX = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


def precision_dtype(precision: str | None):
    import torch

    if precision is None:
        return None
    try:
        return {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    except KeyError:
        raise UserError(f"unknown save precision {precision!r}", fix=f"Use one of: {', '.join(PRECISIONS)}.") from None


def _configs(model) -> dict[str, dict]:
    text = model.text_encoder.config.to_dict()
    return {"unet": {k: v for k, v in dict(model.unet.config).items() if not k.startswith("_")},
            "vae": {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")},
            "text_encoder": {k: v for k, v in text.items() if k not in ("transformers_version", "architectures", "model_type",
                                                                        "dtype", "torch_dtype")}}


def _check_destination(model, path: Path, fmt: str) -> None:
    if fmt not in SAVE_FORMATS:
        raise UserError(f"unknown model format {fmt!r}", fix=f"Use one of: {', '.join(SAVE_FORMATS)}.")
    if fmt in _SUFFIX and path.suffix != _SUFFIX[fmt]:
        raise UserError(f"a {fmt} file must end in {_SUFFIX[fmt]}", where=str(path),
                        fix=f"Name it {path.with_suffix(_SUFFIX[fmt]).name}, or choose the format that matches the name.")
    if fmt.startswith("diffusers") and path.suffix in (".safetensors", ".ckpt"):
        raise UserError(f"a Diffusers model is a folder, not a {path.suffix} file", where=str(path),
                        fix="Give a folder name, or use --save_model_as safetensors.")
    if model.source and Path(model.source).exists():
        src, dst = Path(model.source).resolve(), path.resolve()
        if src == dst or dst in src.parents or src in dst.parents:
            raise UserError("refusing to write over or inside the model being converted", where=str(path),
                            fix="Choose another output path; the input is never modified.")


def save_model(model, path, *, fmt: str, precision: str | None = None, metadata: dict[str, str] | None = None,
               title: str | None = None, progress: bool = True) -> Path:
    """Write `model` to `path` as `fmt`; returns the path.

    `metadata` (str -> str, e.g. from `build_modelspec`) goes into safetensors headers and is merged
    over a default ModelSpec built from the family and `title` (default: the file name).
    """
    path = Path(path)
    _check_destination(model, path, fmt)
    dtype = precision_dtype(precision)
    desc = f"saving {path.name}" if progress else None
    if fmt in ("ckpt", "safetensors"):
        sd = to_original(model)
        configs = json.dumps(_configs(model), sort_keys=True)
        if fmt == "safetensors":
            meta = build_modelspec(model.family, title=title or path.stem)
            meta.update(metadata or {})
            meta[CONFIGS_KEY] = configs
            return write_safetensors(path, sd, metadata=meta, dtype=dtype, progress=desc)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        return write_pickle(path, {"state_dict": sd, CONFIGS_KEY: configs})
    return _save_diffusers(model, path, safe=fmt == "diffusers_safetensors", dtype=dtype, progress=desc,
                           title=title or path.name, metadata=metadata)


def _save_diffusers(model, path: Path, *, safe: bool, dtype, progress, title, metadata) -> Path:
    import torch

    configs = _configs(model)
    dtype_name = str(dtype or next(model.unet.parameters()).dtype).removeprefix("torch.")
    meta = build_modelspec(model.family, title=title, diffusers=True)
    meta.update(metadata or {})
    with atomic_path(path, directory=True) as tmp:
        for comp, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                              ("text_encoder", "model" if safe else "pytorch_model")):
            module = getattr(model, comp)
            folder = tmp / comp
            folder.mkdir()
            config: dict[str, Any] = dict(configs[comp])
            if comp == "text_encoder":
                config.update(architectures=["CLIPTextModel"], model_type="clip_text_model", torch_dtype=dtype_name)
            else:
                config = {"_class_name": type(module).__name__, "_diffusers_version": _diffusers_version(), **config}
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            sd = module.state_dict()
            if comp == "text_encoder":
                sd = text_encoder_state_dict(sd)
            if safe:
                write_safetensors(folder / f"{weights}.safetensors", sd, dtype=dtype, metadata={"format": "pt", **meta},
                                  progress=progress and f"{progress} ({comp})")
            else:
                if dtype is not None:
                    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                torch.save(sd, folder / f"{weights}.bin")
        save_tokenizer(model.tokenizer, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        sched = dict(model.scheduler_config)
        sched["prediction_type"] = model.family.prediction_type
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        (tmp / "model_index.json").write_text((model.family.asset_dir / "model_index.json").read_text())
        if model.passthrough:
            # Tensors diffusers has no place for (SD2's last OpenCLIP layer, ...): kept next to the
            # components so diffusers -> single file reproduces the original exactly.
            write_safetensors(tmp / PASSTHROUGH_FILE, model.passthrough, dtype=dtype)
    return path


def text_encoder_state_dict(sd: dict) -> dict:
    """The text encoder's tensors under the names transformers 4 gives them (`text_model.` + the rest).

    transformers >= 5.6 reads both forms, transformers 4 (still pinned by sd-scripts and many tools)
    only this one: without the prefix it silently starts the whole text encoder from random weights.
    """
    return {f"text_model.{te.hf_key(k)}": v for k, v in sd.items()}


# Keys transformers 5 writes into tokenizer_config.json that describe this process, not the tokenizer.
_LOCAL_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json (transformers 5, fast tokenizers) plus the files transformers 4's CLIPTokenizer
    reads: vocab.json, merges.txt, special_tokens_map.json and, for tokens added to the vocabulary,
    added_tokens.json."""
    tokenizer.save_pretrained(folder)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    # the first line is a header: CLIPTokenizer skips it
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if vocab.get(t["content"]) != t["id"]}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False) + "\n", encoding="utf-8")
    special = {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, k, None) is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config = {k: v for k, v in config.items() if k not in _LOCAL_TOKENIZER_KEYS}
    config.setdefault("tokenizer_class", "CLIPTokenizer")
    config.update(special, model_max_length=int(tokenizer.model_max_length))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _diffusers_version() -> str:
    from importlib.metadata import version

    return version("diffusers")
