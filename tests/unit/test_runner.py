"""The runner's rules of delivery, with in-memory fakes for Kafka and ClickHouse and an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.core.aggregate import NEVER, Checkpoint, WindowCell
from pipeline.core.identity import Operation, Unmerge, audit_id_of, person_id_of
from pipeline.core.processor import DeadLetter, Output, Restatement, TouchpointProcessor
from pipeline.runtime.deadletters import HEADROOM_BYTES, dead_letter_message
from pipeline.runtime.runner import DeliveryPolicy, Runner, StoreUnavailable
from tests.factories import BASE_MS, encode, identity_config, schema_for, task, window_config

MINUTE = 60_000


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    headers: Sequence[tuple[str, bytes]] = ()


class Journal:
    """Everything the fakes were asked to do, in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []

    def add(self, what: str, detail: Any = None) -> None:
        self.entries.append((what, detail))

    def names(self) -> list[str]:
        return [name for name, _ in self.entries]


class FakeStore:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.failures_left = 0
        self.rows: dict[str, Any] = {}  # event_id -> row: a re-written row replaces the first, as in ClickHouse
        self.cells: list[WindowCell] = []
        self.checkpoints: dict[int, Checkpoint] = {}

    def write(self, output: Output) -> None:
        if self.failures_left:
            self.failures_left -= 1
            self.journal.add("store.fail")
            raise ConnectionError("ClickHouse is down")
        for row in [*output.touchpoints, *output.restated]:
            self.rows[row.event_id] = row
        self.cells.extend(output.window_cells)
        self.checkpoints.update(output.checkpoints)
        self.journal.add("store.write", sorted(row.event_id for row in [*output.touchpoints, *output.restated]))

    def rows_to_restate(self, restatement: Restatement) -> list[Any]:
        self.journal.add("store.rows_to_restate", sorted(restatement.since))
        return [row for row in self.rows.values() if row.source_partition in restatement.partitions
                and any(i in restatement.since for i in row.resolved_from)]

    def load_checkpoint(self, partition: int) -> Checkpoint | None:
        return self.checkpoints.get(partition)

    def recent_panes(self, partition: int, before_ms: int, count: int) -> list[WindowCell]:
        return [c for c in self.cells if c.partition == partition and c.window_kind == "1m"
                and before_ms - count * MINUTE <= c.window_start_ms < before_ms]

    def pane_event_ids(self, partition: int, from_ms: int, before_offset: int) -> list[tuple[int, str]]:
        return [(row.event_time_ms, row.event_id) for row in self.rows.values()
                if row.source_partition == partition and row.counted and row.source_offset < before_offset
                and row.event_time_ms >= from_ms]


class FakeDeadLetters:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sent: list[DeadLetter] = []

    async def send(self, dead: DeadLetter) -> None:
        self.sent.append(dead)
        self.journal.add("deadletter.send", dead.record.offset)

    async def flush(self) -> None:
        self.journal.add("deadletter.flush")


class FakeIdentityLog:
    def __init__(self, journal: Journal, initial: list[Operation] | None = None) -> None:
        self.journal = journal
        self.initial = initial or []
        self.incoming: list[Operation] = []
        self.published: list[Operation] = []
        self.dropped: list[Operation] = []

    def initial_operations(self) -> list[Operation]:
        return list(self.initial)

    def take_incoming(self) -> list[Operation]:
        incoming, self.incoming = self.incoming, []
        return incoming

    def publish(self, operations: Sequence[Operation]) -> None:
        self.published.extend(operations)
        self.journal.add("identity.publish", len(operations))

    def drop(self, erased: Sequence[Operation]) -> None:
        self.dropped.extend(erased)
        self.journal.add("identity.drop", len(erased))

    async def flush(self) -> None:
        self.journal.add("identity.flush")


