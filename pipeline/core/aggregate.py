"""Step 4, aggregate: indicator partials per event-time tumbling window, per source partition.

Each Kafka partition keeps its own windows and watermark, so everything here is a deterministic function of
that partition's records in offset order plus a checkpoint. That is what makes replays safe:

* a window is emitted once, when the partition's watermark (max event time - allowed lateness) passes its end;
* the offset that may be committed is the first offset of the oldest still-open window, so a restart replays
  every event of every open window and rebuilds it exactly;
* the checkpoint (watermark, closed horizon) tells a restarted worker which windows are already final, so
  replayed events of those windows are recognised and not counted again;
* an event id seen before in its window is a duplicate and is not counted again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.indicators import REGISTRY, Indicator

NEVER = -(2**62)  # "no event time yet", below any real epoch milliseconds

CellKey = tuple[str, str, str]  # (tenant, channel, indicator id)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a restarted worker needs to continue a partition: where to read from, and what is final."""

    partition: int
    commit_offset: int  # the offset to commit: every open window's events come at or after it
    read_offset: int  # the offset after the last record processed
    watermark_ms: int
    closed_before_ms: int  # windows starting before this have been emitted and are final


@dataclass(frozen=True, slots=True)
class WindowCell:
    """One indicator partial of one closed window, from one partition."""

    window_start_ms: int
    window_end_ms: int
    tenant: str
    channel: str
    indicator: str
    partition: int
    numerator: float
    denominator: float


@dataclass(slots=True)
class _OpenWindow:
    first_offset: int
    event_ids: set[str] = field(default_factory=set)
    cells: dict[CellKey, list[float]] = field(default_factory=dict)


ON_TIME, LATE, DUPLICATE = 0, 1, 2


class PartitionWindows:
    """Tumbling windows of one partition."""

    def __init__(self, partition: int, window_ms: int, lateness_ms: int,
                 indicators: Iterable[Indicator] = REGISTRY, checkpoint: Checkpoint | None = None) -> None:
        self.partition = partition
        self.window_ms = window_ms
        self.lateness_ms = lateness_ms
        self.observers = [ind.observe for ind in indicators]
        self.indicator_ids = [ind.id for ind in indicators]
        self.open: dict[int, _OpenWindow] = {}
        self.watermark_ms = checkpoint.watermark_ms if checkpoint else NEVER
        self.closed_before_ms = checkpoint.closed_before_ms if checkpoint else NEVER
        self.next_offset = checkpoint.read_offset if checkpoint else 0
        self.closed: list[WindowCell] = []  # emitted since the last drain_closed()

    def add(self, events: list[dict[str, Any]], offsets: list[int]) -> list[int]:
        """Fold events (in offset order) into their windows; returns ON_TIME, LATE or DUPLICATE per event."""
        window_ms, lateness = self.window_ms, self.lateness_ms
        observers, indicator_ids = self.observers, self.indicator_ids
        open_windows = self.open
        fates = [ON_TIME] * len(events)
        next_close = min(open_windows) + window_ms if open_windows else NEVER
        for i, event in enumerate(events):
            event_time = event["event_time"]
            start = event_time - event_time % window_ms
            if start < self.closed_before_ms:
                fates[i] = LATE
            else:
                window = open_windows.get(start)
                if window is None:
                    window = open_windows[start] = _OpenWindow(first_offset=offsets[i])
                    if next_close == NEVER or start + window_ms < next_close:
                        next_close = start + window_ms
                event_id = event["event_id"]
                if event_id in window.event_ids:
                    fates[i] = DUPLICATE
                else:
                    window.event_ids.add(event_id)
                    tenant = event["tenant"]
                    cells = window.cells
                    for observe, indicator_id in zip(observers, indicator_ids, strict=True):
                        observation = observe(event)
                        if observation is not None:
                            channel, numerator, denominator = observation
                            key = (tenant, channel, indicator_id)
                            cell = cells.get(key)
                            if cell is None:
                                cells[key] = [numerator, denominator]
                            else:
                                cell[0] += numerator
                                cell[1] += denominator
            if event_time - lateness > self.watermark_ms:
                self.watermark_ms = event_time - lateness
                # Closing as soon as the watermark passes makes late/on-time independent of batching.
                if next_close != NEVER and self.watermark_ms >= next_close:
                    next_close = self._close_until(self.watermark_ms)
        if offsets:
            self.next_offset = offsets[-1] + 1
        return fates

    def advance_idle(self, watermark_ms: int) -> None:
        """Move the watermark forward without events (an idle partition), closing what it passes."""
        if watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms
            self._close_until(watermark_ms)

    def _close_until(self, watermark_ms: int) -> int:
        window_ms = self.window_ms
        for start in sorted(s for s in self.open if s + window_ms <= watermark_ms):
            window = self.open.pop(start)
            for (tenant, channel, indicator), (numerator, denominator) in window.cells.items():
                self.closed.append(WindowCell(start, start + window_ms, tenant, channel, indicator,
                                              self.partition, numerator, denominator))
        horizon = watermark_ms - watermark_ms % window_ms  # start of the first window still open
        self.closed_before_ms = max(self.closed_before_ms, horizon)
        return min(self.open) + window_ms if self.open else NEVER

    def drain_closed(self) -> list[WindowCell]:
        closed, self.closed = self.closed, []
        return closed

    def checkpoint(self) -> Checkpoint:
        """The offset to commit is held back to the oldest open window, so a restart rebuilds it whole."""
        commit = min((w.first_offset for w in self.open.values()), default=self.next_offset)
        return Checkpoint(self.partition, commit, self.next_offset, self.watermark_ms, self.closed_before_ms)
