"""Counting live tensor memory as tensors are allocated and freed (for bench/memory.py and tests).

`LiveBytes` is a TorchDispatchMode: every tensor an operation returns has its storage counted once
(views share their base's storage) until the storage is freed, so `peak` is the most tensor memory
alive at any moment, what an accelerator's caching allocator must hold at the least. Under
`FakeTensorMode` the same count needs no memory and little time, which is how the bench counts a
real-size U-Net step on a small machine. Not counted: kernels' private workspaces (cuDNN, cuBLAS,
flash attention scratch) and the allocator's rounding and fragmentation.

    with FakeTensorMode():
        unet = UNet2DConditionModel.from_config(config)
        counter = LiveBytes()
        counter.track(unet.parameters())
        with counter:
            step()
        print(counter.peak, counter.live)
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages, by storage, with optional named marks."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.marks: dict[str, int] = {}
        # id of a storage -> (weak reference, token); token -> counted bytes. Tokens, not ids, key the
        # bytes: a storage freed late (by the garbage collector) must not release a newer one that
        # took its id.
        self._by_id: dict[int, tuple[weakref.ref, int]] = {}
        self._bytes: dict[int, int] = {}
        self._tokens = itertools.count()

    def track(self, tensors: Iterable[Any]) -> None:
        """Count tensors that exist already (parameters, buffers, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._count(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def mark(self, name: str) -> None:
        """Remember the peak so far under `name` and start a new one (phases of a step)."""
        self.marks[name] = self.peak
        self.peak = self.live

    def _count(self, t: torch.Tensor) -> None:
        if t.layout != torch.strided:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes = storage.nbytes()
        entry = self._by_id.get(id(storage))
        if entry is not None and entry[0]() is storage:
            token = entry[1]
            old = self._bytes[token]
            if old == nbytes:
                return
            self._bytes[token] = nbytes  # a storage resized in place (out= kernels)
            self.live += nbytes - old
        else:
            token = next(self._tokens)
            self._bytes[token] = nbytes
            self._by_id[id(storage)] = (weakref.ref(storage), token)
            weakref.finalize(storage, self._free, token)
            self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, token: int) -> None:
        self.live -= self._bytes.pop(token, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args):
            # a fake tensor has no value; control flow that reads one (Adafactor's RMS, the 8-bit
            # quantization map) takes a plausible one, the memory does not depend on it
            return _PLAUSIBLE.get(args[0].dtype, 1.0)
        if func.namespace == "bitsandbytes" and not func._schema.returns and _is_fake(args):
            return None  # in-place optimizer kernels without a fake implementation: no allocation
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


_PLAUSIBLE = {torch.bool: True, torch.int64: 1, torch.int32: 1, torch.uint8: 1}


def _is_fake(args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in tree_leaves(args))


def tensors_of(*objects: Any) -> list[torch.Tensor]:
    """Every tensor of modules (parameters, gradients, buffers) and optimizers (state)."""
    found: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found.append(p)
                if p.grad is not None:
                    found.append(p.grad)
            found.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            found.extend(t for s in obj.state.values() for t in tree_leaves(s) if isinstance(t, torch.Tensor))
    return found


# ---------------------------------------------------------------- CUDA's autocast rules, anywhere

class CudaAutocast(torch.overrides.TorchFunctionMode):
    """bf16 autocast with CUDA's rules on any device (CPU autocast keeps norms in bf16, CUDA's
    runs them in float32), so a count made on the CPU matches what a GPU step keeps alive:
    matrix products and convolutions in bf16 (a leaf weight cast once and the copy cached until
    the region ends, as autocast does), norms, softmax and losses in float32."""

    import torch.nn.functional as _F

    LOW = {_F.conv1d, _F.conv2d, _F.conv3d, _F.linear, _F.scaled_dot_product_attention, torch.matmul, torch.bmm,
           torch.baddbmm, torch.addmm, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
           torch.Tensor.baddbmm}
    FP32 = {_F.group_norm, _F.layer_norm, _F.softmax, _F.log_softmax, torch.softmax, torch.Tensor.softmax,
            _F.mse_loss, _F.l1_loss, _F.smooth_l1_loss, _F.huber_loss, torch.exp, torch.Tensor.exp, torch.pow,
            torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.log}

    def __init__(self, dtype=torch.bfloat16, cache: bool = True):
        super().__init__()
        self.dtype = dtype
        self.cache = cache  # off for the backward pass: checkpointed recomputation caches nothing
        self._cache: dict[int, torch.Tensor] = {}

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        if self.cache and x.is_leaf and x.requires_grad:
            cached = self._cache.get(id(x))
            if cached is None or cached.dtype != dtype:
                cached = self._cache[id(x)] = x.to(dtype)
            return cached
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.LOW else torch.float32 if func in self.FP32 else None
        if target is not None:
            args = [self._cast(a, target) for a in args]
            kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# ---------------------------------------------------------------- one training step, counted

@dataclass(frozen=True)
class StepOptions:
    """What changes the memory of a U-Net training step (names as the command line's)."""

    name: str
    mixed_precision: str = "no"  # "no" | "bf16"
    full_bf16: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()
    batch_size: int = 1
    resolution: int = 512
    max_grad_norm: float = 1.0


def count_training_step(unet: torch.nn.Module, opts: StepOptions, optimizers: list[str] | None = None, *,
                        context_dim: int = 768, context_len: int = 77, gpu_like: bool = True,
                        chunking: dict | None = None) -> dict[str, dict[str, int]]:
    """Peak live bytes of a training step of `unet` as sdtune's loop runs it: bf16 weights,
    autocast, backward, gradient clipping, the optimizer step (with stochastic rounding for bf16
    weights), gradients freed.

    The forward and backward passes run once, without optimizer state (its bytes are a constant
    added to both); then each optimizer in `optimizers` (default: `opts.optimizer`) makes a first
    step, which creates its state, and a counted one. Returns, per optimizer, {"weights", "state",
    "forward", "backward", "step", "peak"}: the bytes of the weights and of the optimizer state, and
    the peak of each phase. With `gpu_like`, autocast follows CUDA's rules and AdamW runs its
    multi-tensor (foreach) path, as on a GPU."""
    from sdtune.model import denoise

    mixed = opts.mixed_precision == "bf16"
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing(_checkpoint_function(mixed and gpu_like))
    if opts.full_bf16:  # as unet.to(bfloat16), which cannot swap fake parameters
        for t in [*unet.parameters(), *unet.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(torch.bfloat16)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    counter = LiveBytes()
    counter.track(tensors_of(unet))
    weights = counter.live
    side = opts.resolution // 8
    with counter:
        latents = torch.randn(opts.batch_size, unet.config.in_channels, side, side)
        cond = torch.randn(opts.batch_size, context_len, context_dim)
        timesteps = torch.randint(0, 1000, (opts.batch_size,))
        counter.reset_peak()
        with _autocast(mixed, gpu_like, cache=True):
            pred = denoise(unet, latents, timesteps, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), latents.float())
        del pred
        counter.mark("forward")
        with _autocast(mixed, gpu_like, cache=False):
            loss.backward()
        del loss, latents, cond, timesteps
        counter.mark("backward")
        for p in params:
            p.grad = None
    results = {}
    for name in optimizers or [opts.optimizer]:
        state, step = _count_optimizer_step(unet, params, opts, name, counter, gpu_like, chunking or {})
        marks = counter.marks
        results[name] = {"weights": weights, "state": state, "forward": marks["forward"] + state,
                         "backward": marks["backward"] + state, "step": step}
        results[name]["peak"] = max(results[name][k] for k in ("forward", "backward", "step"))
    return results


def _count_optimizer_step(unet, params, opts: StepOptions, name: str, counter: LiveBytes, gpu_like: bool,
                          chunking: dict) -> tuple[int, int]:
    """(bytes of the optimizer state, peak of a step over a full set of gradients)."""
    import gc

    from sdtune.train import optim

    gc.collect()  # an earlier optimizer still in a reference cycle must not be counted in this one's step
    with counter:  # built inside: bitsandbytes reads values while building its quantization maps
        args = list(opts.optimizer_args)
        if gpu_like and name in ("AdamW", "Adam"):
            args.append("foreach=True")
        optimizer = optim.build_optimizer(name, [{"params": params, "lr": 1e-5}], 1e-5, args, note=None)
        if opts.full_bf16:
            optim.add_bf16_stochastic_rounding(optimizer, torch.Generator().manual_seed(0), **chunking)
        for _ in range(2):  # the first step creates the state
            for p in params:
                p.grad = torch.zeros_like(p)
            counter.reset_peak()
            if opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step = counter.peak
        state = sum(t.untyped_storage().nbytes() for t in tensors_of(optimizer))
        del optimizer
        # --full_bf16's chunked step is a method bound to its optimizer (a reference cycle): freed
        # only by the collector, which would otherwise run at a random point of the next count
        gc.collect()
    return state, step


def _autocast(mixed: bool, gpu_like: bool, cache: bool):
    import contextlib

    if not mixed:
        return contextlib.nullcontext()
    if gpu_like:
        return CudaAutocast(torch.bfloat16, cache=cache)
    return torch.autocast("cpu", torch.bfloat16, cache_enabled=cache)


def _checkpoint_function(cuda_autocast: bool):
    """diffusers' checkpointing, with the recomputation under the same emulated autocast as the
    forward pass (real autocast is restored by torch's checkpoint itself; a function mode is not)."""
    import contextlib
    import functools

    from torch.utils.checkpoint import checkpoint

    if not cuda_autocast:
        return functools.partial(checkpoint, use_reentrant=False)

    def context():
        return contextlib.nullcontext(), CudaAutocast(torch.bfloat16, cache=False)

    return functools.partial(checkpoint, use_reentrant=False, context_fn=context)
