"""A batch reference for the streaming indicators: plain Python over whole event lists, driven by the same
indicator registry, written the obvious way (group, sort, sum) rather than incrementally.

* `counted` decides which events of a partition's stream count (on time, first of their id in their pane) from
  the stated lateness rule;
* `cells` computes every cell of every window kind from the counted events of each partition: panes by grouping,
  hopping windows by merging the panes they cover, sessions by sorting each person's events in time and cutting
  at inactivity gaps and 4-hour boundaries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.core.alerting import AlertEngine, parse_rules
from pipeline.core.evaluate import WindowTotal
from pipeline.core.indicators import ALL_CHANNELS, REGISTRY, Indicator, SessionSummary, channel_of, note_in_session
from pipeline.core.sketch import Sketch, merge, of_values

Event = dict[str, Any]
# (window kind, start ms, end ms, partition, tenant, channel, role, flow, device class, indicator)
CellId = tuple[str, int, int, int, str, str, str, str, str, str]
CellValue = tuple[float, float, Sketch]  # (count, total, sketch)


def counted(events: Sequence[Event], window_ms: int, lateness_ms: int) -> list[bool]:
    """Per event of one partition (offset order): does it count? Late: the watermark (max event time - lateness
    so far) already passed the end of its pane. Duplicate: its id already counted in its pane."""
    watermark = -(2**62)
    seen: dict[int, set[str]] = defaultdict(set)
    result = []
    for event in events:
        t = event["event_time"]
        start = t - t % window_ms
        if start + window_ms <= watermark:  # its pane closed: the watermark passed its end
            result.append(False)
            continue
        result.append(event["event_id"] not in seen[start])
        seen[start].add(event["event_id"])
        watermark = max(watermark, t - lateness_ms)
    return result


def _pane_cells(partition: int, events: Sequence[Event], window_ms: int,
                indicators: Sequence[Indicator]) -> tuple[dict[CellId, CellValue], dict[CellId, list[float]]]:
    values: dict[CellId, list[float]] = defaultdict(list)
    for event in events:
        t = event["event_time"]
        start = t - t % window_ms
        for indicator in indicators:
            if indicator.observe is None or event["event_type"] not in indicator.fed_by:
                continue
            value = indicator.observe(event)
            if value is not None:
                values[("1m", start, start + window_ms, partition, event["tenant"], channel_of(event),
                        event["role"] or "", event["flow"] or "", event["device_class"] or "",
                        indicator.id)].append(value)
    kinds = {i.id: i.kind for i in indicators}
    cells = {}
    for cell_id, observed in values.items():
        total = 0.0
        for value in observed:  # in offset order, as the stream adds them
            total += value
        sketch = of_values(observed) if kinds[cell_id[-1]] == "quantile" else ()
        cells[cell_id] = (float(len(observed)), total, sketch)
    return cells, values


def _hopping_cells(panes: dict[CellId, CellValue], window_ms: int, hopping_ms: int) -> dict[CellId, CellValue]:
    by_start: dict[int, list[tuple[CellId, CellValue]]] = defaultdict(list)
    for cell_id, value in panes.items():
        by_start[cell_id[1]].append((cell_id, value))
    ends = {start + k * window_ms for start in by_start for k in range(1, hopping_ms // window_ms + 1)}
    cells: dict[CellId, CellValue] = {}
    for end in ends:
        merged: dict[tuple, list[Any]] = {}
        for start in sorted(s for s in by_start if end - hopping_ms <= s < end):
            for cell_id, (count, total, sketch) in by_start[start]:
                acc = merged.setdefault(cell_id[3:], [0.0, 0.0, []])
                acc[0] += count
                acc[1] += total
                acc[2].append(sketch)
        for rest, (count, total, sketches) in merged.items():
            cells[("15m", end - hopping_ms, end, *rest)] = (count, total, merge(*sketches))
    return cells


def sessions(events: Sequence[Event], gap_ms: int, max_ms: int) -> list[tuple[int, str, str, SessionSummary]]:
    """(end, tenant, role at the last event, summary) of every per-person session in the events."""
    by_person: dict[tuple[str, str, int], list[Event]] = defaultdict(list)
    for event in events:
        t = event["event_time"]
        by_person[(event["tenant"], event["person_id"], t - t % max_ms)].append(event)
    found = []
    for (tenant, _, block), person_events in by_person.items():
        ordered = sorted(person_events, key=lambda e: (e["event_time"], e["event_id"]))
        group: list[Event] = []
        for event in [*ordered, None]:
            if group and (event is None or event["event_time"] - group[-1]["event_time"] >= gap_ms):
                summary = SessionSummary()
                for member in group:
                    note_in_session(summary, member)
                end = min(group[-1]["event_time"] + gap_ms, block + max_ms)
                found.append((end, tenant, group[-1]["role"] or "", summary))
                group = []
            if event is not None:
                group.append(event)
    return found


def _session_cells(partition: int, events: Sequence[Event], window_ms: int, gap_ms: int, max_ms: int,
                   indicators: Sequence[Indicator]) -> dict[CellId, CellValue]:
    sums: dict[CellId, list[float]] = {}
    for end, tenant, role, summary in sessions(events, gap_ms, max_ms):
        bucket = (end - 1) - (end - 1) % window_ms
        for indicator in indicators:
            if indicator.observe_session is None:
                continue
            for value in indicator.observe_session(summary):
                acc = sums.setdefault(("session", bucket, bucket + window_ms, partition, tenant, ALL_CHANNELS, role,
                                       "", "", indicator.id), [0.0, 0.0])
                acc[0] += 1.0
                acc[1] += value
    return {cell_id: (count, total, ()) for cell_id, (count, total) in sums.items()}


def cells(counted_events: Mapping[int, Sequence[Event]], *, window_ms: int, hopping_ms: int, session_gap_ms: int,
          session_max_ms: int, indicators: Sequence[Indicator] = REGISTRY) -> dict[CellId, CellValue]:
    """Every cell of every window kind, from each partition's counted events (in offset order)."""
    out: dict[CellId, CellValue] = {}
    for partition, events in counted_events.items():
        panes, _ = _pane_cells(partition, events, window_ms, indicators)
        out.update(panes)
        out.update(_hopping_cells(panes, window_ms, hopping_ms))
        out.update(_session_cells(partition, events, window_ms, session_gap_ms, session_max_ms, indicators))
    return out


