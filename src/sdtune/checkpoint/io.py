"""Reading and writing state-dict files safely: memory-mapped, no pickled code, atomic.

Reading: `.safetensors` goes through `safetensors.safe_open` (memory-mapped: the tensors are views
of the page cache, so a 2 GB file does not need 2 GB of private RAM until it is modified). `.ckpt`
and `.pt` go through `torch.load(weights_only=True, mmap=True)`: torch's restricted unpickler, which
builds tensors and plain containers and refuses every other global, so a hostile pickle runs
nothing.

Writing: safetensors files are written by `write_safetensors` below, our own streaming writer of
the (small, documented) format, because `safetensors.torch.save_file` first turns every tensor into
a `bytes` copy and so needs twice the model in RAM. Each tensor is cast (when a save precision is
asked for) and written one at a time. Every write goes to a temporary file in the destination's
folder and is renamed into place, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.errors import UserError, write_error
from sdtune.atomic import atomic_path as _atomic_path

if TYPE_CHECKING:
    import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype names (https://github.com/huggingface/safetensors, "Format").
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def read_state_dict(path: Path) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """(tensors, extras) of a single-file checkpoint.

    extras holds the safetensors header metadata (str -> str) or, for a pickle checkpoint, its
    non-tensor top-level entries (epoch, global_step, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint file not found", where=str(path), fix="Check the path.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _read_pickle(path)
    raise UserError(f"unknown checkpoint file type {path.suffix!r}", where=str(path),
                    fix=f"Use one of {', '.join(SINGLE_FILE_SUFFIXES)} or a Diffusers folder.")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"not a readable safetensors file ({size} bytes; truncated or corrupt?): {exc}",
                        where=str(path), fix="Download or copy the file again.") from None
    return tensors, metadata


def _read_pickle(path: Path):
    import torch

    size = path.stat().st_size
    mmap = zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be memory-mapped
    try:
        with warnings.catch_warnings():
            # torch's remark on a pickle protocol other than 2, printed before the file's real problem
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).split("\n\n")[0].strip().splitlines()[-1][:300]
        raise UserError(
            f"refused to load: the pickle wants to run or build something other than tensors ({first})",
            where=str(path),
            fix="Nothing in it was run. Use a .safetensors version of the model, or convert the file in a "
                "sandbox you trust.") from None
    except Exception as exc:  # noqa: BLE001 - bytes that are no pickle fail anywhere in the unpickler (IndexError...)
        detail = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
        raise UserError(f"not a readable checkpoint ({size} bytes; truncated or corrupt?): {detail}", where=str(path),
                        fix="Download or copy the file again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extras = {k: v for k, v in obj.items() if k != "state_dict" and not isinstance(v, torch.Tensor)}
        obj = obj["state_dict"]
    else:
        extras = {}
    if not isinstance(obj, dict):
        raise UserError(f"holds a {type(obj).__name__}, not a state dict", where=str(path))
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extras.update({f"other:{k}": v for k, v in obj.items() if not isinstance(v, torch.Tensor)})
    return tensors, extras


# ---------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_path(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of `final` to write to, renamed over it when the block succeeds; what a
    killed save of the same name left (as big as the model) is removed first."""
    try:
        with _atomic_path(final, directory=directory, clean_up=True) as tmp:
            yield tmp
    except OSError as exc:
        problem = write_error(exc, final)  # a full disk, a read-only folder: one clear line, no traceback
        if problem is not None:
            raise problem from None
        raise


def write_safetensors(path: Path, tensors: Iterable[tuple[str, "torch.Tensor"]] | dict, *,
                      metadata: dict[str, str] | None = None, dtype=None, progress: str | None = None) -> Path:
    """Stream `tensors` into a safetensors file at `path` (atomically), casting floats to `dtype`.

    Peak extra memory is one tensor (its cast copy), not the whole model.
    """
    import torch

    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str) or not isinstance(k, str)}
        if bad:
            raise ValueError(f"safetensors metadata must be str -> str: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    specs = []
    for name, t in items:
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[str(out_dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        specs.append((name, t, out_dtype))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        # A bar only where it helps: tiny test models save in milliseconds.
        for name, t, out_dtype in _progress(specs, progress if offset > 256 << 20 else None):
            t = t.detach().to("cpu", out_dtype).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return path


def write_pickle(path: Path, obj: dict) -> Path:
    """torch.save `obj` atomically (the .ckpt format A1111 / ComfyUI read)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _progress(items, desc):
    if not desc:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False, mininterval=1.0)
