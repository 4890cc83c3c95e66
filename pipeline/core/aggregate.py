"""Step 4, aggregate: indicator cells in event-time windows, per source partition.

Three kinds of window, all closed by the partition's watermark (max event time - allowed lateness, which acts as
the grace period):

* "1m" panes: tumbling; each counted event feeds the event indicators of its type into the cell of its pane and
  dimensions (tenant, channel, role, flow, device class). An event id seen before in its pane is a duplicate.
* "15m" hopping windows (every pane): the merge of the partition's last 15 closed panes, emitted when the pane
  that ends one closes; the last 14 closed panes are kept (and restored from storage after a restart).
* "session": per person, events without an inactivity gap, cut at fixed 4-hour boundaries of event time. A
  session is over once the closed horizon passes its end (last event + gap), so no counted event can still join
  it; its session indicators go into the cell of the minute it ended in (channel "ALL", no flow or device).

Everything is a deterministic function of the partition's records in offset order plus a checkpoint, whatever
the batches. That is what makes replays safe:

* a window is emitted once, when the closed horizon (the watermark rounded down to a pane start) passes its end;
  an event whose pane starts before the horizon is late;
* the offset that may be committed is the first offset of the oldest open pane or session, and the checkpoint
  also carries the watermark and horizon from just before that record, so a restart replays every open window
  whole and re-decides each replayed event's fate exactly as the first run did;
* the checkpoint's closed horizon tells a restarted worker which windows are already final: they are rebuilt on
  the way (sessions need their events) but not emitted again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.indicators import (
    ALL_CHANNELS,
    DIMENSIONS,
    REGISTRY,
    Indicator,
    Kind,
    SessionSummary,
    merge_sessions,
    note_in_session,
)
from pipeline.core.sketch import LOG_GAMMA, MIN_POSITIVE, ZERO_KEY, Sketch

NEVER = -(2**62)  # "no event time yet", below any real epoch milliseconds
PANE, HOPPING, SESSION = "1m", "15m", "session"
ON_TIME, LATE, DUPLICATE = 0, 1, 2

DimKey = tuple[str, str, str, str, str]  # (tenant, channel, role, flow, device_class)
CellKey = tuple[str, str, str, str, str, str]  # DimKey + indicator id
CellState = tuple[float, float, Sketch]  # (count, total, sketch)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a restarted worker needs to continue a partition: where to read from, and what is final."""

    partition: int
    commit_offset: int  # the offset to commit: every open window's events come at or after it
    read_offset: int  # the offset after the last record processed
    watermark_ms: int
    closed_before_ms: int  # windows ending at or before this have been emitted and are final
    # The watermark and closed horizon just before the record at commit_offset, so a replay from there decides
    # late / on time exactly as the first run did (None: take watermark_ms and closed_before_ms).
    replay_watermark_ms: int | None = None
    replay_closed_before_ms: int | None = None


@dataclass(frozen=True, slots=True)
class WindowCell:
    """The mergeable state of one indicator in one closed window, for one dimension combination and partition."""

    window_kind: str  # "1m" tumbling pane, "15m" hopping, "session"
    window_start_ms: int
    window_end_ms: int
    tenant: str
    channel: str  # Avro channel symbol, or "ALL" for session cells
    role: str  # "" when unknown
    flow: str  # "" when absent
    device_class: str  # "" when absent
    indicator: str
    partition: int
    count: float  # number of observations (the denominator)
    total: float  # sum of the observed values (the numerator)
    sketch: Sketch = ()  # quantile indicators: (key, count) sorted by key

    @property
    def key(self) -> CellKey:
        return (self.tenant, self.channel, self.role, self.flow, self.device_class, self.indicator)


@dataclass(slots=True)
class _Pane:
    first_offset: int
    replay: tuple[int, int]  # (watermark, horizon) before its first record
    event_ids: set[str] = field(default_factory=set)
    cells: dict[DimKey, list[list[Any] | None]] = field(default_factory=dict)  # per indicator [count, total(, {})]


@dataclass(slots=True)
class _Session:
    start: int
    last: int
    last_key: tuple[int, str]  # (event time, event id) of its last event: whose role it reports
    role: str
    end: int  # last + gap, cut at the block end: closed once the horizon reaches it
    first_offset: int
    replay: tuple[int, int]
    summary: SessionSummary


_TENANT, _PERSON, _BLOCK = 0, 1, 2


