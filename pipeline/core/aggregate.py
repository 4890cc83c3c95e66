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
* a checkpoint with state carries a snapshot of every open window (all but the panes' event ids, which are
  the stored counted touchpoints of the open panes), so its offset to commit is the offset after the last record
  folded in: a restart restores the snapshot and replays only the records read since;
* a checkpoint without state (written by versions before snapshots) holds the offset back to the first offset
  of the oldest open pane or session and carries the watermark and horizon from just before that record, so a
  restart replays every open window whole and re-decides each replayed event's fate exactly as the first run
  did;
* the checkpoint's closed horizon tells a restarted worker which windows are already final: they are rebuilt on
  the way (sessions need their events) but not emitted again.
"""

from __future__ import annotations

import json
import math
import zlib
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
    # PartitionWindows.snapshot() as of read_offset (then commit_offset == read_offset), or None: no state, the
    # open windows are rebuilt by replaying from the held-back commit_offset.
    state: bytes | None = field(default=None, repr=False)

    @property
    def open_from_ms(self) -> int:
        """Every pane open at commit_offset (the replay point) starts at or after this event time: the counted
        touchpoints from here on read before commit_offset give those panes' event ids (their dedup sets)."""
        return self.closed_before_ms if self.replay_closed_before_ms is None else self.replay_closed_before_ms


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


SNAPSHOT_VERSION = 1


class SnapshotMismatch(ValueError):
    """A snapshot that this configuration cannot continue exactly (other window lengths, or event indicators the
    snapshot has no counts for); replay_from is the held-back checkpoint that rebuilds its open windows whole."""

    def __init__(self, reason: str, replay_from: Checkpoint) -> None:
        super().__init__(reason)
        self.replay_from = replay_from


