"""Step 5, evaluate: alert rules over closed windows. A window is judged once it is closed on every partition
this worker reads, from the totals of all of those partitions' rows (so a restart judges it whole too)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.core.indicators import BY_ID


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    indicator: str
    comparison: str  # "above" or "below"
    threshold: float
    min_denominator: float
    severity: str

    def __post_init__(self) -> None:
        if self.indicator not in BY_ID:
            raise ValueError(f"alert rule {self.name!r} names unknown indicator {self.indicator!r}; "
                             f"known: {', '.join(sorted(BY_ID))}")
        if self.comparison not in ("above", "below"):
            raise ValueError(f"alert rule {self.name!r}: comparison must be 'above' or 'below'")

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
    numerator: float
    denominator: float


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


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def judge(rules: Iterable[AlertRule], totals: Iterable[WindowTotal]) -> list[Alert]:
    """The alerts that closed windows raise."""
    by_indicator: dict[str, list[AlertRule]] = {}
    for rule in rules:
        by_indicator.setdefault(rule.indicator, []).append(rule)
    alerts: list[Alert] = []
    for total in sorted(totals, key=lambda t: (t.window_start_ms, t.tenant, t.channel, t.indicator)):
        num, den = total.numerator, total.denominator
        for rule in by_indicator.get(total.indicator, ()):
            if den <= 0 or den < rule.min_denominator:
                continue
            value = num / den
            if not rule.fires(value):
                continue
            indicator = BY_ID[total.indicator]
            start, end = total.window_start_ms, total.window_end_ms
            alerts.append(Alert(
                alert_id=f"{rule.name}/{total.tenant}/{total.channel}/{start}",
                rule=rule.name, indicator=total.indicator, family=indicator.family.value, severity=rule.severity,
                tenant=total.tenant, channel=total.channel, window_start_ms=start, window_end_ms=end,
                value=value, threshold=rule.threshold, comparison=rule.comparison, numerator=num,
                denominator=den,
                message=(f"{indicator.family.value} {indicator.name} {value:.1%} is {rule.comparison} "
                         f"{rule.threshold:.1%} on {total.channel} for {total.tenant} in "
                         f"{_clock(start)}-{_clock(end)[-5:]} UTC ({num:.0f} of {den:.0f})"),
            ))
    return alerts


def totals_of(cells: Iterable[object]) -> list[WindowTotal]:
    """Sum per-partition window cells (anything with the WindowCell fields) into window totals."""
    sums: dict[tuple[int, int, str, str, str], list[float]] = {}
    for c in cells:
        key = (c.window_start_ms, c.window_end_ms, c.tenant, c.channel, c.indicator)  # type: ignore[attr-defined]
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += c.numerator  # type: ignore[attr-defined]
        acc[1] += c.denominator  # type: ignore[attr-defined]
    return [WindowTotal(*key, num, den) for key, (num, den) in sums.items()]
