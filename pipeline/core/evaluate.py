"""Step 5, evaluate: alert rules over closed windows. A window is judged once it is closed on every partition
this worker reads, from the totals of all of those partitions' cells (so a restart judges it whole too). A rule
judges one window kind ("1m" by default) per (tenant, channel, indicator): cells are summed over role, flow and
device class, their sketches merged."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pipeline.core.indicators import BY_ID, Kind
from pipeline.core.sketch import Sketch, merge, quantile

WINDOW_KINDS = ("1m", "15m", "session")


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    indicator: str
    comparison: str  # "above" or "below"
    threshold: float
    min_denominator: float
    severity: str
    window_kind: str = "1m"  # "1m" pane, "15m" hopping, or "session" (session indicators)

    def __post_init__(self) -> None:
        if self.indicator not in BY_ID:
            raise ValueError(f"alert rule {self.name!r} names unknown indicator {self.indicator!r}; "
                             f"known: {', '.join(sorted(BY_ID))}")
        if self.comparison not in ("above", "below"):
            raise ValueError(f"alert rule {self.name!r}: comparison must be 'above' or 'below'")
        if self.window_kind not in BY_ID[self.indicator].windows:
            raise ValueError(f"alert rule {self.name!r}: {self.indicator} is computed in "
                             f"{', '.join(BY_ID[self.indicator].windows)} windows, not {self.window_kind!r}")

    def fires(self, value: float) -> bool:
        return value > self.threshold if self.comparison == "above" else value < self.threshold


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


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str  # deterministic, so a replay rewrites the same alert instead of adding one
    rule: str
    indicator: str
    family: str
    severity: str
    tenant: str
    channel: str
    window_start_ms: int
    window_end_ms: int
    value: float
    threshold: float
    comparison: str
    numerator: float
    denominator: float
    message: str
    window_kind: str = "1m"


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _shown(value: float, unit: str) -> str:
    return f"{value:.1%}" if unit == "ratio" else f"{value:,.1f} {unit}"


def judge(rules: Iterable[AlertRule], totals: Iterable[WindowTotal]) -> list[Alert]:
    """The alerts that closed windows raise."""
    by_indicator: dict[tuple[str, str], list[AlertRule]] = {}
    for rule in rules:
        by_indicator.setdefault((rule.window_kind, rule.indicator), []).append(rule)
    alerts: list[Alert] = []
    for total in sorted(totals, key=lambda t: (t.window_kind, t.window_start_ms, t.tenant, t.channel, t.indicator)):
        num, den = total.numerator, total.denominator
        for rule in by_indicator.get((total.window_kind, total.indicator), ()):
            if den <= 0 or den < rule.min_denominator:
                continue
            value = total.value
            if value is None or not rule.fires(value):
                continue
            indicator = BY_ID[total.indicator]
            start, end = total.window_start_ms, total.window_end_ms
            kind = "" if rule.window_kind == "1m" else f"{rule.window_kind}/"
            alerts.append(Alert(
                alert_id=f"{rule.name}/{total.tenant}/{total.channel}/{kind}{start}",
                rule=rule.name, indicator=total.indicator, family=indicator.family.value, severity=rule.severity,
                tenant=total.tenant, channel=total.channel, window_start_ms=start, window_end_ms=end,
                value=value, threshold=rule.threshold, comparison=rule.comparison, numerator=num,
                denominator=den,
                message=(f"{indicator.family.value} {indicator.name} {_shown(value, indicator.unit)} is "
                         f"{rule.comparison} {_shown(rule.threshold, indicator.unit)} on {total.channel} for "
                         f"{total.tenant} in "
                         f"{_clock(start)}-{_clock(end)[-5:]} UTC ({num:.0f} of {den:.0f})"),
                window_kind=rule.window_kind,
            ))
    return alerts


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
