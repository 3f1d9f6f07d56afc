"""Hypernetwork files: the `.pt` that AUTOMATIC1111's web UI and ComfyUI load, and a `.safetensors` form.

The `.pt` file is a pickled dict: each enabled width (a Python int) maps to a tuple of two state
dicts, K module then V module, with keys `linear.N.weight` / `linear.N.bias` numbered by layer
position; beside them every metadata key (`METADATA_KEYS`), always written, because a missing
`activate_output` means True to the web UI and False to ComfyUI. Only tensors and plain Python values
are written, in torch's legacy format (see legacy_format.py), so the file passes the web UI's
restricted unpickler and `torch.load(weights_only=True)`, and the same weights give the same bytes.

Reading follows the web UI's rules for missing metadata (files written by sd-scripts have none),
renames NovelAI's original `linear1` / `linear2` keys per module, and checks every module's keys
and shapes against the structure the metadata describes: a mismatch is one line naming the width
and module, not a traceback from `load_state_dict`.

The `.safetensors` form holds the same tensors under `<width>.<0 for K, 1 for V>.linear.N.*` and all
metadata as one JSON text under the header key `hypernetwork`. Only sdtune reads it; the web UIs
load `.pt` files.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from sdtune.checkpoint.io import atomic_path, write_safetensors
from sdtune.errors import UserError
from sdtune.hypernetwork import legacy_format
from sdtune.hypernetwork.module import Hypernetwork
from sdtune.hypernetwork.spec import ACTIVATIONS, METADATA_KEYS, FileInfo, Structure

SUFFIXES = (".pt", ".safetensors")
HEADER_KEY = "hypernetwork"
_OLD_NAI_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                 "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
_PLAIN = (str, int, float, bool, type(None))


# ------------------------------------------------------------------------------------------ writing


def file_dict(hn: Hypernetwork, dtype: torch.dtype | None = None, name: str | None = None) -> dict[Any, Any]:
    """The web UI's dict for `hn`: widths in `hn`'s order, then every metadata key; tensors are CPU
    copies (cast to `dtype` when given) that each own their storage. `name` replaces the stored name."""
    out: dict[Any, Any] = {}
    for width in hn.widths:
        k, v = hn.pair(width)
        out[width] = (_module_state(k, dtype), _module_state(v, dtype))
    s, info = hn.structure, hn.info
    meta = {"step": int(info.step), "name": info.name if name is None else name, "layer_structure": list(s.layer_structure),
            "activation_func": s.activation_func, "is_layer_norm": s.is_layer_norm,
            "weight_initialization": s.weight_initialization, "sd_checkpoint": info.sd_checkpoint,
            "sd_checkpoint_name": info.sd_checkpoint_name, "activate_output": s.activate_output,
            "use_dropout": s.use_dropout, "dropout_structure": list(s.dropouts),
            "last_layer_dropout": s.dropouts[-2] != 0, "optional_info": info.optional_info}
    out.update((key, meta[key]) for key in METADATA_KEYS)
    out.update(info.extra)
    return out


def _module_state(module, dtype) -> OrderedDict:
    return OrderedDict((key, t.detach().to("cpu", dtype or t.dtype, copy=True).contiguous())
                       for key, t in module.state_dict().items())


def save(hn: Hypernetwork, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `hn` atomically as `.pt` (the web UIs' file) or `.safetensors`, by the path's suffix.

    The stored name becomes the file's stem: the web UI shows that name instead of the file's."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"a hypernetwork file must end in {' or '.join(SUFFIXES)}", where=str(path),
                        fix="Name it <name>.pt (what the web UIs load).")
    obj = file_dict(hn, dtype, name=path.stem)
    if path.suffix == ".safetensors":
        return _save_safetensors(obj, path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        legacy_format.write(obj, fh)
    return path


def _save_safetensors(obj: dict, path: Path) -> Path:
    tensors, meta = {}, {}
    for key, value in obj.items():
        if isinstance(key, int):
            for index, state in enumerate(value):
                tensors.update((f"{key}.{index}.{name}", t) for name, t in state.items())
        else:
            meta[key] = value
    meta["widths"] = [k for k in obj if isinstance(k, int)]
    return write_safetensors(path, tensors, metadata={HEADER_KEY: json.dumps(meta)})


# ------------------------------------------------------------------------------------------ reading


def load(path: str | Path, multiplier: float = 1.0) -> Hypernetwork:
    """The hypernetwork in `path` (`.pt` from the web UI, sd-scripts or sdtune; or sdtune's
    `.safetensors`), with its tensors' dtype; every problem is one UserError line."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError("hypernetwork file not found", where=where, fix="Check the path.")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    return from_file_dict(obj, where, default_name=path.stem, multiplier=multiplier)


