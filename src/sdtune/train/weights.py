"""The one place that touches trained weights across processes.

Data-parallel training (today) keeps a whole replica on every process behind a DDP wrapper; sharded
training (DeepSpeed ZeRO-3, FSDP) keeps a slice on each. Everything that reads the weights for
something other than the training step itself comes through here: unwrapping, a full view for
saving and checksums, and "the main process does this while the others wait" for saving, validation
and sampling. Sharded engines change this class, not the trainer, the targets or the savers.

Under DeepSpeed (train/zero.py) the trained modules go into one engine, since accelerate runs a single
DeepSpeed model (sd-scripts does the same); frozen parts never reach it. The training step calls each
through the engine (`EngineCall`), so DeepSpeed sees every forward it must hook; everything else
reads the modules themselves. Under ZeRO-3 no process holds a whole module, so `on_main` and
`checksums` first gather the full weights on every process (a collective), keeping them whole while
the main process saves or runs its forward passes alone. FSDP2 (train/fsdp.py) is prepared the same
way, its one sharded module called through `FSDPCall`; there `gathered()` all-gathers the weights into
whole, plain copies of the trained modules, which `full` hands out instead of the sharded modules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

from sdtune.errors import UserError


class Weights:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.world = accelerator.num_processes
        kind = accelerator.distributed_type
        self.deepspeed = getattr(kind, "value", str(kind)) == "DEEPSPEED"
        self.fsdp = getattr(kind, "value", str(kind)) == "FSDP"
        self.engine = None  # the DeepSpeedEngine, or FSDP's sharded module, once prepared
        self._whole = False  # inside `gathered()`
        self._copies: list = []  # under FSDP inside `gathered()`: whole copies of the trained modules

    @property
    def zero3(self) -> bool:
        return self.deepspeed and self.engine is not None and self.engine.zero_optimization_partition_weights()

    @property
    def sharded(self) -> bool:
        """Whether no process holds the whole trained weights between `gathered()` blocks."""
        return self.zero3 or (self.fsdp and self.engine is not None)

    def prepare(self, *objects):
        """Hand modules (first), optimizer and schedule to the engine (wrapping or sharding them)."""
        if not (self.deepspeed or self.fsdp):
            return self.accelerator.prepare(*objects)
        import torch

        count = sum(isinstance(o, torch.nn.Module) for o in objects)
        modules, others = objects[:count], objects[count:]
        if any(isinstance(o, torch.nn.Module) for o in others):
            raise TypeError("Weights.prepare takes the modules first")
        # one call with the optimizer: ZeRO needs them together, and FSDP re-points it to the shards
        self.engine, *prepared = self.accelerator.prepare(EngineModules(modules), *others)
        call = FSDPCall if self.fsdp else EngineCall
        return (*[call(self.engine, i, m) for i, m in enumerate(modules)], *prepared)

    def zero3_split(self) -> str:
        """Under ZeRO-3, how much of the trained weights DeepSpeed splits over the processes: tensors
        of up to stage3_param_persistence_threshold weights (100,000 by default: norms, biases) stay
        whole on every process. DeepSpeed marks them on the parameters (`ds_persist`, `ds_numel`)."""
        params = list(self.engine.module.parameters())
        split = [p for p in params if not p.ds_persist]
        weights, total = sum(p.ds_numel for p in split), sum(p.ds_numel for p in params)
        return (f"ZeRO-3: {len(split)} of {len(params)} trained weight tensors ({weights / total:.2%} of "
                f"{total:,} weights) split over {self.world} processes; the other {len(params) - len(split)}, "
                f"of up to {self.engine.zero_param_persistence_threshold():,} weights each, whole on each")

    def unwrap(self, module):
        """The module inside its engine wrapper (DDP, compile, DeepSpeed), for a forward pass on one process.

        Not accelerate's `unwrap_model`: whenever DeepSpeed is installed, that imports it to test for a
        wrapper that never reaches it here (`EngineCall` holds the engine's modules): ~0.5 s in every
        run, and a DeepSpeed warning on the terminal of a machine without a GPU."""
        from sdtune.text.encode import unwrap_module

        if isinstance(module, EngineCall):
            return module.module
        return unwrap_module(module)

    def autocast(self):
        """The forward pass's precision context. accelerate leaves it to DeepSpeed, which casts the
        weights but not the inputs, so under DeepSpeed torch's autocast is used directly."""
        precision = str(self.accelerator.mixed_precision)
        if self.deepspeed and precision in ("fp16", "bf16"):
            import torch

            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def full(self, module) -> Iterator[Any]:
        """The unwrapped module with every weight present, for reading (saving, sampling, checksums).

        With replicas (and ZeRO-1/2) every process already holds them all; under ZeRO-3 they are
        whole only inside `gathered()`, which `on_main` and `checksums` enter on every process.
        """
        if self.sharded and not self._whole:
            raise RuntimeError("sharded weights (ZeRO-3, FSDP) are read whole inside Weights.gathered() only")
        yield self._copies[module._index] if isinstance(module, FSDPCall) else self.unwrap(module)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every trained weight whole on every process for the block (ZeRO-3, FSDP; elsewhere nothing to do).

        A collective: all processes enter it. ZeRO-3's module hooks are lifted meanwhile, so that a
        forward pass on the main process alone (validation, samples) is plain torch: with them it
        would shard the weights again after each layer and wait for the other processes at the next.
        """
        if not self.sharded or self._whole:
            yield
            return
        if self.fsdp:
            from sdtune.train import fsdp

            self._copies, self._whole = fsdp.whole_copies(self.engine, self.device), True
            try:
                yield
            finally:
                self._whole, self._copies = False, []
            return
        import deepspeed
        from deepspeed.runtime.zero import parameter_offload

        offload = self.engine.optimizer.parameter_offload
        # the gathers DeepSpeed started ahead for the next training step are finished and released first
        self.engine.empty_partition_cache()
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
            offload._remove_module_hooks()
            self._whole = True
            try:
                yield
            finally:
                self._whole = False
                offload.forward_hooks, offload.backward_hooks = [], []
                offload.setup_zero_stage3_hooks()  # DeepSpeed re-records its trace at the next step
                stack = parameter_offload.FWD_MODULE_STACK
                if stack.count(offload.module) > 1:  # setup pushed the module once more
                    stack.remove(offload.module)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` on the main process while the others wait; a failure stops every process.

        A failure on the main process alone (a full disk while saving) would otherwise leave the
        others waiting at the next collective until its timeout instead of stopping with it. Returns
        `work()`'s value on the main process, None elsewhere.
        """
        self.accelerator.wait_for_everyone()
        failure, result = None, None
        with self.gathered():
            try:
                if self.is_main:
                    result = work()
            except Exception as exc:  # raised on every process below, so that none waits for the main one
                failure = exc
        raise_together(failure, self.accelerator)
        return result

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any of them (a collective: all must call it)."""
        return any_process(flag, self.accelerator)

    def checksums(self, modules: Sequence) -> list[float]:
        """Every process's sum of the modules' weights (in float64), gathered: replicas must agree."""
        import torch

        with torch.no_grad(), self.gathered():
            total = torch.zeros((), dtype=torch.float64)
            for module in modules:
                with self.full(module) as m:
                    total = total + sum(p.detach().double().sum().cpu() for p in m.parameters())
        return self.accelerator.gather(total.reshape(1).to(self.device)).tolist()


def EngineModules(modules):  # noqa: N802  (builds a module; a class made here to keep torch out of imports)
    """One module holding every trained module, for the single DeepSpeed engine; its forward runs the
    `index`-th of them."""
    import torch

    class _Trained(torch.nn.Module):
        # FSDP's transformer-based wrapping reads the layer classes not to split from the model it shards
        # (only those present: a CLIP text model lists its vision layers too, and accelerate refuses absent ones)
        _no_split_modules = sorted({name for m in modules for name in getattr(m, "_no_split_modules", None) or ()}
                                   & {type(layer).__name__ for m in modules for layer in m.modules()})

        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(modules)

        def forward(self, index: int, *args, **kwargs):
            return self.parts[index](*args, **kwargs)

    return _Trained()


class EngineCall:
    """A trained module as the training step calls it: through the DeepSpeed engine, which hooks the
    forward's output for its backward pass; every attribute is the module's own."""

    def __init__(self, engine, index: int, module):
        self._engine, self._index, self.module = engine, index, module

    def __call__(self, *args, **kwargs):
        return self._engine(self._index, *args, **kwargs)

    def __getattr__(self, name: str):  # only for names the proxy itself does not have
        if name in ("_engine", "_index", "module"):
            raise AttributeError(name)
        return getattr(self.module, name)


class FSDPCall(EngineCall):
    """A trained module as the training step calls it under FSDP: through the one sharded module,
    whose hooks gather the weights for the forward and reduce the gradients after the backward."""

    def set_requires_gradient_sync(self, requires: bool) -> None:  # accelerate's no_sync under FSDP2
        self._engine.set_requires_gradient_sync(requires)


def raise_together(error: BaseException | None, accelerator) -> None:
    """Raise on every process when any process failed; a barrier otherwise."""
    if any_process(error is not None, accelerator) and error is None:
        error = UserError("another process failed (its message is above); this one stops with it")
    if error is not None:
        raise error


def any_process(flag: bool, accelerator) -> bool:
    """True on every process when `flag` is true on any of them (a collective: all must call it)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="max").item())