class FakeOffsets:
    def __init__(self, journal: Journal, partitions: set[int]) -> None:
        self.journal = journal
        self.partitions = set(partitions)
        self.committed_offsets: dict[int, int] = {}
        self.high: dict[int, int] = {}
        self.read: dict[int, int] = {}
        self.fail_commits = False
        self.log_start: dict[int, int] = {}

    def assigned(self) -> set[int]:
        return set(self.partitions)

    def committed(self, partition: int) -> int | None:
        return self.committed_offsets.get(partition)

    def position(self, partition: int) -> int | None:
        return self.read.get(partition)

    def highwater(self, partition: int) -> int | None:
        return self.high.get(partition)

    async def seek(self, partition: int, offset: int) -> None:
        self.read[partition] = offset
        self.journal.add("seek", (partition, offset))

    async def earliest(self, partition: int) -> int | None:
        return self.log_start.get(partition, 0)

    async def commit(self, offsets: Mapping[int, int]) -> None:
        if self.fail_commits:
            raise RuntimeError("rebalance in progress")
        self.committed_offsets.update(offsets)
        self.journal.add("commit", dict(offsets))


@dataclass
class FakeClock:
    now: int = BASE_MS + 10 * MINUTE
    mono: float = 1_000.0
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Callable[[], None] | None = None

    def now_ms(self) -> int:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.now += int(seconds * 1000)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        if self.on_sleep is not None:
            self.on_sleep()
        await asyncio.sleep(0)  # like a real sleep, lets the fetch loop run meanwhile


class FakeObserver:
    def __init__(self) -> None:
        self.flushes: list[Output] = []
        self.failures: list[tuple[int, float]] = []
        self.commit_failures = 0
        self.lag: dict[int, int | None] = {}
        self.heartbeats: list[float] = []
        self.forgotten: list[int] = []
        self.last_flush_at: float | None = None

    def flushed(self, output: Output, at_s: float) -> None:
        self.flushes.append(output)
        self.last_flush_at = at_s

    def store_failed(self, error: BaseException, attempt: int, retry_in_s: float) -> None:
        self.failures.append((attempt, retry_in_s))

    def commit_failed(self, error: BaseException) -> None:
        self.commit_failures += 1

    def progress(self, partition: int, lag: int | None, watermark_ms: int | None, now_ms: int) -> None:
        self.lag[partition] = lag

    def heartbeat(self, at_s: float) -> None:
        self.heartbeats.append(at_s)

    def identifiers(self, count: int) -> None:
        pass

    def forget(self, partition: int) -> None:
        self.forgotten.append(partition)


async def _direct(call: Callable[[], Any]) -> Any:
    return call()  # no thread: the fakes do not block, and the order of events stays deterministic


class Harness:
    def __init__(self, partitions: set[int] = frozenset({0}), *, max_events: int = 1_000, max_wait_s: float = 1.0,
                 identity: FakeIdentityLog | None = None,
                 snapshot_interval_ms: int | None = None, progress_every_s: float = 1.0) -> None:
        self.journal = Journal()
        self.store = FakeStore(self.journal)
        self.dead_letters = FakeDeadLetters(self.journal)
        self.identity = identity
        if identity is not None:
            identity.journal = self.journal
        self.offsets = FakeOffsets(self.journal, set(partitions))
        self.clock = FakeClock()
        self.observer = FakeObserver()
        config = window_config(MINUTE, 5_000, 300_000, 30_000)
        processor = TouchpointProcessor(config, schema_for, identity_config(), identity_enabled=identity is not None,
                                        snapshot_interval_ms=snapshot_interval_ms)
        self.runner = Runner(processor, store=self.store, dead_letters=self.dead_letters, identity_log=identity,
                             offsets=self.offsets, clock=self.clock, observer=self.observer,
                             policy=DeliveryPolicy(max_events, max_wait_s, retry_initial_s=0.5, retry_max_s=4.0,
                                                   progress_every_s=progress_every_s),
                             run_blocking=_direct)

    def records(self, partition: int, start: int, events: list[dict[str, Any]]) -> list[Record]:
        return [Record(partition, start + n, encode(e)) for n, e in enumerate(events)]