class PartitionWindows:
    """Panes, hopping windows and sessions of one partition."""

    def __init__(self, partition: int, window_ms: int, lateness_ms: int,
                 indicators: Iterable[Indicator] = REGISTRY, checkpoint: Checkpoint | None = None, *,
                 hopping_ms: int = 15 * 60_000, session_gap_ms: int = 30 * 60_000,
                 session_max_ms: int = 4 * 3_600_000, recent_panes: Iterable[WindowCell] = ()) -> None:
        if hopping_ms % window_ms or session_max_ms % window_ms:
            raise ValueError("hopping and session lengths must be whole numbers of panes")
        self.partition = partition
        self.window_ms = window_ms
        self.lateness_ms = lateness_ms
        self.hopping_ms = hopping_ms
        self.session_gap_ms = session_gap_ms
        self.session_max_ms = session_max_ms
        indicators = tuple(indicators)
        self.event_indicators = [i for i in indicators if not i.per_session]
        self.session_indicators = [i for i in indicators if i.per_session]
        for ind in self.event_indicators:
            if ind.dimensions != DIMENSIONS or ind.observe is None:
                raise ValueError(f"event indicator {ind.id} must observe events in every dimension")
        for ind in self.session_indicators:
            if ind.kind == Kind.QUANTILE:
                raise ValueError(f"session indicator {ind.id} cannot be a quantile")
        # event type -> ((slot, observe, is quantile), ...): each event calls only the observers it feeds
        dispatch: dict[str, list[tuple[int, Any, bool]]] = {}
        for slot, ind in enumerate(self.event_indicators):
            for event_type in ind.fed_by:
                dispatch.setdefault(event_type, []).append((slot, ind.observe, ind.kind == Kind.QUANTILE))
        self.dispatch = {event_type: tuple(entries) for event_type, entries in dispatch.items()}
        self.slots = len(self.event_indicators)

        self.open: dict[int, _Pane] = {}
        self.sessions: dict[tuple[str, str, int], list[_Session]] = {}  # (tenant, person, block) -> open sessions
        self.recent: dict[int, dict[CellKey, CellState]] = {}  # closed pane start -> its cells, for hopping
        if checkpoint is None:
            self._watermark = self._restored_watermark = NEVER
            self._horizon = self.final_before_ms = NEVER
            self.next_offset = 0
        else:
            self._restored_watermark = checkpoint.watermark_ms
            self.final_before_ms = checkpoint.closed_before_ms
            self._watermark = (checkpoint.watermark_ms if checkpoint.replay_watermark_ms is None
                               else checkpoint.replay_watermark_ms)
            self._horizon = (checkpoint.closed_before_ms if checkpoint.replay_closed_before_ms is None
                             else checkpoint.replay_closed_before_ms)
            self.next_offset = checkpoint.commit_offset
        for cell in recent_panes:
            if cell.window_kind == PANE and cell.partition == partition and cell.window_start_ms < self.final_before_ms:
                self.recent.setdefault(cell.window_start_ms, {})[cell.key] = (cell.count, cell.total, cell.sketch)
        self.closed: list[WindowCell] = []  # emitted since the last drain_closed()

    @property
    def watermark_ms(self) -> int:
        return max(self._watermark, self._restored_watermark)

    @property
    def closed_before_ms(self) -> int:
        """Windows ending at or before this are final (emitted, now or before a restart)."""
        return max(self._horizon, self.final_before_ms)

    def add(self, events: list[dict[str, Any]], offsets: list[int]) -> list[int]:
        """Fold events (in offset order) into their windows; returns ON_TIME, LATE or DUPLICATE per event."""
        window_ms, lateness = self.window_ms, self.lateness_ms
        dispatch, slots, no_observers = self.dispatch, self.slots, ()
        open_panes = self.open
        log, ceil = math.log, math.ceil
        add_to_session = self._add_to_session
        fates = [ON_TIME] * len(events)
        for i, event in enumerate(events):
            event_time = event["event_time"]
            start = event_time - event_time % window_ms
            if start < self._horizon:
                fates[i] = LATE
                continue  # a late event cannot move the watermark: its pane closed before it
            pane = open_panes.get(start)
            if pane is None:
                pane = open_panes[start] = _Pane(offsets[i], (self._watermark, self._horizon))
            event_id = event["event_id"]
            if event_id in pane.event_ids:
                fates[i] = DUPLICATE
            else:
                pane.event_ids.add(event_id)
                event_type = event["event_type"]
                channel = event["channel"]
                if event_type == "survey_response":
                    survey = event.get("survey")
                    if survey is not None and survey.get("about_channel"):
                        channel = survey["about_channel"]  # a survey answer counts for what it was about
                observers = dispatch.get(event_type, no_observers)
                if observers:
                    dims = (event["tenant"], channel, event.get("role") or "", event.get("flow") or "",
                            event.get("device_class") or "")
                    cells = pane.cells.get(dims)
                    if cells is None:
                        cells = pane.cells[dims] = [None] * slots
                    for slot, observe, quantile in observers:
                        value = observe(event)
                        if value is None:
                            continue
                        cell = cells[slot]
                        if quantile:
                            key = ZERO_KEY if value <= MIN_POSITIVE else ceil(log(value) / LOG_GAMMA)
                            if cell is None:
                                cells[slot] = [1.0, 0.0 + value, {key: 1}]
                            else:
                                cell[0] += 1.0
                                cell[1] += value
                                buckets = cell[2]
                                buckets[key] = buckets.get(key, 0) + 1
                        elif cell is None:
                            cells[slot] = [1.0, 0.0 + value]
                        else:
                            cell[0] += 1.0
                            cell[1] += value
                add_to_session(event, event_time, offsets[i])
            if event_time - lateness > self._watermark:
                watermark = self._watermark = event_time - lateness
                # Closing as soon as the watermark passes a pane end makes late/on-time independent of batching,
                # and the horizon a function of the watermark alone, which a replay can restore.
                if watermark - watermark % window_ms > self._horizon:
                    self._close_until(watermark)
        if offsets:
            self.next_offset = offsets[-1] + 1
        return fates

    def _add_to_session(self, event: dict[str, Any], event_time: int, offset: int) -> None:
        gap = self.session_gap_ms
        block = event_time - event_time % self.session_max_ms
        key = (event["tenant"], event["person_id"], block)
        event_key = (event_time, event["event_id"])
        role = event.get("role") or ""
        sessions = self.sessions.get(key)
        if sessions is None:
            session = self._new_session(event_time, event_key, role, block, offset)
            self.sessions[key] = [session]
        else:
            # The sessions this event falls within a gap of; one is the usual case, two are bridged by it.
            joined = [s for s in sessions if event_time - s.last < gap and s.start - event_time < gap]
            if not joined:
                session = self._new_session(event_time, event_key, role, block, offset)
                sessions.append(session)
            else:
                session = joined[0]
                for other in joined[1:]:
                    sessions.remove(other)
                    merge_sessions(session.summary, other.summary)
                    self._absorb(session, other.start, other.last, other.last_key, other.role, other.first_offset,
                                 other.replay)
                self._absorb(session, event_time, event_time, event_key, role, offset,
                             (self._watermark, self._horizon))
                session.end = min(session.last + gap, block + self.session_max_ms)
        note_in_session(session.summary, event)

    def _new_session(self, event_time: int, event_key: tuple[int, str], role: str, block: int,
                     offset: int) -> _Session:
        end = min(event_time + self.session_gap_ms, block + self.session_max_ms)
        return _Session(event_time, event_time, event_key, role, end, offset, (self._watermark, self._horizon),
                        SessionSummary())

    @staticmethod
    def _absorb(session: _Session, start: int, last: int, last_key: tuple[int, str], role: str, first_offset: int,
                replay: tuple[int, int]) -> None:
        session.start = min(session.start, start)
        session.last = max(session.last, last)
        if last_key > session.last_key:
            session.last_key, session.role = last_key, role
        if first_offset < session.first_offset:
            session.first_offset, session.replay = first_offset, replay

    def advance_idle(self, watermark_ms: int) -> None:
        """Move the watermark forward without events (an idle partition), closing what it passes."""
        if watermark_ms > self._watermark:
            self._watermark = watermark_ms
            self._close_until(watermark_ms)

    def _close_until(self, watermark_ms: int) -> None:
        window_ms, partition, final = self.window_ms, self.partition, self.final_before_ms
        previous = self._horizon
        closing = sorted(s for s in self.open if s + window_ms <= watermark_ms)
        for start in closing:
            pane = self.open.pop(start)
            if start + window_ms <= final:
                continue  # emitted before a restart; the stored copy is in self.recent
            state: dict[CellKey, CellState] = {}
            for (tenant, channel, role, flow, device), cells in pane.cells.items():
                for indicator, cell in zip(self.event_indicators, cells, strict=True):
                    if cell is None:
                        continue
                    sketch = tuple(sorted(cell[2].items())) if len(cell) == 3 else ()
                    state[(tenant, channel, role, flow, device, indicator.id)] = (cell[0], cell[1], sketch)
                    self.closed.append(WindowCell(PANE, start, start + window_ms, tenant, channel, role, flow,
                                                  device, indicator.id, partition, cell[0], cell[1], sketch))
            self.recent[start] = state
        horizon = watermark_ms - watermark_ms % window_ms  # start of the first pane still open
        if horizon > self._horizon:
            self._horizon = horizon
            self._emit_hopping(previous, horizon)
            self._close_sessions(horizon)

    def _emit_hopping(self, previous: int, horizon: int) -> None:
        """Hopping windows ending in (previous, horizon]: merges of the closed panes they cover."""
        window_ms, hopping_ms, final = self.window_ms, self.hopping_ms, self.final_before_ms
        ends = sorted({start + k * window_ms for start in self.recent for k in range(1, hopping_ms // window_ms + 1)
                       if previous < start + k * window_ms <= horizon and start + k * window_ms > final})
        for end in ends:
            merged: dict[CellKey, list[Any]] = {}
            for start in sorted(s for s in self.recent if end - hopping_ms <= s < end):
                for key, (count, total, sketch) in self.recent[start].items():
                    acc = merged.get(key)
                    if acc is None:
                        merged[key] = acc = [0.0, 0.0, {}]
                    acc[0] += count
                    acc[1] += total
                    buckets = acc[2]
                    for bucket, n in sketch:
                        buckets[bucket] = buckets.get(bucket, 0) + n
            for (tenant, channel, role, flow, device, indicator), (count, total, buckets) in merged.items():
                self.closed.append(WindowCell(HOPPING, end - hopping_ms, end, tenant, channel, role, flow, device,
                                              indicator, self.partition, count, total,
                                              tuple(sorted(buckets.items()))))
        keep_from = horizon - hopping_ms + window_ms  # panes a window ending after the horizon still covers
        for start in [s for s in self.recent if s < keep_from]:
            del self.recent[start]

    def _close_sessions(self, horizon: int) -> None:
        """Sessions whose end the horizon reached: no counted event can join them any more."""
        window_ms, final = self.window_ms, self.final_before_ms
        buckets: dict[tuple[int, str, str, str], list[float]] = {}
        for key in list(self.sessions):
            sessions = self.sessions[key]
            still_open = [s for s in sessions if s.end > horizon]
            if len(still_open) == len(sessions):
                continue
            for session in sessions:
                if session.end > horizon:
                    continue
                bucket = (session.end - 1) - (session.end - 1) % window_ms  # the minute the session ended in
                if bucket + window_ms <= final:
                    continue  # emitted before a restart
                for indicator in self.session_indicators:
                    for value in indicator.observe_session(session.summary):  # type: ignore[misc]
                        acc = buckets.get((bucket, key[_TENANT], session.role, indicator.id))
                        if acc is None:
                            buckets[(bucket, key[_TENANT], session.role, indicator.id)] = [1.0, 0.0 + value]
                        else:
                            acc[0] += 1.0
                            acc[1] += value
            if still_open:
                self.sessions[key] = still_open
            else:
                del self.sessions[key]
        for (bucket, tenant, role, indicator), (count, total) in sorted(buckets.items()):
            self.closed.append(WindowCell(SESSION, bucket, bucket + window_ms, tenant, ALL_CHANNELS, role, "", "",
                                          indicator, self.partition, count, total))

    def drain_closed(self) -> list[WindowCell]:
        closed, self.closed = self.closed, []
        return closed

    def checkpoint(self) -> Checkpoint:
        """The offset to commit is held back to the oldest open pane or session, so a restart rebuilds it whole."""
        commit, replay = self.next_offset, (self._watermark, self._horizon)
        for pane in self.open.values():
            if pane.first_offset < commit:
                commit, replay = pane.first_offset, pane.replay
        for sessions in self.sessions.values():
            for session in sessions:
                if session.first_offset < commit:
                    commit, replay = session.first_offset, session.replay
        return Checkpoint(self.partition, commit, self.next_offset, self.watermark_ms, self.closed_before_ms,
                          replay[0], replay[1])
