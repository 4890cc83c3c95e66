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
    CONTACT_TYPES,
    DIMENSIONS,
    GROUPS,
    PRODUCT_INTERACTIONS,
    REGISTRY,
    Indicator,
    Kind,
    SessionSummary,
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
    # per dimensions: (counts, totals, sketch buckets), each indexed by indicator slot
    cells: dict[DimKey, tuple[list[float], list[float], list[dict[int, int] | None]]] = field(default_factory=dict)


class _Session:
    """One open session of one person, kept compact: few container objects, so that the garbage collector,
    which walks every live container on full collections, stays cheap with many open sessions."""

    __slots__ = ("channels", "crashed", "end", "first_offset", "issues", "last", "last_id", "outcomes", "product",
                 "replay_horizon", "replay_watermark", "role", "start")

    def __init__(self, event_time: int, event_id: str, role: str, end: int, first_offset: int, replay_watermark: int,
                 replay_horizon: int) -> None:
        self.start = self.last = event_time
        self.last_id = event_id  # with last: the last event, whose role the session reports
        self.role = role
        self.end = end  # last + gap, cut at the block end: closed once the horizon reaches it
        self.first_offset = first_offset
        self.replay_watermark, self.replay_horizon = replay_watermark, replay_horizon
        self.channels = 0  # bit set of channel numbers
        self.issues: dict[str, int] | None = None  # journey_id -> contacts
        self.outcomes: list[tuple[int, str, bool]] | None = None  # (time, event id, ok) of product results
        self.crashed = self.product = False

    def absorb(self, other: _Session) -> None:
        """Take in another open session of the person that an event bridges to this one."""
        self.start = min(self.start, other.start)
        if (other.last, other.last_id) > (self.last, self.last_id):
            self.last, self.last_id, self.role = other.last, other.last_id, other.role
        if other.first_offset < self.first_offset:
            self.first_offset = other.first_offset
            self.replay_watermark, self.replay_horizon = other.replay_watermark, other.replay_horizon
        self.channels |= other.channels
        if other.issues:
            issues = self.issues if self.issues is not None else {}
            for journey, n in other.issues.items():
                issues[journey] = issues.get(journey, 0) + n
            self.issues = issues
        if other.outcomes:
            self.outcomes = (self.outcomes or []) + other.outcomes
        self.crashed = self.crashed or other.crashed
        self.product = self.product or other.product

    def summary(self, channel_names: list[str]) -> SessionSummary:
        return SessionSummary(
            channels={name for bit, name in enumerate(channel_names) if self.channels >> bit & 1},
            issues=dict(self.issues or {}), outcomes=list(self.outcomes or ()), crashed=self.crashed,
            product=self.product,
        )


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
        # event type -> ((slot, observe, is quantile), ...): each event calls only the observers it feeds; a group's
        # members share one observer: (slots, observe, quantile flags) in group_dispatch
        dispatch: dict[str, list[tuple[int, Any, bool]]] = {}
        group_dispatch: dict[str, list[tuple[tuple[int | None, ...], Any, tuple[bool, ...]]]] = {}
        slot_of = {ind.id: slot for slot, ind in enumerate(self.event_indicators)}
        for slot, ind in enumerate(self.event_indicators):
            if ind.group:
                continue
            for event_type in ind.fed_by:
                dispatch.setdefault(event_type, []).append((slot, ind.observe, ind.kind == Kind.QUANTILE))
        for group in sorted({ind.group for ind in self.event_indicators if ind.group}):
            members, observe = GROUPS[group]
            present = [ind for ind in self.event_indicators if ind.group == group]
            slots = tuple(slot_of.get(member) for member in members)
            quantiles = tuple(member in slot_of and self.event_indicators[slot_of[member]].kind == Kind.QUANTILE
                              for member in members)
            for event_type in sorted({t for ind in present for t in ind.fed_by}):
                group_dispatch.setdefault(event_type, []).append((slots, observe, quantiles))
        # event type -> ((slot, observe) of ratios and means, (slot, observe) of quantiles)
        self.dispatch = {event_type: (tuple((slot, observe) for slot, observe, quantile in entries if not quantile),
                                      tuple((slot, observe) for slot, observe, quantile in entries if quantile))
                         for event_type, entries in dispatch.items()}
        self.group_dispatch = {event_type: tuple(entries) for event_type, entries in group_dispatch.items()}
        self.slots = len(self.event_indicators)

        self.open: dict[int, _Pane] = {}
        # (tenant, person, block) -> its open session, or its open sessions when more than one
        self.sessions: dict[tuple[str, str, int], _Session | list[_Session]] = {}
        self.channel_bits: dict[str, int] = {}
        self.channel_names: list[str] = []
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

    def add(self, events: list[dict[str, Any]], offsets: list[int]) -> list[int]:  # noqa: C901 (the hot loop, inlined)
        """Fold events (in offset order) into their windows; returns ON_TIME, LATE or DUPLICATE per event."""
        window_ms, lateness = self.window_ms, self.lateness_ms
        dispatch, group_dispatch, slots, no_observers = self.dispatch, self.group_dispatch, self.slots, ((), ())
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
                plain, quantiles = dispatch.get(event_type, no_observers)
                groups = group_dispatch.get(event_type, ())
                if plain or quantiles or groups:
                    dims = (event["tenant"], channel, event.get("role") or "", event.get("flow") or "",
                            event.get("device_class") or "")
                    cells = pane.cells.get(dims)
                    if cells is None:
                        cells = pane.cells[dims] = ([0.0] * slots, [0.0] * slots, [None] * slots)
                    counts, totals, sketches = cells
                    for slot, observe in plain:  # count 0 marks a cell without observations
                        value = observe(event)
                        if value is not None:
                            counts[slot] += 1.0
                            totals[slot] += value
                    for slot, observe in quantiles:
                        value = observe(event)
                        if value is not None:
                            counts[slot] += 1.0
                            totals[slot] += value
                            key = ZERO_KEY if value <= MIN_POSITIVE else ceil(log(value) / LOG_GAMMA)
                            buckets = sketches[slot]
                            if buckets is None:
                                sketches[slot] = {key: 1}
                            else:
                                buckets[key] = buckets.get(key, 0) + 1
                    for group_slots, observe_group, is_quantile in groups:
                        group_values = observe_group(event)
                        if group_values is None:
                            continue
                        for slot, value, quantile in zip(group_slots, group_values, is_quantile, strict=True):
                            if value is None or slot is None:
                                continue
                            counts[slot] += 1.0
                            totals[slot] += value
                            if quantile:
                                key = ZERO_KEY if value <= MIN_POSITIVE else ceil(log(value) / LOG_GAMMA)
                                buckets = sketches[slot]
                                if buckets is None:
                                    sketches[slot] = {key: 1}
                                else:
                                    buckets[key] = buckets.get(key, 0) + 1
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
        """The person's open session within a gap of the event takes it (two such sessions are bridged by it and
        become one); otherwise it starts a new session. Mirrors indicators.note_in_session on compact state."""
        gap = self.session_gap_ms
        block = event_time - event_time % self.session_max_ms
        key = (event["tenant"], event["person_id"], block)
        event_id = event["event_id"]
        found = self.sessions.get(key)
        if type(found) is _Session and event_time - found.last < gap and found.start - event_time < gap:
            session = found  # the usual case: the person's one open session goes on
            if event_time < session.start:
                session.start = event_time
            if event_time > session.last or (event_time == session.last and event_id > session.last_id):
                session.last, session.last_id, session.role = event_time, event_id, event.get("role") or ""
                end = event_time + gap
                session.end = end if end < block + self.session_max_ms else block + self.session_max_ms
        else:
            session = self._place(key, found, event_time, event_id, event.get("role") or "", block, offset)
        channel = event["channel"]
        bit = self.channel_bits.get(channel)
        if bit is None:
            bit = self.channel_bits[channel] = len(self.channel_names)
            self.channel_names.append(channel)
        session.channels |= 1 << bit
        event_type = event["event_type"]
        if event_type in CONTACT_TYPES:
            journey = event.get("journey_id")
            if journey is not None:
                if session.issues is None:
                    session.issues = {}
                session.issues[journey] = session.issues.get(journey, 0) + 1
        elif event_type in PRODUCT_INTERACTIONS:
            session.product = True
            if event_type == "task":
                outcome = event.get("outcome")
                if outcome == "SUCCESS" or outcome == "FAILURE":
                    if session.outcomes is None:
                        session.outcomes = []
                    session.outcomes.append((event_time, event_id, outcome == "SUCCESS"))
            elif event_type != "page_view" and event_type != "screen_view":
                if session.outcomes is None:
                    session.outcomes = []
                session.outcomes.append((event_time, event_id, False))
                if event_type == "app_crash":
                    session.crashed = True

    def _place(self, key: tuple[str, str, int], found: _Session | list[_Session] | None, event_time: int,
               event_id: str, role: str, block: int, offset: int) -> _Session:
        """A new session, or the person's sessions when there are several open (one bridged by the event)."""
        gap, block_end, sessions = self.session_gap_ms, block + self.session_max_ms, self.sessions
        candidates = [] if found is None else [found] if type(found) is _Session else found
        joined = [s for s in candidates if event_time - s.last < gap and s.start - event_time < gap]
        if not joined:
            session = _Session(event_time, event_id, role, min(event_time + gap, block_end), offset, self._watermark,
                               self._horizon)
            sessions[key] = session if not candidates else [*candidates, session]
            return session
        session = joined[0]
        for other in joined[1:]:
            session.absorb(other)
        rest = [s for s in candidates if s is session or s not in joined]
        sessions[key] = rest[0] if len(rest) == 1 else rest
        if event_time < session.start:
            session.start = event_time
        if event_time > session.last or (event_time == session.last and event_id > session.last_id):
            session.last, session.last_id, session.role = event_time, event_id, role
        session.end = min(session.last + gap, block_end)
        return session

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
            for (tenant, channel, role, flow, device), (counts, totals, sketches) in pane.cells.items():
                for indicator, count, total, buckets in zip(self.event_indicators, counts, totals, sketches,
                                                            strict=True):
                    if not count:
                        continue
                    sketch = tuple(sorted(buckets.items())) if buckets is not None else ()
                    state[(tenant, channel, role, flow, device, indicator.id)] = (count, total, sketch)
                    self.closed.append(WindowCell(PANE, start, start + window_ms, tenant, channel, role, flow,
                                                  device, indicator.id, partition, count, total, sketch))
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
        for key, found in list(self.sessions.items()):
            sessions = [found] if isinstance(found, _Session) else found
            still_open = [s for s in sessions if s.end > horizon]
            if len(still_open) == len(sessions):
                continue
            for session in sessions:
                if session.end > horizon:
                    continue
                bucket = (session.end - 1) - (session.end - 1) % window_ms  # the minute the session ended in
                if bucket + window_ms <= final:
                    continue  # emitted before a restart
                summary = session.summary(self.channel_names)
                for indicator in self.session_indicators:
                    for value in indicator.observe_session(summary):  # type: ignore[misc]
                        acc = buckets.get((bucket, key[_TENANT], session.role, indicator.id))
                        if acc is None:
                            buckets[(bucket, key[_TENANT], session.role, indicator.id)] = [1.0, 0.0 + value]
                        else:
                            acc[0] += 1.0
                            acc[1] += value
            if not still_open:
                del self.sessions[key]
            else:
                self.sessions[key] = still_open[0] if len(still_open) == 1 else still_open
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
        for found in self.sessions.values():
            for session in [found] if isinstance(found, _Session) else found:
                if session.first_offset < commit:
                    commit, replay = session.first_offset, (session.replay_watermark, session.replay_horizon)
        return Checkpoint(self.partition, commit, self.next_offset, self.watermark_ms, self.closed_before_ms,
                          replay[0], replay[1])