def observed_values(counted_events: Mapping[int, Sequence[Event]], *, window_ms: int, hopping_ms: int,
                    indicators: Sequence[Indicator] = REGISTRY) -> dict[CellId, list[float]]:
    """The raw values behind each quantile cell ("1m" and "15m"), to compare sketch quantiles with exact ones."""
    out: dict[CellId, list[float]] = {}
    quantiles = {i.id for i in indicators if i.kind == "quantile"}
    for partition, events in counted_events.items():
        _, values = _pane_cells(partition, events, window_ms, indicators)
        for cell_id, observed in values.items():
            if cell_id[-1] not in quantiles:
                continue
            out[cell_id] = observed
            start = cell_id[1]
            for k in range(hopping_ms // window_ms):
                end = start + window_ms + k * window_ms
                out.setdefault(("15m", end - hopping_ms, end, *cell_id[3:]), []).extend(observed)
    return out


def indicator_values(events: list[Event], window_ms: int) -> dict[tuple[int, str, str, str], tuple]:
    """(window start s, tenant, channel, indicator) -> (total, count) of "1m" windows, summed over roles, flows,
    device classes and partitions; each event id once, all events on time."""
    sums: dict[tuple[int, str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen: set[str] = set()
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        start = (event["event_time"] - event["event_time"] % window_ms) // 1000
        for indicator in REGISTRY:
            if indicator.observe is None or event["event_type"] not in indicator.fed_by:
                continue
            value = indicator.observe(event)
            if value is not None:
                cell = sums[(start, event["tenant"], channel_of(event), indicator.id)]
                cell[0] += value
                cell[1] += 1.0
    return {key: (num, den) for key, (num, den) in sums.items()}


def firing_series(values: dict[tuple[int, str, str, str], tuple], rules: Sequence[Mapping[str, Any]],
                  window_ms: int, until_ms: int) -> set[tuple[str, str, str]]:
    """(rule, tenant, channel) of every threshold rule's series that reaches `for_windows` breaching windows of
    its tenant and channel (ending by `until_ms`) with no judged, non-breaching window in between: when the
    alerter must have fired it. Written from the rules' text, not with the engine."""
    fired = set()
    for rule in rules:
        assert rule["kind"] == "threshold", "the batch reference reads threshold rules only"
        series: dict[tuple[str, str], list[tuple[int, float, float]]] = defaultdict(list)
        for (start_s, tenant, channel, indicator), (num, den) in values.items():
            if indicator == rule["indicator"] and start_s * 1000 + window_ms <= until_ms:
                series[(tenant, channel)].append((start_s, num, den))
        for (tenant, channel), windows in series.items():
            run = 0
            for _start, num, den in sorted(windows):
                if den < rule.get("min_count", 20) or den <= 0:
                    continue  # too few observations: not judged, the run goes on
                value = num / den
                breaking = value > rule["threshold"] if rule["comparison"] == "above" else value < rule["threshold"]
                run = run + 1 if breaking else 0
                if run >= rule.get("for_windows", 1):
                    fired.add((rule["name"], tenant, channel))
    return fired


def alert_transitions(values: dict[tuple[int, str, str, str], tuple], rules: Sequence[Mapping[str, Any]],
                      window_ms: int, until_ms: int) -> set[tuple[str, str, str, str, str, int]]:
    """(rule, tenant, channel, from, to, window end) of every transition the core's alert engine makes over the
    batch 1-minute totals, window by window up to `until_ms`: what the alerter must write reading the store."""
    engine = AlertEngine(parse_rules(rules), {"1m": window_ms, "session": window_ms, "15m": 15 * window_ms})
    by_end: dict[int, list[WindowTotal]] = defaultdict(list)
    for (start_s, tenant, channel, indicator), (num, den) in values.items():
        start = start_s * 1000  # indicator_values keys windows by their start in seconds
        by_end[start + window_ms].append(WindowTotal(start, start + window_ms, tenant, channel, indicator, num, den))
    out = set()
    for end in range(min(by_end), until_ms + 1, window_ms) if by_end else ():
        for event in engine.judge(end, by_end.get(end, []), now_ms=end):
            out.add((event.rule, event.tenant, event.channel, event.from_state, event.to_state, event.window_end_ms))
    return out
