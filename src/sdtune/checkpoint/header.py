"""What a checkpoint holds, read without loading it (no torch): tensor names and shapes, metadata, configs.

Family detection needs little: which keys exist, a few shapes, the metadata, and the values of one
small tensor. `CheckpointView` gives exactly that, from a safetensors file's JSON header (a value is
read from its byte range on request) or from an already loaded state dict, so that `--dry_run` and
loading run the one detector in `detect.py` on the same facts.

A `.ckpt` is a pickle. In torch's zip format its `data.pkl` holds only the structure (names, shapes,
which storage file holds the bytes), so `read_ckpt_view` unpickles that with an unpickler that knows
five harmless names (a tensor and parameter rebuild, the storage types, OrderedDict) and refuses every
other global: nothing in the file is run, no torch is imported. A file it cannot read that way
(the legacy format, pickled objects) is left to loading, which reads it with torch's own restricted
unpickler (`io.read_state_dict`) and says what is wrong; likewise a Hugging Face Hub id.
"""

from __future__ import annotations

import collections
import json
import pickle
import re
import struct
import zipfile
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
        return _decode(raw, fmt, width)

    return CheckpointView(shapes, {k: v for k, v in meta.items() if isinstance(v, str)}, values)


def _decode(raw: bytes, fmt: str, width: int) -> list[float]:
    count = len(raw) // width
    if fmt == "bf16":  # the upper 16 bits of a float32
        halves = struct.unpack(f"<{count}H", raw)
        return list(struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in halves))))
    return list(struct.unpack(f"<{count}{fmt}", raw))


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


# --------------------------------------------------------------------------------------------- .ckpt

_STORAGES = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64"}


class _Tensor(collections.namedtuple("_Tensor", "storage key offset shape stride")):
    pass


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    kind, key = storage
    return _Tensor(kind, key, int(offset), tuple(int(x) for x in size), tuple(int(x) for x in stride))


def _rebuild_parameter(data, *_rest):
    return data


class _StructureOnly(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's structure into `_Tensor` records; refuses any other global."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not read without loading")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return pid[1] if isinstance(pid[1], str) else "", str(pid[2])


def read_ckpt_view(path: Path) -> CheckpointView | None:
    """The names, shapes and string entries of a torch zip-format checkpoint, or None (load it)."""
    try:
        archive = zipfile.ZipFile(path)
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        obj = _StructureOnly(archive.open(pkl)).load()
    except (OSError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError, IndexError, KeyError):
        return None
    if not isinstance(obj, dict):
        return None
    extras = {k: v for k, v in obj.items() if isinstance(v, str)}
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, _Tensor)}
    prefix = pkl[: -len("data.pkl")]

    def values(name: str) -> list[float] | None:
        t = tensors.get(name)
        if t is None or _STORAGES.get(t.storage) not in _SCALAR or t.stride not in ((1,), ()):
            return None
        fmt, width = _SCALAR[_STORAGES[t.storage]]
        count = t.shape[0] if t.shape else 1
        with archive.open(f"{prefix}data/{t.key}") as fh:
            fh.seek(t.offset * width)
            raw = fh.read(count * width)
        return _decode(raw, fmt, width)

    return CheckpointView({k: t.shape for k, t in tensors.items()}, extras, values)
