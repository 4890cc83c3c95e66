"""The console's overview per tenant: where a tenant stands on UX (the product) against CX (the journey), each
axis built from several indicators, and confidence intervals for rates. Plain Python, no I/O.

Each axis indicator has a "bad" and a "good" level; its health is where its pooled value lies between them
(0 at or beyond bad, 1 at or beyond good, linear in between). An axis is the mean health of its indicators that
have at least `min_count` observations, so one thin indicator cannot swing it. The quadrant splits at 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.core.indicators import BY_ID


@dataclass(frozen=True, slots=True)
class AxisIndicator:
    indicator: str
    bad: float  # health 0 at or beyond this value
    good: float  # health 1 at or beyond this value (below bad when lower is better)


# UX: does the product work, is it quick. CX: the journey as the person lived it, support included.
UX_AXIS: tuple[AxisIndicator, ...] = (
    AxisIndicator("task_success_rate", bad=0.80, good=0.95),
    AxisIndicator("error_rate", bad=0.15, good=0.02),
    AxisIndicator("apdex", bad=0.50, good=0.85),
    AxisIndicator("lcp_good_share", bad=0.50, good=0.90),
)
CX_AXIS: tuple[AxisIndicator, ...] = (
    AxisIndicator("csat", bad=0.60, good=0.85),
    AxisIndicator("nps", bad=0.0, good=40.0),
    AxisIndicator("ces_easy_share", bad=0.50, good=0.80),
    AxisIndicator("fcr", bad=0.60, good=0.85),
    AxisIndicator("escalation_rate", bad=0.20, good=0.05),
)
SPLIT = 0.5


@dataclass(frozen=True, slots=True)
class IndicatorHealth:
    indicator: str
    family: str
    value: float
    count: float
    bad: float
    good: float
    health: float


@dataclass(frozen=True, slots=True)
class TenantPosition:
    tenant: str
    ux: float | None  # None: no UX indicator had enough observations
    cx: float | None
    ux_indicators: tuple[IndicatorHealth, ...]
    cx_indicators: tuple[IndicatorHealth, ...]

    @property
    def quadrant(self) -> str:
        if self.ux is None or self.cx is None:
            return "not enough data"
        ux = "good UX" if self.ux >= SPLIT else "bad UX"
        cx = "good CX" if self.cx >= SPLIT else "bad CX"
        return f"{ux}, {cx}"


def health(value: float, bad: float, good: float) -> float:
    """0 at or beyond bad, 1 at or beyond good, linear in between (either direction)."""
    share = (value - bad) / (good - bad)
    return min(1.0, max(0.0, share))


def _axis(axis: Sequence[AxisIndicator], pooled: Mapping[str, tuple[float, float]],
          min_count: float) -> tuple[float | None, tuple[IndicatorHealth, ...]]:
    parts = []
    for item in axis:
        total, count = pooled.get(item.indicator, (0.0, 0.0))
        if count < min_count or count <= 0:
            continue
        value = total / count
        parts.append(IndicatorHealth(item.indicator, BY_ID[item.indicator].family.value, value, count, item.bad,
                                     item.good, health(value, item.bad, item.good)))
    if not parts:
        return None, ()
    return sum(p.health for p in parts) / len(parts), tuple(parts)


def position(tenant: str, pooled: Mapping[str, tuple[float, float]], min_count: float = 10) -> TenantPosition:
    """A tenant's place from its pooled (total, count) per indicator (sums over channels and windows)."""
    ux, ux_parts = _axis(UX_AXIS, pooled, min_count)
    cx, cx_parts = _axis(CX_AXIS, pooled, min_count)
    return TenantPosition(tenant, ux, cx, ux_parts, cx_parts)


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a rate (successes out of n); None when n is 0. Sound for small n and for
    rates near 0 or 1, where the normal approximation is not."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
