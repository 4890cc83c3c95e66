"""Step 5, evaluate: alert rules over closed windows. A window is judged once it is closed on every partition
this worker reads, so its value covers all of the worker's traffic for that minute."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.core.aggregate import WindowCell
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


class AlertEvaluator:
    def __init__(self, rules: Iterable[AlertRule]) -> None:
        self.rules = list(rules)
        self._by_indicator: dict[str, list[AlertRule]] = {}
        for rule in self.rules:
            self._by_indicator.setdefault(rule.indicator, []).append(rule)
        # window start -> (tenant, channel, indicator) -> [numerator, denominator, window end]
        self._pending: dict[int, dict[tuple[str, str, str], list[float]]] = {}

    def add(self, cells: Iterable[WindowCell]) -> None:
        for cell in cells:
            if cell.indicator not in self._by_indicator:
                continue
            window = self._pending.setdefault(cell.window_start_ms, {})
            acc = window.setdefault((cell.tenant, cell.channel, cell.indicator),
                                    [0.0, 0.0, float(cell.window_end_ms)])
            acc[0] += cell.numerator
            acc[1] += cell.denominator

    def evaluate(self, closed_before_ms: int) -> list[Alert]:
        """Judge every pending window that starts before the horizon closed on all partitions."""
        alerts: list[Alert] = []
        for start in sorted(s for s in self._pending if s < closed_before_ms):
            for (tenant, channel, indicator_id), (num, den, end) in self._pending.pop(start).items():
                for rule in self._by_indicator[indicator_id]:
                    if den < rule.min_denominator or den <= 0:
                        continue
                    value = num / den
                    if not rule.fires(value):
                        continue
                    indicator = BY_ID[indicator_id]
                    alerts.append(Alert(
                        alert_id=f"{rule.name}/{tenant}/{channel}/{start}",
                        rule=rule.name, indicator=indicator_id, family=indicator.family.value,
                        severity=rule.severity, tenant=tenant, channel=channel, window_start_ms=start,
                        window_end_ms=int(end), value=value, threshold=rule.threshold,
                        comparison=rule.comparison, numerator=num, denominator=den,
                        message=(f"{indicator.family.value} {indicator.name} {value:.1%} is "
                                 f"{rule.comparison} {rule.threshold:.1%} on {channel} for {tenant} in "
                                 f"{_clock(start)}-{_clock(int(end))[-5:]} UTC ({num:.0f} of {den:.0f})"),
                    ))
        return alerts
