"""Exponential moving average of the trained U-Net's weights.

Written here rather than taken from diffusers' `EMAModel` because that class updates its shadow
weights in place against the live parameters, so it cannot keep them on the CPU while the model
trains on a GPU (`--ema_cpu`, the usual way to afford EMA on a 12 GB card), and its default decay
warm-up changes the meaning of `--ema_decay`. The update is the textbook one:
ema = decay * ema + (1 - decay) * param, every `update_every` optimizer steps.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, update_every: int = 1, device: str | None = None):
        self.decay = decay
        self.update_every = update_every
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().to(device or params[n].device, dtype=torch.float32, copy=True)
                       for n in self.names]
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        if step % self.update_every:
            return
        params = dict(module.named_parameters())
        live = [params[n].detach() for n in self.names]
        if live and live[0].device != self.shadow[0].device:
            live = [p.to(self.shadow[0].device, non_blocking=True) for p in live]
        live = [p.float() for p in live]
        # With update_every > 1 the average skips steps; the decay is per update, as configured.
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, value in zip(self.names, self.shadow):
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
        self.updates = updates
