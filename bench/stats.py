"""Percentiles, and figures that are the median of repetitions shown with their min-max."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass
class Figure:
    """One measured quantity: one value per repetition."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def median(self) -> float:
        clean = [v for v in self.values if not math.isnan(v)]
        return float(statistics.median(clean)) if clean else math.nan

    @property
    def low(self) -> float:
        clean = [v for v in self.values if not math.isnan(v)]
        return min(clean) if clean else math.nan

    @property
    def high(self) -> float:
        clean = [v for v in self.values if not math.isnan(v)]
        return max(clean) if clean else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": _finite(self.median),
            "min": _finite(self.low),
            "max": _finite(self.high),
            "values": [_finite(v) for v in self.values],
        }


def ratio(num: Figure, den: Figure) -> Figure:
    """Per-repetition ratios when both have the same repetitions, else the ratio of medians."""
    if len(num.values) == len(den.values) and num.values:
        return Figure([_div(a, b) for a, b in zip(num.values, den.values, strict=True)])
    return Figure([_div(num.median, den.median)])


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 6)
