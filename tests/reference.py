"""A batch reference for the streaming indicators: plain Python over the whole event list, driven by the same
indicator registry, for events that are all on time."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pipeline.core.evaluate import AlertRule
from pipeline.core.indicators import REGISTRY


def indicator_values(events: list[dict[str, Any]], window_ms: int) -> dict[tuple[int, str, str, str], tuple]:
    """(window start s, tenant, channel, indicator) -> (numerator, denominator), each event id once."""
    sums: dict[tuple[int, str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen: set[str] = set()
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        start = (event["event_time"] - event["event_time"] % window_ms) // 1000
        for indicator in REGISTRY:
            observation = indicator.observe(event)
            if observation is not None:
                channel, numerator, denominator = observation
                cell = sums[(start, event["tenant"], channel, indicator.id)]
                cell[0] += numerator
                cell[1] += denominator
    return {key: (num, den) for key, (num, den) in sums.items()}


def alerts(values: dict[tuple[int, str, str, str], tuple], rules: list[AlertRule]) -> set[tuple[str, str, str, int]]:
    fired = set()
    for (start, tenant, channel, indicator), (num, den) in values.items():
        for rule in rules:
            if rule.indicator == indicator and den >= rule.min_denominator and den > 0 and rule.fires(num / den):
                fired.add((rule.name, tenant, channel, start))
    return fired
