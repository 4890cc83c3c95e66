"""Step 5, evaluate: the totals alert rules judge. Cells of one window are summed over partitions, roles, flows
and device classes per (tenant, channel, indicator), their sketches merged. The rules themselves live in
pipeline/core/alerting.py and are applied by `touchpoint alerter` (workers only store cells)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pipeline.core.indicators import BY_ID, Kind
from pipeline.core.sketch import Sketch, merge, quantile


@dataclass(frozen=True, slots=True)
class WindowTotal:
    """One indicator of one window, summed over the partitions that judge it."""

    window_start_ms: int
    window_end_ms: int
    tenant: str
    channel: str
    indicator: str
    numerator: float  # sum of the cells' totals
    denominator: float  # sum of the cells' counts
    window_kind: str = "1m"
    sketch: Sketch = ()  # merged sketch of a quantile indicator

    @property
    def value(self) -> float | None:
        indicator = BY_ID[self.indicator]
        if indicator.kind == Kind.QUANTILE and self.sketch:
            return quantile(self.sketch, indicator.q)
        return self.numerator / self.denominator if self.denominator > 0 else None


class _Cell(Protocol):
    window_kind: str
    window_start_ms: int
    window_end_ms: int
    tenant: str
    channel: str
    indicator: str
    count: float
    total: float
    sketch: Sketch


def totals_of(cells: Iterable[_Cell], window_kind: str | None = "1m") -> list[WindowTotal]:
    """Sum cells (of one window kind, or all with None) over partitions, roles, flows and device classes into
    window totals per (window, tenant, channel, indicator)."""
    sums: dict[tuple[int, int, str, str, str, str], tuple[list[float], list[Sketch]]] = {}
    for c in cells:
        if window_kind is not None and c.window_kind != window_kind:
            continue
        key = (c.window_start_ms, c.window_end_ms, c.tenant, c.channel, c.indicator, c.window_kind)
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = ([0.0, 0.0], [])
        acc[0][0] += c.total
        acc[0][1] += c.count
        if c.sketch:
            acc[1].append(c.sketch)
    return [WindowTotal(start, end, tenant, channel, indicator, num, den, kind, merge(*sketches) if sketches else ())
            for (start, end, tenant, channel, indicator, kind), ((num, den), sketches) in sums.items()]
