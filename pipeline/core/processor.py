"""The whole core flow for a batch of records: decode -> validate -> enrich -> aggregate -> evaluate.

Plain Python with no I/O: adapters feed it records and write what it returns. Output accumulates across
batches until the adapter flushes it (to ClickHouse) and commits the checkpoints' offsets (to Kafka).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from pipeline.core.aggregate import (
    DUPLICATE,
    LATE,
    NEVER,
    ON_TIME,
    Checkpoint,
    PartitionWindows,
    SnapshotMismatch,
    WindowCell,
)
from pipeline.core.decode import Rejection, SchemaLookup, decode_batch
from pipeline.core.enrich import Enricher, IdentityOutput
from pipeline.core.identity import AuditRecord, Forget, GraphState, IdentityConfig, Operation, person_id_of
from pipeline.core.indicators import Indicator, catalogue
from pipeline.core.journeys import JourneyConfig, JourneyRow, PartitionJourneys, ProfileRow
from pipeline.core.validate import violation

UNKNOWN_CHANNEL = "unknown"


class SourceRecord(Protocol):
    """What the core needs of a Kafka record (aiokafka's ConsumerRecord fits)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Any  # the original SourceRecord: its bytes go to the dead-letter topic untouched
    channel: str
    reason: str
    detail: str


class TouchpointRow(NamedTuple):
    """One enriched touchpoint as stored in ClickHouse's `touchpoints` table (the fields are its columns; a unit
    test checks them against the DDL). A tuple underneath: rows are built per event and inserted by column."""

    event_id: str
    event_time_ms: int
    tenant: str
    channel: str
    event_type: str
    person_id: str
    role: str
    is_customer: int
    is_user: int
    first_seen_ms: int
    customer_since_ms: int | None
    purchase_count: int
    previous_contact_ms: int | None
    resolved_from: list[str]
    anonymous_id: str | None
    user_id: str | None
    customer_id: str | None
    email_sha256: str | None
    phone_sha256: str | None
    helpdesk_requester_id: str | None
    session_id: str | None
    journey_id: str | None
    flow: str | None
    device_class: str | None
    outcome: str | None
    error_code: str | None
    duration_ms: int | None
    survey_kind: str | None
    survey_score: int | None
    survey_scale_min: int | None
    survey_scale_max: int | None
    survey_about_channel: str | None
    queue_ms: int | None
    handle_ms: int | None
    first_response_ms: int | None
    resolved: int | None
    escalated: int | None
    agent_id: str | None
    lcp_ms: float | None
    inp_ms: float | None
    cls: float | None
    amount_minor: int | None
    currency: str | None
    sentiment: float | None
    app_version: str | None
    rage_clicks: int | None
    attribute_keys: list[str]
    attribute_values: list[str]
    schema_id: int
    source_partition: int
    source_offset: int
    counted: int


TOUCHPOINT_COLUMNS: tuple[str, ...] = TouchpointRow._fields


def touchpoint_row(event: dict[str, Any], schema_id: int, partition: int, offset: int,
                   counted: bool) -> TouchpointRow:
    ids = event["identifiers"]
    survey = event.get("survey") or _EMPTY
    contact = event.get("contact") or _EMPTY
    vitals = event.get("web_vitals") or _EMPTY
    amount = event.get("amount") or _EMPTY
    attributes = event.get("attributes") or _EMPTY
    resolved, escalated = contact.get("resolved"), contact.get("escalated")
    return TouchpointRow(
        event["event_id"], event["event_time"], event["tenant"], event["channel"], event["event_type"],
        event["person_id"], event["role"], int(event["is_customer"]), int(event["is_user"]),
        event["first_seen_ms"], event["customer_since_ms"], event["purchase_count"], event["previous_contact_ms"],
        event["resolved_from"],
        ids["anonymous_id"], ids["user_id"], ids["customer_id"], ids.get("email_sha256"), ids.get("phone_sha256"),
        ids.get("helpdesk_requester_id"), event.get("session_id"),
        event.get("journey_id"), event.get("flow"), event.get("device_class"),
        event.get("outcome"), event.get("error_code"), event.get("duration_ms"),
        survey.get("kind"), survey.get("score"), survey.get("scale_min"), survey.get("scale_max"),
        survey.get("about_channel"),
        contact.get("queue_ms"), contact.get("handle_ms"), contact.get("first_response_ms"),
        None if resolved is None else int(resolved), None if escalated is None else int(escalated),
        contact.get("agent_id"),
        vitals.get("lcp_ms"), vitals.get("inp_ms"), vitals.get("cls"),
        amount.get("minor_units"), amount.get("currency"),
        event.get("sentiment"), event.get("app_version"), event.get("rage_clicks"),
        list(attributes.keys()), list(attributes.values()),
        schema_id, partition, offset, int(counted),
    )


_EMPTY: dict[str, Any] = {}


def _record(row: TouchpointRow, fields: tuple[str, ...], prefix: str = "") -> dict[str, Any] | None:
    values = {name: getattr(row, prefix + name) for name in fields}
    return values if any(v is not None for v in values.values()) else None


def row_event(row: TouchpointRow) -> dict[str, Any]:
    """The event a stored row was made from, as far as indicators read it (touchpoint_row's inverse): what
    restating a row's counts needs."""
    contact = _record(row, ("queue_ms", "handle_ms", "first_response_ms", "resolved", "escalated", "agent_id"))
    if contact is not None:
        for flag in ("resolved", "escalated"):
            contact[flag] = None if contact[flag] is None else bool(contact[flag])
    return {
        "event_id": row.event_id, "event_time": row.event_time_ms, "tenant": row.tenant, "channel": row.channel,
        "event_type": row.event_type, "person_id": row.person_id, "role": row.role, "flow": row.flow,
        "device_class": row.device_class,
        "session_id": row.session_id, "journey_id": row.journey_id, "outcome": row.outcome,
        "error_code": row.error_code, "duration_ms": row.duration_ms,
        "survey": None if row.survey_kind is None else _record(
            row, ("kind", "score", "scale_min", "scale_max", "about_channel"), "survey_"),
        "contact": contact, "web_vitals": _record(row, ("lcp_ms", "inp_ms", "cls")),
        "amount": None if row.amount_minor is None else {"minor_units": row.amount_minor, "currency": row.currency},
        "sentiment": row.sentiment, "app_version": row.app_version, "rage_clicks": row.rage_clicks,
        "attributes": dict(zip(row.attribute_keys, row.attribute_values, strict=True)),
        "previous_contact_ms": row.previous_contact_ms,
    }


@dataclass(frozen=True, slots=True)
class Restatement:
    """Stored rows that may name the wrong person or role now: those resolved from these identifiers, with event
    times from each one's time on, of the partitions this worker reads (each row is restated by its owner)."""

    since: dict[str, int]  # identifier -> earliest event time
    partitions: frozenset[int]


@dataclass(slots=True)
class Output:
    """Everything produced since the last flush."""

    touchpoints: list[TouchpointRow] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    window_cells: list[WindowCell] = field(default_factory=list)
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    identity: IdentityOutput = field(default_factory=IdentityOutput)
    events_in: Counter[str] = field(default_factory=Counter)  # by channel
    late: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    # Counted events whose id is also counted on another partition of this worker (a sender that keyed a retry
    # differently): counted twice, so reported.
    cross_partition_duplicates: Counter[str] = field(default_factory=Counter)
    journeys: list[JourneyRow] = field(default_factory=list)  # closed journeys
    profiles: dict[tuple[str, str], ProfileRow] = field(default_factory=dict)  # (tenant, person) -> latest
    # Restated after an unmerge or a late identify: rows rewritten (same key, the person and role of now) and
    # signed changes to indicator cells already stored, which the store adds to them (add_cells).
    restated: list[TouchpointRow] = field(default_factory=list)
    cell_changes: list[WindowCell] = field(default_factory=list)
    moved_events: list[tuple[str, str]] = field(default_factory=list)  # (former person id, event id)
    records: int = 0

    def __len__(self) -> int:
        return self.records


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """The windows' lengths; their defaults are settings (pipeline/settings.py WindowSettings.core())."""

    window_ms: int
    lateness_ms: int  # also the grace period: a window closes when the watermark passes its end
    max_future_ms: int
    idle_close_ms: int
    hopping_ms: int  # hopping windows of this length, one per pane
    session_gap_ms: int  # a person's session ends after this much inactivity
    session_max_ms: int  # ...and at every multiple of this in event time
    apdex_t_ms: Mapping[str, int]  # per flow
    apdex_default_t_ms: int

    def indicators(self) -> tuple[Indicator, ...]:
        return catalogue(self.apdex_t_ms, self.apdex_default_t_ms)

    def lengths(self) -> dict[str, int]:
        """The window lengths PartitionWindows takes as keyword arguments (it has no defaults of its own)."""
        return {"hopping_ms": self.hopping_ms, "session_gap_ms": self.session_gap_ms,
                "session_max_ms": self.session_max_ms}


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a newly assigned partition is read from, and how its windows were set up."""

    offset: int | None  # seek here; None: from the group's committed offset (or the start)
    how: str  # "new", "state" (snapshot restored), "replay" (rebuilt from a held-back offset)
    note: str = ""  # why a snapshot could not be continued, for the log


class TouchpointProcessor:
    def __init__(self, config: WindowConfig, schema_for: SchemaLookup, identity: IdentityConfig,
                 *, identity_enabled: bool = True, snapshot_interval_ms: int | None = None,
                 journeys: JourneyConfig | None = None, identity_state: GraphState | None = None) -> None:
        """snapshot_interval_ms: checkpoints carry a snapshot of the open windows, one per partition at most this
        often (see take_output), so the committed offset follows the flushed data; None: checkpoints without state
        at every output, their offset held back to the oldest open window (the behaviour before snapshots).
        journeys: how journeys are cut and their effort weighed; None: no journeys nor profiles. Open journeys
        and profiles travel in the snapshots; a replay from a checkpoint without state rebuilds journeys from
        its replay point on (those begun before it are cut there)."""
        self.config = config
        self.snapshot_interval_ms = snapshot_interval_ms
        self._snapshot_at: dict[int, int] = {}  # partition -> now_ms of its last checkpoint with state
        self._changed: set[int] = set()  # partitions whose windows moved since their last checkpoint with state
        self.journey_config = journeys
        self.journeys: dict[int, PartitionJourneys] = {}
        self.schema_for = schema_for
        self.enricher = Enricher(identity, enabled=identity_enabled, state=identity_state)
        self.indicators = config.indicators()
        self.partitions: dict[int, PartitionWindows] = {}
        self._activity: dict[int, tuple[int, int]] = {}  # partition -> (wall ms, watermark) at last record
        self.output = Output()

    def owns(self, partition: int) -> bool:
        return partition in self.partitions

    def assign(self, partition: int, checkpoint: Checkpoint | None, now_ms: int,
               recent_panes: Iterable[WindowCell] = (),
               pane_event_ids: Iterable[tuple[int, str]] | None = None) -> Resume:
        """Start (or resume from a checkpoint) a partition this worker now reads; returns the offset to read it
        from. recent_panes: the partition's stored "1m" cells of the panes before the checkpoint's closed horizon
        that hopping windows still cover (hopping_ms / window_ms - 1 panes), so hopping windows after a restart
        cover them too. pane_event_ids: (event time, event id) of the partition's counted touchpoints read before
        the checkpoint's commit_offset, from its open_from_ms on (the dedup sets of the panes open there); required
        with a checkpoint with state."""
        config = self.config
        lengths = config.lengths()
        resume = Resume(None, "new") if checkpoint is None else Resume(checkpoint.commit_offset, "replay")
        windows = None
        if checkpoint is not None and checkpoint.state is not None:
            if pane_event_ids is None:
                raise ValueError(f"partition {partition}: a checkpoint with state needs the open panes' event ids")
            try:
                windows = PartitionWindows.restore(partition, config.window_ms, config.lateness_ms, self.indicators,
                                                   checkpoint, recent_panes=recent_panes,
                                                   pane_event_ids=pane_event_ids, **lengths)
                resume = Resume(checkpoint.commit_offset, "state")
            except SnapshotMismatch as mismatch:  # rebuild the open windows from the records instead
                checkpoint = mismatch.replay_from
                resume = Resume(checkpoint.commit_offset, "replay", str(mismatch))
                pane_event_ids = None  # they were read up to the snapshot, past this replay point
        if windows is None:
            windows = PartitionWindows(partition, config.window_ms, config.lateness_ms, self.indicators, checkpoint,
                                       recent_panes=recent_panes, pane_event_ids=pane_event_ids or (), **lengths)
        self.partitions[partition] = windows
        if self.journey_config is not None:
            self.journeys[partition] = self._journeys_for(partition, checkpoint, windows)
        self._snapshot_at.pop(partition, None)
        self._changed.discard(partition)
        self._activity[partition] = (now_ms, windows.watermark_ms)
        return resume

    def _journeys_for(self, partition: int, checkpoint: Checkpoint | None,
                      windows: PartitionWindows) -> PartitionJourneys:
        """Open journeys and profiles restored with the windows' snapshot, or rebuilt from the replay point on."""
        assert self.journey_config is not None
        config = self.config
        restored = windows.extra_state.get("journeys") if windows.restored else None
        if restored is not None:
            journeys = PartitionJourneys(partition, self.journey_config, config.window_ms, config.lateness_ms)
            journeys.restore(restored)
            return journeys
        # From where the windows' replay starts: the replayed touchpoints rebuild the open journeys.
        start = NEVER if checkpoint is None else (checkpoint.watermark_ms if checkpoint.replay_watermark_ms is None
                                                  else checkpoint.replay_watermark_ms)
        if windows.restored:  # a snapshot from before journeys: they begin at its read offset
            start = windows.replay_watermark_ms
        return PartitionJourneys(partition, self.journey_config, config.window_ms, config.lateness_ms, start)

    def revoke(self, partition: int) -> None:
        """Drop a partition's open windows: its next owner rebuilds them from the committed offset."""
        self.partitions.pop(partition, None)
        self.journeys.pop(partition, None)
        self._activity.pop(partition, None)
        self.output.checkpoints.pop(partition, None)
        self._snapshot_at.pop(partition, None)
        self._changed.discard(partition)

    def process(self, partition: int, records: Sequence[SourceRecord], now_ms: int) -> None:
        """Run one partition's records (in offset order) through the core flow."""
        out = self.output
        windows = self.partitions[partition]
        out.records += len(records)
        decoded = decode_batch([r.value for r in records], self.schema_for)
        for rejection in decoded.rejections:
            out.dead_letters.append(_dead_letter(records[rejection.index], UNKNOWN_CHANNEL, rejection))

        events: list[dict[str, Any]] = []
        offsets: list[int] = []
        schema_ids: list[int] = []
        max_future_ms = self.config.max_future_ms
        blocked = self.enricher.config.blocked_values
        for index, event, schema_id in zip(decoded.indexes, decoded.events, decoded.schema_ids, strict=True):
            problem = violation(event, now_ms, max_future_ms, blocked)
            if problem is not None:
                out.dead_letters.append(DeadLetter(records[index], event["channel"], *problem))
                continue
            events.append(event)
            offsets.append(records[index].offset)
            schema_ids.append(schema_id)

        self.enricher.enrich(events)
        fates = windows.add(events, offsets)
        if records:
            # Offsets of dead letters advance the partition too, so they are committed like the others.
            windows.next_offset = max(windows.next_offset, records[-1].offset + 1)
            self._changed.add(partition)
        rows = out.touchpoints
        events_in, late, duplicates = out.events_in, out.late, out.duplicates
        for event, offset, schema_id, fate in zip(events, offsets, schema_ids, fates, strict=True):
            channel = event["channel"]
            events_in[channel] += 1
            if fate == DUPLICATE:
                duplicates[channel] += 1  # its first copy is already written; nothing to add
                continue
            if fate == LATE:
                late[channel] += 1
            rows.append(touchpoint_row(event, schema_id, partition, offset, counted=fate != LATE))
        journeys = self.journeys.get(partition)
        if journeys is not None:  # folded when counted: duplicates and late copies never reach a journey
            journeys.add_all(events, fates)
        self._activity[partition] = (now_ms, windows.watermark_ms)
        if len(self.partitions) > 1:
            self._find_cross_partition_duplicates(partition, events, fates)
        self._collect(partition)

    def _find_cross_partition_duplicates(self, partition: int, events: Sequence[dict[str, Any]],
                                         fates: Sequence[int]) -> None:
        """Ids counted here that another partition of this worker counted in the same pane (while it is open)."""
        others = [w.open for p, w in self.partitions.items() if p != partition]
        window_ms, found = self.config.window_ms, self.output.cross_partition_duplicates
        for event, fate in zip(events, fates, strict=True):
            if fate != ON_TIME:
                continue
            event_time, event_id = event["event_time"], event["event_id"]
            start = event_time - event_time % window_ms
            for panes in others:
                pane = panes.get(start)
                if pane is not None and event_id in pane.event_ids:
                    found[event["channel"]] += 1
                    break

    def tick(self, now_ms: int, caught_up: Collection[int]) -> None:
        """Let event time flow on idle partitions, so the last windows of a quiet stream still close. Idle means
        caught up (nothing left to read) for the idle time: a partition that merely waits, during a rebalance
        or behind a backlog, keeps its windows open."""
        for partition, (seen_ms, watermark_ms) in self._activity.items():
            idle_ms = now_ms - seen_ms
            if idle_ms >= self.config.idle_close_ms and watermark_ms != NEVER and partition in caught_up:
                windows = self.partitions[partition]
                before = windows.watermark_ms
                windows.advance_idle(watermark_ms + idle_ms)
                if windows.watermark_ms != before:
                    self._changed.add(partition)
                journeys = self.journeys.get(partition)
                if journeys is not None:
                    journeys.advance(watermark_ms + idle_ms)
                self._collect(partition)

    def _collect(self, partition: int) -> None:
        windows = self.partitions[partition]
        journeys = self.journeys.get(partition)
        if journeys is not None:
            rows, profiles = journeys.drain()
            self.output.journeys.extend(rows)
            self.output.profiles.update(profiles)
        closed = windows.drain_closed()
        if closed:
            self.output.window_cells.extend(closed)
        if self.snapshot_interval_ms is None:
            self.output.checkpoints[partition] = windows.checkpoint()

    def apply_identity(self, operations: Sequence[Operation], *, replay: bool = False) -> None:
        """Identity operations from the shared log (other workers' links and facts, erasures)."""
        self.enricher.apply(operations, replay=replay)
        forgotten = [person_id_of(op.identifier) for op in operations if isinstance(op, Forget)]
        if forgotten:
            for journeys in self.journeys.values():
                journeys.forget(forgotten)

    def take_restatement(self) -> Restatement | None:
        """The rows an unmerge or a late identify applied since the last call put under the wrong person or role:
        from the merge's time on (unmerge) or from identity.restate_horizon before it (both). A late identify's
        rows older than the horizon are not restated; that is recorded in the audit (`not_restated`)."""
        graph = self.enricher.graph
        if graph is None:
            return None
        changes = graph.changes
        if not (changes.unmerged or changes.merged_late or changes.merged_into):
            return None
        horizon = self.enricher.config.restate_horizon_ms
        since = {identifier: at - horizon for identifier, at in changes.unmerged.items()}
        for identifier, at in changes.merged_into.items():
            since[identifier] = min(since.get(identifier, at - horizon), at - horizon)
        for identifier, at in changes.merged_late.items():
            start = at - horizon
            if graph.first_seen.get(identifier, at) < start:
                changes.audit.append(AuditRecord(
                    at, "not_restated", identifier, "", person_id_of(identifier),
                    person_id_of(graph.person_key(identifier)),
                    "rows older than identity.restate_horizon_s before this merge keep their person and role", ""))
            since[identifier] = min(since.get(identifier, start), start)
        changes.unmerged, changes.merged_late, changes.merged_into = {}, {}, {}
        return Restatement(since, frozenset(self.partitions)) if self.partitions else None

    def restate(self, restatement: Restatement, stored: Iterable[TouchpointRow]) -> None:
        """Resolve the restatement's rows again (the person as of now, the role as of each event's time), stored
        ones and those buffered for the next write, and restate those that changed: rows rewritten (buffered
        ones in place), and their counts moved to the role they have now (open windows in place, emitted cells
        as signed changes). Rows of partitions this worker does not read are left to theirs."""
        graph = self.enricher.graph
        out = self.output
        since = restatement.since
        before: dict[int, list[dict[str, Any]]] = {}
        after: dict[int, list[dict[str, Any]]] = {}
        buffered = out.touchpoints
        candidates: list[tuple[int | None, TouchpointRow]] = [(None, row) for row in stored]
        candidates.extend(enumerate(buffered))
        for index, row in candidates:
            if graph is None or row.source_partition not in self.partitions or not any(
                    row.event_time_ms >= since.get(i, row.event_time_ms + 1) for i in row.resolved_from):
                continue
            who = graph.resolve(list(row.resolved_from), row.event_time_ms)
            new = row._replace(person_id=who.person_id, role=who.role.value, is_customer=int(who.is_customer),
                               is_user=int(who.is_user), first_seen_ms=who.first_seen_ms,
                               customer_since_ms=who.customer_since_ms, purchase_count=who.purchase_count,
                               previous_contact_ms=who.previous_contact_ms)
            if new == row:
                continue
            if index is not None:
                buffered[index] = new
            else:
                out.restated.append(new)
                if new.person_id != row.person_id:
                    out.moved_events.append((row.person_id, row.event_id))
            if row.counted and (new.role, new.previous_contact_ms) != (row.role, row.previous_contact_ms):
                before.setdefault(row.source_partition, []).append(row_event(row))
                after.setdefault(row.source_partition, []).append(row_event(new))
        for partition, events in before.items():
            out.cell_changes.extend(self.partitions[partition].restate(events, after[partition]))
            self._changed.add(partition)  # the next snapshot carries the restated open windows

    def snapshot_due(self, now_ms: int) -> bool:
        """A partition moved since its last snapshot and the interval has passed: a flush now checkpoints it, so
        the last records before a quiet spell are not left to a replay."""
        interval, taken = self.snapshot_interval_ms, self._snapshot_at
        return interval is not None and any(
            taken.get(p) is None or now_ms - taken[p] >= interval for p in self._changed)

    def take_output(self, now_ms: int | None = None, *, force_checkpoints: bool = False) -> Output:
        """Everything produced since the last call. With snapshots, a partition whose windows moved gets a
        checkpoint with state when snapshot_interval_ms passed since its last one (first time: at once), or when
        forced (the final flush before a stop or a revoke); otherwise no checkpoint, so no commit."""
        out, self.output = self.output, Output()
        out.identity = self.enricher.take_output()
        interval = self.snapshot_interval_ms
        if interval is not None:
            if now_ms is None and not force_checkpoints:
                raise ValueError("take_output needs now_ms to pace snapshots")
            for partition in sorted(self._changed):
                last = self._snapshot_at.get(partition)
                if force_checkpoints or last is None or now_ms is None or now_ms - last >= interval:
                    journeys = self.journeys.get(partition)
                    extra = None if journeys is None else {"journeys": journeys.state()}
                    out.checkpoints[partition] = self.partitions[partition].checkpoint(with_state=True, extra=extra)
                    if now_ms is not None:
                        self._snapshot_at[partition] = now_ms
                    self._changed.discard(partition)
        return out


def _dead_letter(record: SourceRecord, channel: str, rejection: Rejection) -> DeadLetter:
    return DeadLetter(record, channel, rejection.reason, rejection.detail)
