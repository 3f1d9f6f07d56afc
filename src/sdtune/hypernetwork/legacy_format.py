"""torch's legacy (pre-zip) `.pt` serialization, written deterministically.

The web UI's loader checks `.pt` files with a restricted unpickler before loading them; in the
versions read, that check accepts only the zip members older torch wrote, so the zip files of
current torch (which add `byteorder`, `.format_version`, ...) can be refused. The legacy format has
no zip at all: the web UI, ComfyUI (`torch.load(weights_only=True)`) and every torch read it. torch
still writes it (`_use_new_zipfile_serialization=False`), but names each storage after its memory
address, so the same dict gives different bytes on every save. This writer produces the same
format with storages numbered in the order the pickle meets them: the same tensors always give the
same bytes, which is what makes save -> load -> save an identity and checksums meaningful.

The format, as torch's legacy loader reads it: five pickles (protocol 2) one after the other (the
magic number, the format version, a dict of system facts, the object with each tensor storage
replaced by a persistent id ("storage", storage class, key, location, element count, None), the
list of keys), then for each key in that list the storage's element count as a little-endian int64
followed by its bytes.
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import BinaryIO

import torch

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_SYS_INFO = {"protocol_version": _PROTOCOL_VERSION, "little_endian": True,
             "type_sizes": {"short": 2, "int": 4, "long": 4}}


class _Pickler(pickle.Pickler):
    def __init__(self, fh: BinaryIO):
        super().__init__(fh, protocol=2)
        self.storages: list[torch.storage.TypedStorage] = []
        self._keys: dict[int, str] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, torch.storage.TypedStorage):
            return None
        if obj._untyped_storage.device.type != "cpu":
            raise ValueError("only CPU tensors can be written")
        ident = obj._untyped_storage.data_ptr()
        if ident not in self._keys:
            self._keys[ident] = str(len(self.storages))
            self.storages.append(obj)
        return ("storage", getattr(torch, obj._pickle_storage_type()), self._keys[ident], "cpu", obj._size(), None)


def write(obj, fh: BinaryIO) -> None:
    """Write `obj` (plain Python containers of CPU tensors, each tensor owning its whole storage)."""
    if sys.byteorder != "little":  # the format stores little-endian data; big-endian hosts would need swapping
        raise RuntimeError("writing .pt hypernetworks needs a little-endian machine")
    for value in (_MAGIC_NUMBER, _PROTOCOL_VERSION, _SYS_INFO):
        pickle.dump(value, fh, protocol=2)
    pickler = _Pickler(fh)
    pickler.dump(obj)
    pickle.dump([str(i) for i in range(len(pickler.storages))], fh, protocol=2)
    for storage in pickler.storages:
        fh.write(struct.pack("<q", storage._size()))
        fh.write(torch.empty(0, dtype=torch.uint8).set_(storage._untyped_storage).numpy().tobytes())