def _read_pickle(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).split("\n\n")[0].strip().splitlines()[-1][:200]
        raise UserError(f"refused to load: the pickle wants to build something other than tensors and plain "
                        f"values ({first}); nothing in it was run", where=str(path),
                        fix="A hypernetwork file holds only tensors and plain values; get a clean copy.") from None
    except Exception as exc:  # noqa: BLE001 - bytes that are no pickle fail anywhere in the unpickler
        raise UserError(f"not a readable .pt file ({path.stat().st_size} bytes; truncated or corrupt?): "
                        f"{type(exc).__name__}", where=str(path), fix="Copy or download the file again.") from None


def _read_safetensors(path: Path) -> dict:
    from sdtune.checkpoint.io import read_state_dict

    tensors, metadata = read_state_dict(path)
    if HEADER_KEY not in metadata:
        raise UserError(f"no {HEADER_KEY!r} entry in the header: not a hypernetwork written by sdtune",
                        where=str(path), fix="Give the hypernetwork's .pt file.")
    try:
        meta = json.loads(metadata[HEADER_KEY])
        widths = [int(w) for w in meta.pop("widths")]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"the header's {HEADER_KEY!r} entry is damaged", where=str(path),
                        fix="Copy the file again, or use the .pt file.") from None
    obj: dict[Any, Any] = {w: (OrderedDict(), OrderedDict()) for w in widths}
    for name in tensors:
        width, index, key = _split_key(name, widths, str(path))
        obj[width][index][key] = tensors[name]
    obj.update(meta)
    return obj


def _split_key(name: str, widths: list[int], where: str) -> tuple[int, int, str]:
    width, _, rest = name.partition(".")
    index, _, key = rest.partition(".")
    if not (width.isdigit() and int(width) in widths and index in ("0", "1") and key):
        raise UserError(f"tensor {name!r} belongs to no width of the file", where=where,
                        fix="The file is damaged; use the .pt file.")
    return int(width), int(index), key


def from_file_dict(obj: Any, where: str, default_name: str = "", multiplier: float = 1.0) -> Hypernetwork:
    """A Hypernetwork from a file's dict, with the web UI's defaults for missing metadata."""
    if not isinstance(obj, dict):
        raise UserError(f"holds a {type(obj).__name__}, not a hypernetwork's dict", where=where,
                        fix="Give a hypernetwork .pt file (from the web UI, sd-scripts or sdtune).")
    widths = [k for k in obj if isinstance(k, int) and not isinstance(k, bool)]
    if not widths:
        raise UserError("no width entries (such as 768: [K, V] state dicts): not a hypernetwork file", where=where,
                        fix="Give a hypernetwork .pt file; LoRA and embedding files are other formats.")
    structure = structure_from_metadata(obj, where)
    info = _info(obj, where, default_name, widths)
    hn = Hypernetwork(widths, structure, info, multiplier)
    dtype = None
    for width in widths:
        pair = obj[width]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(s, dict) for s in pair):
            raise UserError(f"width {width} holds a {type(pair).__name__}, not the pair of K and V state dicts",
                            where=where, fix="The file is damaged or not a hypernetwork.")
        for label, module, state in zip(("K", "V"), hn.pair(width), pair):
            state = _renamed(state)
            _check_module(state, structure, width, f"{where}: width {width}, {label} module")
            dtype = dtype or next(iter(state.values())).dtype
            module.load_state_dict(state, strict=True)
    return hn.to(dtype) if dtype is not None and dtype.is_floating_point else hn


def _renamed(state: dict) -> dict:
    """NovelAI's original files call the two Linears `linear1` and `linear2`."""
    if set(state) and set(state) <= set(_OLD_NAI_KEYS):
        return OrderedDict((_OLD_NAI_KEYS[k], v) for k, v in state.items())
    return state