def close_windows(h: Harness, read: Mapping[int, int]) -> None:
    """Every record read and the partitions quiet past the session gap: every window closes, so checkpoints may
    commit up to the last record."""
    h.clock.advance(40 * 60)
    for partition, offset in read.items():
        h.offsets.high[partition] = h.offsets.read[partition] = offset
    h.runner.processor.tick(h.clock.now_ms(), set(read))


def _tasks(n: int, *, prefix: str = "t", outcome: str = "SUCCESS", at: int = BASE_MS) -> list[dict[str, Any]]:
    return [task(outcome, event_id=f"{prefix}{i}", event_time=at + i * 100, user_id=f"u{i % 3}") for i in range(n)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_dead_letters_are_flushed_before_the_checkpoint_is_stored_and_offsets_committed_after_it():
    h = Harness()

    async def scenario() -> None:
        records = h.records(0, 0, _tasks(3))
        records.insert(1, Record(0, 99, b"not avro"))  # a poison record among good ones
        records = [Record(0, n, r.value) for n, r in enumerate(records)]
        await h.runner.on_records({0: records})
        close_windows(h, {0: 4})
        await h.runner.flush(wait=True)

    run(scenario())
    names = h.journal.names()
    # The checkpoint moves a restart past these records: their dead letters must be on Kafka before it is stored.
    assert names.index("deadletter.send") < names.index("deadletter.flush") < names.index("store.write") \
        < names.index("commit")
    assert h.store.rows.keys() == {"t0", "t1", "t2"}
    assert [d.reason for d in h.dead_letters.sent] == ["undecodable"]
    assert h.offsets.committed_offsets == {0: 4}  # the dead letter's offset is committed like the others


def test_identity_operations_reach_the_log_before_the_commit():
    h = Harness(identity=FakeIdentityLog(Journal()))

    async def scenario() -> None:
        events = [task("SUCCESS", event_id="a", event_time=BASE_MS, user_id="u1", anonymous_id="anon-1")]
        await h.runner.on_records({0: h.records(0, 0, events)})
        close_windows(h, {0: 1})
        await h.runner.flush(wait=True)

    run(scenario())
    names = h.journal.names()
    assert "identity.publish" in names and "commit" in names
    assert names.index("identity.publish") < names.index("identity.flush") < names.index("store.write") \
        < names.index("commit")
    assert h.offsets.committed_offsets == {0: 1}


def test_a_failing_store_is_retried_with_a_bounded_backoff_and_nothing_is_committed_meanwhile():
    h = Harness()
    h.store.failures_left = 5
    commits_during_failures: list[dict[int, int]] = []
    h.clock.on_sleep = lambda: commits_during_failures.append(dict(h.offsets.committed_offsets))

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(4))})
        await h.runner.flush(wait=True)

    run(scenario())
    assert h.clock.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped at retry_max_s
    assert [attempt for attempt, _ in h.observer.failures] == [1, 2, 3, 4, 5]
    assert all(c == {} for c in commits_during_failures)
    assert h.store.rows.keys() == {"t0", "t1", "t2", "t3"}
    assert len(h.observer.flushes) == 1


def test_a_stop_does_not_wait_for_a_store_that_keeps_failing_and_commits_nothing():
    h = Harness()
    h.store.failures_left = 10**6

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(2))})
        with pytest.raises(StoreUnavailable):
            await h.runner.stop()

    run(scenario())
    assert h.offsets.committed_offsets == {}
    assert h.clock.sleeps == []  # no retry once stopping


def test_the_stop_flushes_what_was_buffered_and_commits_it():
    h = Harness(max_wait_s=60)

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(5))})
        assert h.store.rows == {}  # below max_events and max_wait: still buffered
        close_windows(h, {0: 5})
        await h.runner.stop()

    run(scenario())
    assert h.store.rows.keys() == {f"t{i}" for i in range(5)}
    assert h.offsets.committed_offsets == {0: 5}


