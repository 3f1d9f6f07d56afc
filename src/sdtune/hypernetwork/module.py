"""The hypernetwork as torch modules, built layer by layer as the web UI builds it.

`HypernetworkModule` is one residual MLP, y = x + f(x) * multiplier, whose layers sit in a
`Sequential` named `linear`, so that its `state_dict()` has exactly the file's `linear.N.*` keys.
`Hypernetwork` holds one K and one V module per width, in the order the file lists the widths
(that order is also the order of the parameters, and so of the optimizer state).
"""

from __future__ import annotations

import torch
from torch import nn

from sdtune.hypernetwork.spec import ACTIVATION_CLASSES, FileInfo, Structure


def _activation(name: str) -> nn.Module:
    return getattr(nn, ACTIVATION_CLASSES[name])()


class HypernetworkModule(nn.Module):
    """One residual MLP for contexts of width `width`; `structure` fixes its layers."""

    def __init__(self, width: int, structure: Structure):
        super().__init__()
        self.width = width
        layers: list[nn.Module] = []
        for kind, args in structure.layer_plan(width):
            if kind == "linear":
                layers.append(nn.Linear(*args))
            elif kind == "activation":
                layers.append(_activation(args[0]))
            elif kind == "layer_norm":
                layers.append(nn.LayerNorm(args[0]))
            else:
                layers.append(nn.Dropout(p=args[0]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        # the web UI's order of operations (f(x) scaled, then added), so results match it bit for bit
        return x + self.linear(x) * multiplier


class Hypernetwork(nn.Module):
    """The K/V module pairs of one hypernetwork, with its structure, file metadata and multiplier.

    `multiplier` scales every module's change of the context (the web UI's `<hypernet:name:m>`,
    ComfyUI's strength); 0 leaves the model exactly as it is without the hypernetwork.
    """

    def __init__(self, widths, structure: Structure | None = None, info: FileInfo | None = None,
                 multiplier: float = 1.0):
        super().__init__()
        self.structure = structure or Structure()
        self.info = info or FileInfo()
        self.multiplier = float(multiplier)
        self.widths = tuple(int(w) for w in widths)
        self.pairs = nn.ModuleDict({
            str(w): nn.ModuleList([HypernetworkModule(w, self.structure), HypernetworkModule(w, self.structure)])
            for w in self.widths})

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        found = self.pairs[str(width)] if str(width) in self.pairs else None
        return (found[0], found[1]) if found is not None else None

    def context_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._transform(context, 0)

    def context_v(self, context: torch.Tensor) -> torch.Tensor:
        return self._transform(context, 1)

    def _transform(self, context: torch.Tensor, which: int) -> torch.Tensor:
        key = str(context.shape[-1])
        if self.multiplier == 0 or key not in self.pairs:
            return context
        module = self.pairs[key][which]
        dtype = module.linear[0].weight.dtype
        return module(context.to(dtype), self.multiplier).to(context.dtype)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initialize(self, generator: torch.Generator | None = None) -> Hypernetwork:
        """Draw fresh weights by the structure's `weight_initialization` (the web UI's schemes)."""
        init = self.structure.weight_initialization
        nonlinearity = "leaky_relu" if self.structure.activation_func == "leakyrelu" else "relu"
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    # the web UI draws LayerNorm scales like Normal weights under every scheme
                    nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
                    module.bias.zero_()
                elif isinstance(module, nn.Linear):
                    _init_linear(module.weight, init, nonlinearity, generator)
                    module.bias.zero_()
        return self


def _init_linear(weight: torch.Tensor, init: str, nonlinearity: str, generator) -> None:
    if init == "Normal":
        nn.init.normal_(weight, 0.0, 0.01, generator=generator)
    elif init == "XavierUniform":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif init == "XavierNormal":
        nn.init.xavier_normal_(weight, generator=generator)
    elif init == "KaimingUniform":
        nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity, generator=generator)
    else:
        nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)


def new_hypernetwork(widths, structure: Structure, name: str = "", seed: int | None = None) -> Hypernetwork:
    """A freshly initialised hypernetwork (float32, CPU); with `seed`, the same weights every time."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return Hypernetwork(widths, structure, FileInfo(name=name)).initialize(generator)
