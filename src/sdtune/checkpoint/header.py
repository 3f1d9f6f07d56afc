"""What a checkpoint holds, read without loading it (no torch): tensor names and shapes, metadata, configs.

Family detection needs little: which keys exist, a few shapes, the metadata, and the values of one
small tensor. `CheckpointView` gives exactly that, from a safetensors file's JSON header (a value is
read from its byte range on request) or from an already loaded state dict, so that `--dry_run` and
loading run the one detector in `detect.py` on the same facts.

A `.ckpt` is a pickle: its names are only known by unpickling it, which loading does safely
(`io.read_state_dict`); the header path answers "unknown" for it, as for a Hugging Face Hub id.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sdtune.errors import UserError

# safetensors dtype -> (struct format, bytes); bfloat16 is read as the upper half of a float32
_SCALAR = {"F32": ("f", 4), "F16": ("e", 2), "F64": ("d", 8), "BF16": ("bf16", 2)}


@dataclass(frozen=True)
class CheckpointView:
    shapes: Mapping[str, tuple[int, ...]]  # tensor name -> shape
    metadata: Mapping[str, str] = field(default_factory=dict)
    # the values of one tensor as floats, or None when they cannot be read without loading
    values: Callable[[str], list[float] | None] = lambda name: None

    @classmethod
    def of_state_dict(cls, sd: Mapping[str, Any], metadata: Mapping[str, str]) -> "CheckpointView":
        return cls({k: tuple(v.shape) for k, v in sd.items()}, dict(metadata),
                   lambda name: sd[name].detach().float().flatten().tolist() if name in sd else None)


def is_hub_id(text: str) -> bool:
    """`owner/name` that is not a local file name (load_model tries the Hub for these)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and Path(text).suffix not in (".safetensors", ".ckpt")


def read_safetensors_view(path: Path) -> CheckpointView:
    """The header of a .safetensors file as a view; UserError for a file that is not one."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise UserError(f"not a readable safetensors file ({size} bytes; truncated or corrupt?): {exc}",
                        where=str(path), fix="Download or copy the file again.") from None

    def values(name: str) -> list[float] | None:
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in _SCALAR:
            return None
        fmt, width = _SCALAR[entry["dtype"]]
        start, end = entry["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(8 + n + start)
            raw = fh.read(end - start)
        count = len(raw) // width
        if fmt == "bf16":  # the upper 16 bits of a float32
            halves = struct.unpack(f"<{count}H", raw)
            return list(struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in halves))))
        return list(struct.unpack(f"<{count}{fmt}", raw))

    return CheckpointView(shapes, {k: v for k, v in meta.items() if isinstance(v, str)}, values)


def read_diffusers_configs(path: Path) -> tuple[dict, dict, dict]:
    """(unet, text_encoder, scheduler) configs of a Diffusers folder; the scheduler's may be empty."""
    path = Path(path)
    for comp in ("unet", "vae", "text_encoder"):
        if not (path / comp / "config.json").is_file():
            raise UserError(f"not a Diffusers model folder (no {comp}/config.json)", where=str(path),
                            fix="Point at the folder that holds model_index.json, unet/, vae/, text_encoder/.")
    out = []
    for file in (path / "unet" / "config.json", path / "text_encoder" / "config.json",
                 path / "scheduler" / "scheduler_config.json"):
        if not file.is_file():
            out.append({})
            continue
        try:
            out.append(json.loads(file.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"unreadable config ({exc})", where=str(file), fix="Repair or download the file again.") from None
    return out[0], out[1], out[2]