def test_flush_policy_by_size_and_by_age():
    h = Harness(max_events=10, max_wait_s=1.0)

    def writes() -> int:
        return h.journal.names().count("store.write")

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(4, prefix="a"))})
        await h.runner.on_idle()
        h.clock.advance(0.5)
        await h.runner.on_idle()
        assert writes() == 0  # young and small: waits
        h.clock.advance(0.6)
        await h.runner.on_idle()  # the oldest record waited past max_wait_s
        await h.runner.flush(wait=True)
        assert writes() == 1
        await h.runner.on_records({0: h.records(0, 4, _tasks(6, prefix="b", at=BASE_MS + 500))})
        assert writes() == 1
        await h.runner.on_records({0: h.records(0, 10, _tasks(4, prefix="c", at=BASE_MS + 1_200))})
        await h.runner.flush(wait=True)  # waits for the write the size trigger started
        assert writes() == 2

    run(scenario())
    assert set(h.store.rows) == {*(f"a{i}" for i in range(4)), *(f"b{i}" for i in range(6)),
                                 *(f"c{i}" for i in range(4))}


def test_size_trigger_flushes_without_waiting_for_the_clock():
    h = Harness(max_events=5, max_wait_s=3600)

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(5))})
        await h.runner.flush(wait=True)  # waits for the write the size trigger started; adds nothing

    run(scenario())
    assert h.journal.names().count("store.write") == 1


def test_a_revoked_partition_is_dropped_and_its_offsets_are_not_committed():
    h = Harness(partitions={0, 1})

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(2, prefix="p0")),
                                   1: h.records(1, 0, _tasks(2, prefix="p1"))})
        h.offsets.partitions = {0}
        h.runner.revoke({1})
        close_windows(h, {0: 2})
        await h.runner.stop()

    run(scenario())
    assert h.observer.forgotten == [1]
    assert not h.runner.processor.owns(1)
    assert h.offsets.committed_offsets == {0: 2}  # partition 1's next owner replays it


def test_a_failed_commit_is_reported_and_the_next_one_covers_it():
    h = Harness()

    async def scenario() -> None:
        h.offsets.fail_commits = True
        await h.runner.on_records({0: h.records(0, 0, _tasks(2))})
        close_windows(h, {0: 2})
        await h.runner.flush(wait=True)
        assert h.observer.commit_failures == 1 and h.offsets.committed_offsets == {}
        h.offsets.fail_commits = False
        await h.runner.on_records({0: h.records(0, 2, _tasks(1, prefix="n", at=BASE_MS + 40 * MINUTE))})
        close_windows(h, {0: 3})
        await h.runner.stop()

    run(scenario())
    assert h.offsets.committed_offsets == {0: 3}


def test_a_checkpoint_is_used_only_when_the_group_has_a_committed_offset():
    h = Harness(partitions={0, 1})
    for partition in (0, 1):
        h.store.checkpoints[partition] = Checkpoint(partition, 7, 9, BASE_MS + 3 * MINUTE, BASE_MS + 3 * MINUTE)
    h.offsets.committed_offsets = {0: 7}  # partition 1: the topic was recreated, nothing committed

    run(h.runner.sync_assignment())
    windows = h.runner.processor.partitions
    assert windows[0].closed_before_ms == BASE_MS + 3 * MINUTE and windows[0].next_offset == 7
    assert windows[1].next_offset == 0 and windows[1].closed_before_ms < BASE_MS


