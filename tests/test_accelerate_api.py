"""sdtune uses accelerate through its public API; what reaches into its internals lives in
sdtune/train/accel.py alone, so that an accelerate upgrade has one file to check."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "sdtune"
ALLOWED = SRC / "train" / "accel.py"
PUBLIC_MODULES = {"accelerate", "accelerate.utils"}
# the objects through which accelerate's internals are reached: the accelerator, its state
# singletons, and the gradient scaler it holds
HOLDERS = ("accelerat", "state", "scaler")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _uses_of_internals(text: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "accelerate":
            if node.module not in PUBLIC_MODULES:
                found.append(f"{where}: imports from {node.module}")
            found += [f"{where}: imports {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names
                      if a.name.startswith("accelerate.") and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value).lower()
            if any(h in owner for h in HOLDERS):
                found.append(f"{where}: {ast.unparse(node)}")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and "accelerator" in ast.unparse(t.value).lower():
                    found.append(f"{where}: assigns {ast.unparse(t)}")
    return found


def test_accelerate_internals_are_reached_only_in_accel_module():
    found = [use for path in sorted(SRC.rglob("*.py")) if path != ALLOWED
             for use in _uses_of_internals(path.read_text(), str(path.relative_to(SRC.parent)))]
    assert not found, "accelerate internals used outside sdtune/train/accel.py:\n" + "\n".join(found)


def test_the_check_sees_what_it_looks_for():
    """The scan finds each kind of poke it forbids (so that an empty result above means something)."""
    code = ("from accelerate.state import AcceleratorState\nAcceleratorState._reset_state()\n"
            "accelerator.step = 3\naccelerator.scaler._unscale_grads_ = None\n")
    found = _uses_of_internals(code, "probe.py")
    assert len(found) == 5, found  # the import, _reset_state, the step assignment, and _unscale_grads_ twice


def test_micro_batch_steps_the_prepared_optimizer_only_when_it_closes_the_step():
    from accelerate import Accelerator

    from sdtune.train.accel import fresh_accelerator_state, micro_batch

    fresh_accelerator_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    x = torch.tensor([[1.0, 2.0]])
    seen = []
    for closes in (False, True):
        with micro_batch(accelerator, [model], closes):
            accelerator.backward(model(x).sum())
            optimizer.step()
            optimizer.zero_grad()
        seen.append(model.weight.detach().clone())
    # a micro-batch that does not close the step leaves the weights alone; the closing one applies the
    # two accumulated gradients, each x / 3 (backward divides by the accumulation steps): 1 - 2 * x / 3
    assert torch.equal(seen[0], torch.ones(1, 2))
    torch.testing.assert_close(seen[1], torch.tensor([[1 - 2 / 3, 1 - 4 / 3]]))
    fresh_accelerator_state()