class PartitionWindows:
    """Panes, hopping windows and sessions of one partition."""

    def __init__(self, partition: int, window_ms: int, lateness_ms: int,
                 indicators: Iterable[Indicator] = REGISTRY, checkpoint: Checkpoint | None = None, *,
                 hopping_ms: int, session_gap_ms: int, session_max_ms: int, recent_panes: Iterable[WindowCell] = (),
                 pane_event_ids: Iterable[tuple[int, str]] = ()) -> None:
        """checkpoint: one without state, replayed from its commit_offset. pane_event_ids: (event time, event id) of
        the partition's counted touchpoints read before that offset, from its open_from_ms on: the dedup sets of the
        panes open at the replay point, so a replayed copy of an event counted before it stays a duplicate."""
        if hopping_ms % window_ms or session_max_ms % window_ms:
            raise ValueError("hopping and session lengths must be whole numbers of panes")
        self.partition = partition
        self.window_ms = window_ms
        self.lateness_ms = lateness_ms
        self.hopping_ms = hopping_ms
        self.session_gap_ms = session_gap_ms
        self.session_max_ms = session_max_ms
        indicators = self.indicators = tuple(indicators)
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
        self.restored = False  # continued from a checkpoint's snapshot (restore())
        self.extra_state: dict[str, Any] = {}  # the snapshot's other per-partition state (journeys), when restored
        # pane start -> event ids counted in it before the replay point, taken by the pane when the replay opens it
        self._seeded: dict[int, set[str]] = {}
        for event_time, event_id in pane_event_ids:
            start = event_time - event_time % window_ms
            if start >= self._horizon:
                self._seeded.setdefault(start, set()).add(event_id)

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
        open_panes, seeded = self.open, self._seeded
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
                if seeded:
                    pane.event_ids = seeded.pop(start, pane.event_ids)
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
                        for member, value, quantile in zip(group_slots, group_values, is_quantile, strict=True):
                            if value is None or member is None:
                                continue
                            counts[member] += 1.0
                            totals[member] += value
                            if quantile:
                                key = ZERO_KEY if value <= MIN_POSITIVE else ceil(log(value) / LOG_GAMMA)
                                buckets = sketches[member]
                                if buckets is None:
                                    sketches[member] = {key: 1}
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
        candidates: list[_Session] = [] if found is None else [found] if isinstance(found, _Session) else found
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
            tenant = key[0]
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
                        cell = (bucket, tenant, session.role, indicator.id)
                        acc = buckets.get(cell)
                        if acc is None:
                            buckets[cell] = [1.0, 0.0 + value]
                        else:
                            acc[0] += 1.0
                            acc[1] += value
            if not still_open:
                del self.sessions[key]
            else:
                self.sessions[key] = still_open[0] if len(still_open) == 1 else still_open
        for (bucket, tenant, role, indicator_id), (count, total) in sorted(buckets.items()):
            self.closed.append(WindowCell(SESSION, bucket, bucket + window_ms, tenant, ALL_CHANNELS, role, "", "",
                                          indicator_id, self.partition, count, total))

    def contributions(self, events: list[dict[str, Any]]) -> list[WindowCell]:
        """The pane and hopping cells these events alone make, as this partition counts them (sessions left
        out): a scratch copy of the windows folds them in event-time order and closes everything."""
        scratch = PartitionWindows(self.partition, self.window_ms, self.lateness_ms, self.indicators,
                                   hopping_ms=self.hopping_ms, session_gap_ms=self.session_gap_ms,
                                   session_max_ms=self.session_max_ms)
        ordered = sorted(events, key=lambda event: event["event_time"])
        if not ordered:
            return []
        scratch.add(ordered, list(range(len(ordered))))
        scratch.advance_idle(ordered[-1]["event_time"] + self.hopping_ms + self.window_ms + self.lateness_ms)
        return [cell for cell in scratch.drain_closed() if cell.window_kind != SESSION]

    def restate(self, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[WindowCell]:
        """Move counted events from the dimensions they were counted under (`before`: the role they were stored
        with) to those they have now (`after`, the same events). Open panes and the closed panes hopping windows
        still need change in place; returns the change to cells already emitted (stored), as signed cells to add
        to them (add_cells). Session cells are not restated."""
        slot_of = {indicator.id: slot for slot, indicator in enumerate(self.event_indicators)}
        closed_before = self.closed_before_ms
        emitted: dict[tuple[str, int, int, CellKey], list[Any]] = {}
        for sign, events in ((-1, before), (1, after)):
            for cell in self.contributions(events):
                start, key = cell.window_start_ms, cell.key
                if cell.window_kind == PANE and start in self.open:
                    self._restate_open(self.open[start], key, slot_of[cell.indicator], sign, cell)
                if cell.window_end_ms > closed_before:
                    continue  # not emitted yet: the open pane changed, or a hopping window that merges those
                if cell.window_kind == PANE and start in self.recent:
                    _add_into(self.recent[start], key, sign, cell)
                acc = emitted.setdefault((cell.window_kind, start, cell.window_end_ms, key), [0.0, 0.0, {}])
                _accumulate(acc, sign, cell.count, cell.total, cell.sketch)
        return [WindowCell(kind, start, end, key[0], key[1], key[2], key[3], key[4], key[5], self.partition, count,
                           total, tuple(sorted((k, n) for k, n in buckets.items() if n)))
                for (kind, start, end, key), (count, total, buckets) in emitted.items()]

    def _restate_open(self, pane: _Pane, key: CellKey, slot: int, sign: int, cell: WindowCell) -> None:
        dims: DimKey = (key[0], key[1], key[2], key[3], key[4])
        cells = pane.cells.get(dims)
        if cells is None:
            cells = pane.cells[dims] = ([0.0] * self.slots, [0.0] * self.slots, [None] * self.slots)
        counts, totals, sketches = cells
        counts[slot] += sign * cell.count
        totals[slot] += sign * cell.total
        if cell.sketch:
            buckets = sketches[slot]
            if buckets is None:
                buckets = sketches[slot] = {}
            for bucket, n in cell.sketch:
                buckets[bucket] = buckets.get(bucket, 0) + sign * n
                if not buckets[bucket]:
                    del buckets[bucket]

    def drain_closed(self) -> list[WindowCell]:
        closed, self.closed = self.closed, []
        return closed

    def checkpoint(self, *, with_state: bool = False, extra: dict[str, Any] | None = None) -> Checkpoint:
        """With state: a snapshot of the open windows (and extra, other per-partition state of the core as of the
        same offset: journeys), so the offset to commit is the next one to read. Without: the offset to commit is
        held back to the oldest open pane or session, so a restart rebuilds it whole."""
        if with_state:
            return Checkpoint(self.partition, self.next_offset, self.next_offset, self.watermark_ms,
                              self.closed_before_ms, self._watermark, self._horizon, self.snapshot(extra))
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

    def _config(self) -> list[int]:
        return [self.window_ms, self.lateness_ms, self.hopping_ms, self.session_gap_ms, self.session_max_ms]

    @property
    def replay_watermark_ms(self) -> int:
        """The watermark records are judged against from here (a restored watermark aside)."""
        return self._watermark

    def snapshot(self, extra: dict[str, Any] | None = None) -> bytes:
        """Everything a continuation needs but the panes' event ids, as versioned, zlib-compressed JSON; restore()
        turns it into windows that treat every later record exactly as these would. Counts are keyed by indicator
        id (a changed catalogue is detected), sessions are stored column by column (they compress better)."""
        panes = []
        for start, pane in self.open.items():
            cells = []
            for dims, (counts, totals, sketches) in pane.cells.items():
                observed: list[float] = []  # (slot, count, total) of each slot with observations
                sketched = []  # (slot, [key, n, key, n, ...]) of each quantile slot with observations
                for slot, count in enumerate(counts):
                    if count:
                        observed += (slot, count, totals[slot])
                        buckets = sketches[slot]
                        if buckets is not None:
                            sketched.append([slot, [x for item in buckets.items() for x in item]])
                cells.append([*dims, observed, sketched])
            panes.append([start, pane.first_offset, pane.replay[0], pane.replay[1], cells])
        tenants: list[str] = []
        persons: list[str] = []
        blocks: list[int] = []
        sessions: list[_Session] = []
        for (tenant, person, block), found in self.sessions.items():  # in dict order: closing sums in this order
            for session in [found] if isinstance(found, _Session) else found:
                tenants.append(tenant)
                persons.append(person)
                blocks.append(block)
                sessions.append(session)
        next_offset = self.next_offset
        state = {
            "version": SNAPSHOT_VERSION,
            "config": self._config(),
            "indicators": [[indicator.id, _meaning(indicator)] for indicator in self.event_indicators],
            "clock": [self._watermark, self._restored_watermark, self._horizon, self.final_before_ms,
                      self.next_offset],
            "channels": self.channel_names,
            "extra": extra or {},
            "panes": panes,
            "sessions": {
                "tenant": tenants,
                "person": persons,
                "block": blocks,
                # times as differences (start - block, last - start, end - last): small numbers compress well
                "start": [s.start - block for s, block in zip(sessions, blocks, strict=True)],
                "last": [s.last - s.start for s in sessions],
                "end": [s.end - s.last for s in sessions],
                "last_id": [s.last_id for s in sessions],
                "role": [s.role for s in sessions],
                # next_offset - first_offset, start - replay watermark, replay watermark - replay horizon
                "first_offset": [next_offset - s.first_offset for s in sessions],
                "replay_watermark": [s.start - s.replay_watermark for s in sessions],
                "replay_horizon": [s.replay_watermark - s.replay_horizon for s in sessions],
                "channels": [s.channels for s in sessions],
                "issues": [s.issues for s in sessions],
                "outcomes": [s.outcomes for s in sessions],
                "flags": [s.crashed | s.product << 1 for s in sessions],
            },
        }
        return zlib.compress(json.dumps(state, separators=(",", ":")).encode(), 1)

    @classmethod
    def restore(cls, partition: int, window_ms: int, lateness_ms: int, indicators: Iterable[Indicator],
                checkpoint: Checkpoint, *, hopping_ms: int, session_gap_ms: int, session_max_ms: int,
                recent_panes: Iterable[WindowCell] = (),
                pane_event_ids: Iterable[tuple[int, str]] = ()) -> PartitionWindows:
        """The windows of a checkpoint with state, to continue at its read_offset. recent_panes: the stored "1m"
        cells of the panes before its closed horizon that hopping windows still cover; pane_event_ids: (event
        time, event id) of the partition's counted touchpoints read before read_offset, from open_from_ms on.
        Raises SnapshotMismatch when the snapshot cannot be continued exactly under these settings."""
        if checkpoint.state is None:
            raise ValueError(f"the checkpoint of partition {partition} has no state to restore")
        windows = cls(partition, window_ms, lateness_ms, indicators, hopping_ms=hopping_ms,
                      session_gap_ms=session_gap_ms, session_max_ms=session_max_ms)
        windows._load(checkpoint, recent_panes, pane_event_ids)
        return windows

    def _load(self, checkpoint: Checkpoint, recent_panes: Iterable[WindowCell],
              pane_event_ids: Iterable[tuple[int, str]]) -> None:
        try:
            state = json.loads(zlib.decompress(checkpoint.state or b""))
            version = state["version"]
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the checkpoint state of partition {self.partition} is unreadable: {exc}") from exc
        if version != SNAPSHOT_VERSION:
            raise ValueError(f"the checkpoint state of partition {self.partition} has version {version}; this "
                             f"worker reads version {SNAPSHOT_VERSION}")
        slot_of = {indicator.id: slot for slot, indicator in enumerate(self.event_indicators)}
        if state["config"] != self._config():
            raise SnapshotMismatch(
                f"window settings (pane, lateness, hopping, session gap, session max in ms) changed from "
                f"{state['config']} to {self._config()}", self._held_back(state, checkpoint))
        meanings = {indicator.id: _meaning(indicator) for indicator in self.event_indicators}
        new = sorted(set(slot_of) - {indicator for indicator, meaning in state["indicators"]
                                     if meanings.get(indicator) == meaning})
        if new:  # their open panes would miss, or mix in, what was read before the snapshot
            raise SnapshotMismatch(f"indicators added or redefined since the snapshot: {', '.join(new)}",
                                   self._held_back(state, checkpoint))
        self._watermark, self._restored_watermark, self._horizon, self.final_before_ms, self.next_offset = (
            state["clock"])
        self.channel_names = list(state["channels"])
        self.channel_bits = {name: bit for bit, name in enumerate(self.channel_names)}
        self.restored, self.extra_state = True, dict(state.get("extra") or {})
        self._load_panes(state["panes"], [slot_of.get(indicator) for indicator, _ in state["indicators"]])
        self._load_sessions(state["sessions"])
        window_ms, closed_before = self.window_ms, self.closed_before_ms
        for cell in recent_panes:
            if (cell.window_kind == PANE and cell.partition == self.partition and cell.window_start_ms < closed_before
                    and cell.count):  # a cell emptied in storage (count 0) was never in the live windows' memory
                self.recent.setdefault(cell.window_start_ms, {})[cell.key] = (cell.count, cell.total, cell.sketch)
        open_panes, horizon = self.open, self._horizon
        for event_time, event_id in pane_event_ids:
            start = event_time - event_time % window_ms
            holder = open_panes.get(start)
            if holder is not None:
                holder.event_ids.add(event_id)
            elif start >= horizon:  # counted before a replay point this snapshot was taken in; not reopened yet
                self._seeded.setdefault(start, set()).add(event_id)

    def _load_panes(self, panes: list[Any], mapping: list[int | None]) -> None:
        """Open panes of a snapshot; mapping: the current slot of each snapshot slot (None: dropped since)."""
        slots = self.slots
        for start, first_offset, replay_watermark, replay_horizon, cells in panes:
            pane = self.open[start] = _Pane(first_offset, (replay_watermark, replay_horizon))
            for tenant, channel, role, flow, device, observed, sketched in cells:
                counts, totals = [0.0] * slots, [0.0] * slots
                sketches: list[dict[int, int] | None] = [None] * slots
                for i in range(0, len(observed), 3):
                    slot = mapping[int(observed[i])]
                    if slot is not None:
                        counts[slot], totals[slot] = observed[i + 1], observed[i + 2]
                for old, flat in sketched:
                    slot = mapping[old]
                    if slot is not None:
                        sketches[slot] = dict(zip(flat[::2], flat[1::2], strict=True))
                pane.cells[(tenant, channel, role, flow, device)] = (counts, totals, sketches)

    def _load_sessions(self, columns: dict[str, list[Any]]) -> None:
        """Open sessions of a snapshot, in their order (closing sums them in dict order)."""
        sessions, next_offset = self.sessions, self.next_offset
        for (tenant, person, block, start, last, end, last_id, role, first_offset, replay_watermark, replay_horizon,
             channels, issues, outcomes, flags) in zip(*(columns[name] for name in _SESSION_COLUMNS), strict=True):
            replay_watermark = block + start - replay_watermark
            session = _Session(block + start, last_id, role, block + start + last + end, next_offset - first_offset,
                               replay_watermark, replay_watermark - replay_horizon)
            session.last = block + start + last
            session.channels = channels
            session.issues = issues
            session.outcomes = None if outcomes is None else [(t, event_id, ok) for t, event_id, ok in outcomes]
            session.crashed, session.product = bool(flags & 1), bool(flags & 2)
            key = (tenant, person, block)
            found = sessions.get(key)
            if found is None:
                sessions[key] = session
            elif isinstance(found, _Session):
                sessions[key] = [found, session]
            else:
                found.append(session)

    def _held_back(self, state: dict[str, Any], checkpoint: Checkpoint) -> Checkpoint:
        """The checkpoint without state that checkpoint() would have given for the snapshot's windows."""
        watermark, _, horizon, _, next_offset = state["clock"]
        commit, replay = next_offset, (watermark, horizon)
        for _, first_offset, replay_watermark, replay_horizon, _ in state["panes"]:
            if first_offset < commit:
                commit, replay = first_offset, (replay_watermark, replay_horizon)
        columns = state["sessions"]
        for block, start, first_offset, replay_watermark, replay_horizon in zip(
                columns["block"], columns["start"], columns["first_offset"], columns["replay_watermark"],
                columns["replay_horizon"], strict=True):
            first_offset = next_offset - first_offset
            if first_offset < commit:
                replay_watermark = block + start - replay_watermark
                commit, replay = first_offset, (replay_watermark, replay_watermark - replay_horizon)
        return Checkpoint(self.partition, commit, next_offset, checkpoint.watermark_ms, checkpoint.closed_before_ms,
                          replay[0], replay[1])


def _accumulate(acc: list[Any], sign: int, count: float, total: float, sketch: Sketch) -> None:
    acc[0] += sign * count
    acc[1] += sign * total
    buckets = acc[2]
    for bucket, n in sketch:
        buckets[bucket] = buckets.get(bucket, 0) + sign * n


def _add_into(state: dict[CellKey, CellState], key: CellKey, sign: int, cell: WindowCell) -> None:
    """Add a signed cell to a closed pane's kept state; a cell left without observations goes."""
    count, total, sketch = state.get(key, (0.0, 0.0, ()))
    acc: list[Any] = [count, total, dict(sketch)]
    _accumulate(acc, sign, cell.count, cell.total, cell.sketch)
    if acc[0] <= 0:
        state.pop(key, None)
    else:
        state[key] = (acc[0], acc[1], tuple(sorted((k, n) for k, n in acc[2].items() if n)))


def add_cells(stored: Iterable[WindowCell], changes: Iterable[WindowCell]) -> list[WindowCell]:
    """Stored cells with signed changes added (restate's result): one cell per key, a cell left without
    observations written as empty so that it counts nothing."""
    acc: dict[tuple[str, int, int, CellKey, int], list[Any]] = {}
    for sign_cells in (stored, changes):
        for cell in sign_cells:
            entry = acc.setdefault((cell.window_kind, cell.window_start_ms, cell.window_end_ms, cell.key,
                                    cell.partition), [0.0, 0.0, {}])
            _accumulate(entry, 1, cell.count, cell.total, cell.sketch)
    result = []
    for (kind, start, end, key, partition), (count, total, buckets) in acc.items():
        empty = count <= 0
        result.append(WindowCell(kind, start, end, key[0], key[1], key[2], key[3], key[4], key[5], partition,
                                 0.0 if empty else count, 0.0 if empty else total,
                                 () if empty else tuple(sorted((k, n) for k, n in buckets.items() if n > 0))))
    return result


def _meaning(indicator: Indicator) -> int:
    """A checksum of what an indicator observes as its catalogue states it (an Apdex T, for one, is in the
    definition), so that counts of a changed definition are not continued."""
    return zlib.crc32("|".join((indicator.definition, indicator.formula, indicator.kind.value, str(indicator.q),
                                *indicator.fed_by)).encode())


_SESSION_COLUMNS = ("tenant", "person", "block", "start", "last", "end", "last_id", "role", "first_offset",
                    "replay_watermark", "replay_horizon", "channels", "issues", "outcomes", "flags")