def test_lag_and_heartbeat_are_reported_while_the_store_keeps_failing():
    h = Harness(max_wait_s=0.1, progress_every_s=0.01)
    h.store.failures_left = 10**6
    h.offsets.high[0] = 3

    def traffic_keeps_arriving() -> None:
        h.offsets.high[0] += 50

    h.clock.on_sleep = traffic_keeps_arriving

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _tasks(3))})
        h.clock.advance(1)
        await h.runner.on_idle()  # starts the failing write in the background
        await h.runner.on_records({0: h.records(0, 3, _tasks(3, prefix="n", at=BASE_MS + 400))})
        h.clock.advance(1)
        blocked = asyncio.ensure_future(h.runner.on_idle())  # its flush waits for the failing write
        await asyncio.sleep(0.2)
        assert not blocked.done()
        heartbeats = len(h.observer.heartbeats)
        await asyncio.sleep(0.1)
        assert len(h.observer.heartbeats) > heartbeats  # the fetch loop waits, and still says it is alive
        h.runner.request_stop()
        with pytest.raises(StoreUnavailable):
            await blocked

    run(scenario())
    assert h.observer.lag[0] is not None and h.observer.lag[0] >= 50  # growing, not the 0 of a last good write
    assert h.observer.last_flush_at is None


def test_closed_windows_are_stored_at_once_and_the_worker_writes_no_alerts():
    """The alerter judges windows from the store: a window that closes goes out without waiting for a full batch or
    max_wait, and the worker judges nothing itself."""
    h = Harness(max_events=1_000, max_wait_s=3_600.0)

    async def scenario() -> None:
        closer = task("SUCCESS", event_id="late-closer", event_time=BASE_MS + 3 * MINUTE, user_id="u9")
        await h.runner.on_records({0: h.records(0, 0, [*_tasks(10, outcome="FAILURE"), closer])})
        assert "store.write" not in h.journal.names()  # a batch of 11 is far from full, and max_wait is an hour
        await h.runner.on_idle()
        await h.runner._drain()  # the write on_idle started, in flight

    run(scenario())
    errors = [c for c in h.store.cells if c.indicator == "error_rate" and c.window_start_ms == BASE_MS]
    assert errors and sum(c.count for c in errors) == 10 and sum(c.total for c in errors) == 10
    assert not any(name.startswith("store.alert") for name in h.journal.names())


def test_initial_identity_operations_are_applied_before_the_first_record_and_incoming_ones_flushed():
    from pipeline.core.identity import Link

    ready: list[int] = []
    identity = FakeIdentityLog(Journal(), initial=[Link(BASE_MS, "anonymous_id:x", "user_id:u-known", "e0")])
    h = Harness(identity=identity)
    h.runner._on_ready = lambda: ready.append(len(h.runner.processor.enricher.graph or ()))

    async def scenario() -> None:
        events = [task("SUCCESS", event_id="a", event_time=BASE_MS + 1, anonymous_id="x")]
        await h.runner.on_records({0: h.records(0, 0, events)})
        await h.runner.flush(wait=True)

    run(scenario())
    assert ready and ready[0] >= 2  # the graph was built before the first touchpoint
    graph = h.runner.processor.enricher.graph
    assert graph is not None
    known = graph.resolve(["user_id:u-known"], BASE_MS + 1)
    row = h.store.rows["a"]
    assert row.person_id == known.person_id  # the anonymous id resolved through the initial link
    assert row.person_id != graph.resolve(["anonymous_id:never-linked"], BASE_MS + 1).person_id


def test_an_oversized_dead_letter_goes_without_its_bytes_but_with_the_reason_size_and_source():
    small = DeadLetter(Record(2, 41, b"x" * 100), "unknown", "undecodable", "bad magic byte")
    big = DeadLetter(Record(2, 42, b"x" * 2_000_000), "unknown", "undecodable", "bad magic byte")
    message = dead_letter_message(small, "touchpoints", 1_048_576)
    assert message.value == b"x" * 100 and dict(message.headers)["source.offset"] == b"41"
    message = dead_letter_message(big, "touchpoints", 1_048_576)
    headers = dict(message.headers)
    assert message.value is None
    assert headers["reason"] == b"undecodable" and headers["source.size"] == b"2000000"
    assert headers["source.offset"] == b"42" and headers["source.partition"] == b"2"
    edge = DeadLetter(Record(0, 1, b"x" * (1_048_576 - HEADROOM_BYTES - 1), key=None), "WEB", "r", "d")
    assert dead_letter_message(edge, "t", 1_048_576).value is not None