def _check_module(state: dict, structure: Structure, width: int, where: str) -> None:
    expected = structure.key_shapes(width)
    bad_types = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad_types:
        raise UserError(f"{bad_types[0]!r} is not a floating-point tensor", where=where,
                        fix="The file is damaged or not a hypernetwork.")
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else "",
            "wrong shape of " + ", ".join(f"{k} {list(got[k])} (expected {list(expected[k])})" for k in shapes)
            if shapes else "") if part)
        raise UserError(f"the weights do not match the structure its metadata describes ({structure.describe()}): "
                        f"{detail}", where=where,
                        fix="The file is damaged or its metadata was edited; use an unmodified copy.")


def structure_from_metadata(obj: dict, where: str) -> Structure:
    """The structure a file's metadata describes, missing keys read as the web UI reads them."""
    layer_structure = _get(obj, "layer_structure", [1, 2, 1], (list, tuple), where)
    activation = obj.get("activation_func") or "linear"  # the web UI reads None as linear
    if activation not in ACTIVATIONS:
        raise UserError(f"activation {activation!r} is not supported", where=f"{where}: activation_func",
                        fix=f"sdtune builds these: {', '.join(ACTIVATIONS)}.")
    dropout = obj.get("dropout_structure")
    if dropout is None:  # older web UI files: fixed 0.3 dropouts from two switches
        n = len(layer_structure)
        if _get(obj, "use_dropout", False, bool, where):
            last = 0.3 if _get(obj, "last_layer_dropout", False, bool, where) else 0
            dropout = ([0] + [0.3] * (n - 3) + [last] + [0])[:n]
        else:
            dropout = [0] * n
    try:
        return Structure(layer_structure=tuple(layer_structure), activation_func=activation,
                         is_layer_norm=_get(obj, "is_layer_norm", False, bool, where),
                         dropout_structure=tuple(_get(obj, "dropout_structure", dropout, (list, tuple), where)),
                         activate_output=_get(obj, "activate_output", True, bool, where),
                         weight_initialization=_get(obj, "weight_initialization", "Normal", str, where))
    except ValueError as exc:
        raise UserError(str(exc), where=where, fix="The file's metadata is damaged; use an unmodified copy.") from None


def _info(obj: dict, where: str, default_name: str, widths: list) -> FileInfo:
    extra = {}
    for key, value in obj.items():
        if key in widths or key in METADATA_KEYS:
            continue
        if not isinstance(key, str) or not _is_plain(value):
            raise UserError(f"unexpected entry {key!r} ({type(value).__name__})", where=where,
                            fix="A hypernetwork file holds width entries and metadata only; the file is damaged "
                                "or another kind of model.")
        extra[key] = value
    step = _get(obj, "step", 0, int, where)
    return FileInfo(name=_get(obj, "name", default_name, str, where) or default_name, step=step,
                    sd_checkpoint=_get(obj, "sd_checkpoint", None, (str, type(None)), where),
                    sd_checkpoint_name=_get(obj, "sd_checkpoint_name", None, (str, type(None)), where),
                    optional_info=_get(obj, "optional_info", None, (str, type(None)), where), extra=extra)


def _get(obj: dict, key: str, default, types, where: str):
    value = obj.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        raise UserError(f"{key} is a {type(value).__name__} ({value!r:.60})", where=where,
                        fix="The file's metadata is damaged; use an unmodified copy.")
    return value


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


def base_checkpoint_fields(model_path: str | Path) -> dict[str, str | None]:
    """`sd_checkpoint` and `sd_checkpoint_name` for a hypernetwork trained on `model_path`: the web UI's
    short hash (the first 10 hex digits of the SHA-256 of the whole file) and the file's stem; None
    for both when the model is not a single local file (a Diffusers folder, a hub id). Informational:
    the web UI shows them, no loader checks them."""
    import hashlib

    path = Path(model_path)
    if not path.is_file():
        return {"sd_checkpoint": None, "sd_checkpoint_name": None}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"sd_checkpoint": digest.hexdigest()[:10], "sd_checkpoint_name": path.stem}
