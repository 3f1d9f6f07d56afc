"""--torch_compile / --dynamo_backend: the U-Net's forward (and so its backward) compiled by torch.compile.

The module is compiled in place (`nn.Module.compile`): it stays the same object with the same
parameter names, so saving, resuming, EMA and data-parallel wrapping see the plain module.
(accelerate's own dynamo support wraps the module instead, which changes its state-dict keys.)

Recompilation across buckets stays bounded: dynamo compiles the first shape it sees as static and,
on the first different shape (another bucket's latent size or a smaller last batch), recompiles once
with those dimensions dynamic, so every later bucket reuses that graph; torch's recompile limit (8
per function) caps the worst case, past which the forward runs uncompiled.
"""

from __future__ import annotations

from typing import Any, Callable

from sdtune.errors import UserError

DEFAULT_BACKEND = "inductor"
# sd-scripts' choices for --dynamo_backend
BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
            "onnxrt", "tensort", "ipex", "tvm")


def check_options(torch_compile: bool, dynamo_backend: str | None) -> None:
    """Option validation (no torch import here)."""
    if dynamo_backend is not None and not torch_compile:
        raise UserError("a dynamo backend is used only when compiling", where="--dynamo_backend",
                        fix="Add --torch_compile, or drop --dynamo_backend.")


# backends that torch names but that need a package of their own
_PACKAGES = {"tvm": "tvm", "ipex": "intel_extension_for_pytorch", "fx2trt": "torch_tensorrt",
             "tensort": "torch_tensorrt", "onnxrt": "onnxruntime"}


def compile_in_place(module: Any, backend: str | None, note: Callable[[str], None]) -> None:
    import torch._dynamo

    backend = backend or DEFAULT_BACKEND
    if not _usable(backend):
        available = ", ".join(b for b in BACKENDS if _usable(b))
        raise UserError(f"the dynamo backend {backend!r} is not available in this torch installation",
                        where="--dynamo_backend", fix=f"Use one of: {available}.")
    if backend == "inductor" and not torch.cuda.is_available():
        _need_compiler()
    module.compile(backend=backend)
    note(f"the U-Net is compiled with torch.compile (backend {backend}); the first steps include the compilation")


def _usable(backend: str) -> bool:
    import importlib.util

    import torch
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return False
    if backend == "cudagraphs" and not torch.cuda.is_available():
        return False
    package = _PACKAGES.get(backend)
    return package is None or importlib.util.find_spec(package) is not None


def _need_compiler() -> None:
    """Inductor writes C++ on the CPU: without a compiler it would fail at the first step, deep in a trace."""
    import shutil

    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError("inductor needs a C++ compiler on the CPU and none was found", where="--dynamo_backend",
                        fix="Install g++ (e.g. apt-get install g++), or use --dynamo_backend aot_eager.")