def test_a_restart_resumes_from_the_snapshot_and_replays_only_what_came_after_it():
    events = [task(("SUCCESS", "FAILURE")[i % 2], event_id=f"e{i}", event_time=BASE_MS + i * 1_000,
                   user_id=f"u{i % 4}") for i in range(40)]
    first = Harness(snapshot_interval_ms=5_000)

    async def before_the_kill() -> None:
        records = first.records(0, 0, events)
        await first.runner.on_records({0: records[:25]})
        await first.runner.flush(wait=True)  # a checkpoint with the snapshot of everything up to offset 25
        first.clock.advance(1)
        await first.runner.on_records({0: records[25:30]})
        await first.runner.flush(wait=True)  # stored, but within the snapshot interval: no new checkpoint

    run(before_the_kill())
    assert first.offsets.committed_offsets == {0: 25}  # the commit follows the snapshot, not the open sessions

    second = Harness(snapshot_interval_ms=5_000)  # a new worker on the same store and group
    second.store = first.store
    second.runner.store = first.store
    first.store.journal = second.journal
    second.offsets.committed_offsets = {0: 22}  # the last commit before a kill may lag the stored checkpoint

    async def after_the_restart() -> None:
        records = second.records(0, 0, events)
        await second.runner.on_records({0: records[22:30]})  # from the committed offset: 22-24 are in the snapshot
        await second.runner.on_records({0: records[25:]})  # a batch fetched again: what was folded in is skipped
        close_windows(second, {0: 40})
        await second.runner.stop()

    run(after_the_restart())
    assert "seek" not in second.journal.names()  # the records after the snapshot were already in the batch
    written = [ids for name, ids in second.journal.entries if name == "store.write"]
    replayed = {event_id for ids in written for event_id in ids}
    assert replayed == {f"e{i}" for i in range(25, 40)}  # only what came after the snapshot, once
    uninterrupted = Harness()

    async def straight() -> None:
        await uninterrupted.runner.on_records({0: uninterrupted.records(0, 0, events)})
        close_windows(uninterrupted, {0: 40})
        await uninterrupted.runner.stop()

    run(straight())

    def counted(cells: list[WindowCell]) -> dict[tuple, tuple[float, float]]:
        by_key: dict[tuple, tuple[float, float]] = {}
        for c in cells:  # a rewritten cell replaces the stored one, as in ClickHouse
            by_key[(c.window_kind, c.window_start_ms, c.key)] = (c.count, c.total)
        return by_key

    assert counted(first.store.cells) == counted(uninterrupted.store.cells)


def test_a_replay_from_a_held_back_offset_sends_the_consumer_back_and_skips_what_it_fetched_before():
    h = Harness()
    # A stateless checkpoint (an older worker's): replay from offset 3 although the group committed 8.
    h.store.checkpoints[0] = Checkpoint(0, 3, 8, BASE_MS + 5_000, NEVER, NEVER, NEVER)
    h.offsets.committed_offsets = {0: 8}
    events = [task("SUCCESS", event_id=f"e{i}", event_time=BASE_MS + i * 1_000, user_id="u") for i in range(12)]

    async def scenario() -> None:
        records = h.records(0, 0, events)
        await h.runner.on_records({0: records[8:]})  # fetched from the committed offset: a gap after offset 3
        assert h.journal.entries[-1] == ("seek", (0, 3)) and h.runner.processor.output.records == 0
        await h.runner.on_records({0: records[9:]})  # a stale prefetched batch: still skipped
        await h.runner.on_records({0: records[3:]})  # from the seek on
        close_windows(h, {0: 12})
        await h.runner.stop()

    run(scenario())
    assert h.store.rows.keys() == {f"e{i}" for i in range(3, 12)}
    assert h.offsets.committed_offsets == {0: 12}


