"""Which training target the options ask for.

Kept apart from target.py: the targets import their base class from there, so the choice among
them (which imports each target) cannot live in the same module without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdtune.train.options import TrainOptions
    from sdtune.train.target import TrainingTarget


def target_for(opts: "TrainOptions") -> "TrainingTarget":
    """Hypernetwork training with --hypernetwork_module, else full fine-tuning."""
    if opts.hypernetwork_module:
        from sdtune.train.hypernetwork import HypernetworkTarget

        return HypernetworkTarget(opts)
    from sdtune.train.target import FullFineTune

    return FullFineTune(opts)
