"""One result row of the benchmark suite, and the goal arithmetic shared by every measure.

A row compares our path with a baseline measured in the same script: `ratio` is ours / baseline
for "higher is better" measures and our cost / baseline cost for "lower is better" ones; `goal`
says which (`>= x` or `<= x`).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

_GOAL = re.compile(r"^\s*(>=|<=)\s*([0-9.]+)\s*(%|x)?\s*$")


@dataclass
class Row:
    """measure, ours, baseline, ratio, goal, met — plus what bounds it when the goal is missed."""

    measure: str
    ours: str
    baseline: str
    ratio: Optional[float]
    goal: str
    value: Optional[float] = None  # the number the goal is checked against (ratio unless said otherwise)
    bound: str = ""  # what limits the number and what would close the gap (shown when the goal is missed)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> Optional[bool]:
        """Whether the goal is met; None when nothing was measured."""
        checked = self.ratio if self.value is None else self.value
        match = _GOAL.match(self.goal)
        if checked is None or match is None:
            return None
        op, number, unit = match.groups()
        target = float(number) / (100 if unit == "%" else 1)
        return checked >= target if op == ">=" else checked <= target

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        return out


def median(values: Sequence[float]) -> float:
    """Median of repetitions (raises on an empty list: a measure without repetitions is a bug)."""
    if not values:
        raise ValueError("no repetitions to take the median of")
    return statistics.median(values)


def met_text(met: Optional[bool]) -> str:
    return {True: "yes", False: "no", None: "n/a"}[met]
