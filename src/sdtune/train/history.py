"""The record of a whole run across resumes: the loss at every optimizer step and the saves made.

A run stopped and resumed is still one run: its loss plot, its history file and its summary cover
every step from 1, with the global step numbers, and every save of every part. The record travels in
the training state (`history.json`, written with the rest of the state, so it is exactly as old as
the weights beside it) and is continued by the run that resumes that state.

Steps the record cannot cover are named, never invented: a state saved before the record existed
(an earlier sdtune) has no history, and `--initial_step N` counts from N without training steps
1..N. Such a range is kept as a gap with its reason; the plot shows what is known and the summary
says what is not, in one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sdtune.train.state import HISTORY_FILE as FILE, resolve_state_dir

FORMAT = 1


@dataclass
class RunHistory:
    """What the parts before this one recorded, and where this part starts (its first step is start + 1)."""

    start: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float | None] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)  # {"from": a, "to": b, "why": text}: steps a..b unrecorded
    earlier_seconds: float | None = 0.0  # training time of the earlier parts; None when not recorded

    @classmethod
    def begin(cls, start: int, state_dir: str | Path | None = None, initial_flag: str | None = None) -> "RunHistory":
        """The history a run continues: the one saved in `state_dir` (a resume), cut at `start`
        (--initial_step may count from an earlier step than the state's); steps up to `start` that
        nothing recorded become a gap, its reason the flag that set the start or the state's age."""
        history = cls(start=start)
        saved, problem = read(state_dir) if state_dir is not None else (None, None)
        if saved is not None:
            kept = [(s, v) for s, v in zip(saved["steps"], saved["losses"]) if s <= start]
            history.steps, history.losses = [s for s, _ in kept], [v for _, v in kept]
            history.outputs = list(saved["outputs"])
            history.gaps = [{**g, "to": min(g["to"], start)} for g in saved["gaps"] if g["from"] <= start]
            history.earlier_seconds = saved["seconds"]
        elif state_dir is not None:
            history.earlier_seconds = None
        last = max([history.steps[-1] if history.steps else 0] + [g["to"] for g in history.gaps])
        if last < start:
            if initial_flag:
                why = f"{initial_flag} counts from step {start}; this run did not train them"
            else:
                why = (f"the resumed state's {FILE} cannot be read ({problem})" if problem else
                       f"the resumed state has no {FILE} (saved by an earlier sdtune)")
                why += ", so their losses and saves are unknown"
            history.gaps.append({"from": last + 1, "to": start, "why": why})
        return history

    def record(self, losses: Sequence[float], outputs: Sequence[str | Path], seconds: float) -> dict[str, Any]:
        """The whole run so far as JSON-able data: the earlier parts, then this part's `losses` (one per
        optimizer step from start + 1), its `outputs` and its `seconds` of training."""
        steps = self.steps + list(range(self.start + 1, self.start + 1 + len(losses)))
        values = self.losses + [_finite(v) for v in losses]
        total = None if self.earlier_seconds is None else round(self.earlier_seconds + float(seconds), 3)
        saves = list(dict.fromkeys(self.outputs + [str(p) for p in outputs]))  # a save redone is listed once
        return {"format": FORMAT, "steps": steps, "losses": values, "outputs": saves,
                "gaps": [dict(g) for g in self.gaps], "seconds": total}

    def note(self) -> str | None:
        """One line naming the steps this run's record lacks, or None when it covers every step."""
        if not self.gaps:
            return None
        parts = [(f"steps {g['from']}-{g['to']}" if g["to"] > g["from"] else f"step {g['from']}") + f": {g['why']}"
                 for g in self.gaps]
        return "not in the loss plot, history and summary (which show the recorded steps): " + "; ".join(parts)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def read(state_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the history saved in a state folder, None) — or (None, why it is unusable); (None, None) when
    the state has none. A damaged history never stops a resume: the weights beside it are intact."""
    path = resolve_state_dir(state_dir) / FILE
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return _checked(record), None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _checked(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} history")
    steps, losses, outputs = record["steps"], record["losses"], record["outputs"]
    gaps, seconds = record.get("gaps", []), record.get("seconds")
    if not (isinstance(steps, list) and isinstance(losses, list) and len(steps) == len(losses)):
        raise ValueError("steps and losses do not pair up")
    if any(type(s) is not int for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps are not increasing whole numbers")
    if any(v is not None and not isinstance(v, (int, float)) for v in losses):
        raise ValueError("a loss is not a number")
    if not isinstance(outputs, list) or any(not isinstance(p, str) for p in outputs):
        raise ValueError("outputs are not a list of paths")
    if not isinstance(gaps, list) or any(not isinstance(g, dict) or type(g.get("from")) is not int
                                         or type(g.get("to")) is not int for g in gaps):
        raise ValueError("gaps are not ranges of steps")
    if seconds is not None and not isinstance(seconds, (int, float)):
        raise ValueError("seconds is not a number")
    return {"steps": steps, "losses": [None if v is None else float(v) for v in losses], "outputs": outputs,
            "gaps": [{"from": g["from"], "to": g["to"], "why": str(g.get("why", ""))} for g in gaps],
            "seconds": None if seconds is None else float(seconds)}