def test_a_forward_gap_sends_the_consumer_back_unless_retention_removed_the_records():
    h = Harness(partitions={0, 1})
    h.offsets.log_start = {1: 100}  # partition 1's older records are past retention
    events = [task("SUCCESS", event_id=f"e{i}", event_time=BASE_MS + i * 1_000, user_id="u") for i in range(20)]

    async def scenario() -> None:
        records = h.records(0, 0, events[:10])
        await h.runner.on_records({0: records[:4], 1: [Record(1, 100 + n, r.value) for n, r in
                                                       enumerate(h.records(1, 0, events[10:]))]})
        assert h.runner.processor.partitions[1].next_offset == 110  # started where the log starts
        # A rebalance sought the consumer past what partition 0's windows hold (another worker's commit).
        await h.runner.on_records({0: records[7:]})
        assert ("seek", (0, 4)) in h.journal.entries
        await h.runner.on_records({0: records[4:]})
        await h.runner.flush(wait=True)

    run(scenario())
    assert {f"e{i}" for i in range(20)} == h.store.rows.keys()


def _unmerge_of_first_merge(h: Harness) -> Unmerge:
    merge = next(a for f in h.observer.flushes for a in f.identity.audit if a.action == "merge")
    return Unmerge(merge.identifier_a, merge.identifier_b, BASE_MS + 10 * MINUTE,
                   audit_id_of("merge", merge.identifier_a, merge.identifier_b, merge.at_ms, merge.event_id))


_SIGNIN_THEN_DEVICE = [task("SUCCESS", event_id="signin", event_time=BASE_MS, user_id="u", anonymous_id="dev"),
                       task("FAILURE", event_id="later", event_time=BASE_MS + 1_000, user_id=None, anonymous_id="dev")]


def test_an_unmerge_from_the_log_restates_stored_rows_in_the_flush_that_commits_after_it():
    h = Harness(identity=FakeIdentityLog(Journal()))

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _SIGNIN_THEN_DEVICE)})
        await h.runner.flush(wait=True)
        assert h.store.rows["later"].person_id == person_id_of("user_id:u")
        assert h.identity is not None
        h.identity.incoming = [_unmerge_of_first_merge(h)]
        await h.runner.on_records({0: h.records(0, 2, [task("SUCCESS", event_id="next", event_time=BASE_MS + 2_000,
                                                             user_id=None, anonymous_id="dev")])})
        close_windows(h, {0: 3})
        await h.runner.flush(wait=True)

    run(scenario())
    after = h.journal.names()[h.journal.names().index("store.rows_to_restate"):]
    # Read back, then the restated row written with the records read since, and only then the commit.
    stores = [entry for entry in h.journal.entries[-len(after):] if entry[0].startswith("store.")]
    assert stores == [("store.rows_to_restate", ["anonymous_id:dev", "user_id:u"]), ("store.write", ["later", "next"])]
    assert after.index("store.write") < after.index("commit")
    assert {e: r.person_id for e, r in h.store.rows.items()} == {
        "signin": person_id_of("user_id:u"), "later": person_id_of("anonymous_id:dev"),
        "next": person_id_of("anonymous_id:dev")}


def test_rows_still_buffered_when_an_unmerge_arrives_are_restated_before_their_first_write():
    h = Harness(identity=FakeIdentityLog(Journal()))

    async def scenario() -> None:
        await h.runner.on_records({0: h.records(0, 0, _SIGNIN_THEN_DEVICE)})
        merge = h.runner.processor.enricher.graph.changes.audit[-1]  # type: ignore[union-attr]
        assert h.identity is not None
        h.identity.incoming = [Unmerge(merge.identifier_a, merge.identifier_b, BASE_MS + 10 * MINUTE, "id")]
        await h.runner.sync_assignment()
        await h.runner.flush(wait=True)

    run(scenario())
    assert h.journal.entries[0][0] == "store.rows_to_restate"
    assert [(r.event_id, r.person_id) for r in h.observer.flushes[0].touchpoints] == [
        ("signin", person_id_of("user_id:u")), ("later", person_id_of("anonymous_id:dev"))]
    assert not h.observer.flushes[0].restated  # written once, already right
