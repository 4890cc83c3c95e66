"""The identity log: a compacted Kafka topic of identity operations, one record per operation's *log key*.

Every worker publishes the identity operations it derived (links, timestamped facts, erasures) and applies
everyone else's to its own graph. The graph is a function of the set of operations, not their order, so the
copies agree without coordination.

Keys (hashed, so no identifier shows in a key): an identifier's first-seen and first use have one key each (the
earliest wins: a worker that reads a later one republishes its earlier one, so the last write is the winner); a
link has one key per pair of identifiers; purchases, cancellations and contacts one per (identifier, time). A log
compacted by the broker therefore keeps the current state only, and an erasure deletes: the workers that apply a
Forget write a tombstone under every key of every erased identifier, and the Forget itself (the raw identifier)
is overwritten under its key by the identifier's SHA-256 only, which keeps replays of the person blocked.

A worker keeps its graph in a local store with the offset of the log it has applied (`meta.log_offset`): at start
it reads only the log's tail from there (all of it on a first start), before it joins the consumer group.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from pipeline.core.identity import (
    Fact,
    FactKind,
    Forget,
    Forgotten,
    GraphState,
    IdentityConfig,
    IdentityGraph,
    Link,
    Operation,
    Unmerge,
    decode_operation,
    encode_operation,
    identifier_hash,
)
from pipeline.settings import Settings
from pipeline.topics import identity_changelog_topic

log = logging.getLogger("touchpoint.identity")

ORIGIN_HEADER = "origin"
APPLY_BATCH = 20_000  # operations applied to the graph between two offset saves during a catch-up


def changelog_topic(settings: Settings) -> str:
    """The identity log's topic (named as Faust named the identity table's changelog, which it replaces)."""
    return identity_changelog_topic(settings)


def logical_key(op: Operation) -> str:
    if isinstance(op, Link):
        return f"L\x00{op.a}\x00{op.b}"
    if isinstance(op, Fact):
        if op.kind in (FactKind.SEEN, FactKind.USE):
            return f"{op.kind.value}\x00{op.identifier}"
        return f"{op.kind.value}\x00{op.identifier}\x00{op.at_ms}"
    if isinstance(op, Forget):
        return f"X\x00{identifier_hash(op.identifier)}"
    if isinstance(op, Unmerge):  # one key per pair: the latest unmerge of it is what a new worker must know
        return f"U\x00{op.a}\x00{op.b}"
    return f"X\x00{op.identifier_hash}"


def log_key(op: Operation) -> bytes:
    return hashlib.blake2b(logical_key(op).encode(), digest_size=16).hexdigest().encode()


def log_value(op: Operation) -> bytes:
    return json.dumps(encode_operation(op), separators=(",", ":")).encode()


def log_records(operations: Iterable[Operation], erased: Iterable[Operation] = ()) -> list[tuple[bytes, bytes | None]]:
    """(key, value) records for operations to publish and operations an erasure removed (tombstones, except the
    erasure's own key, which keeps the SHA-256 marker)."""
    records: list[tuple[bytes, bytes | None]] = [(log_key(op), log_value(op)) for op in operations]
    for op in erased:
        records.append((log_key(op), log_value(op) if isinstance(op, Forgotten) else None))
    return records


def decode_record(value: bytes) -> Operation:
    return decode_operation(json.loads(value))


def write_operations(settings: Settings, operations: Iterable[Operation], client: str,
                     erased: Iterable[Operation] = ()) -> int:
    """Write operations to the log from outside a worker (erasure, the bench's preload)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, client_id=f"touchpoint-{client}",
                             linger_ms=20, batch_size=512 * 1024, max_request_size=8 * 1024 * 1024)
    count = 0
    try:
        topic = changelog_topic(settings)
        for key, value in log_records(operations, erased):
            producer.send(topic, key=key, value=value, partition=0)
            count += 1
        producer.flush()
    finally:
        producer.close()
    return count


def _consumer(settings: Settings) -> Any:
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False,
                         group_id=None, client_id="touchpoint-identity-log", max_poll_records=50_000,
                         fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=32 * 1024 * 1024)


Send = Callable[[bytes, bytes | None, list[tuple[str, bytes]]], Awaitable[Any]]


class KafkaIdentityLog:
    """The IdentityLog port on a Kafka topic: a catch-up read into the local graph store, then a thread that tails
    the log; this process's own records (origin header) are in its graph already and are skipped."""

    def __init__(self, settings: Settings, state: GraphState, config: IdentityConfig, send: Send,
                 flush: Callable[[], Awaitable[None]]) -> None:
        self.settings = settings
        self.topic = changelog_topic(settings)
        self.state = state
        self.config = config
        self._meta = state.mapping("meta")
        self._send = send
        self._flush = flush
        self.origin = uuid.uuid4().hex.encode()
        self._sending: list[asyncio.Future[None]] = []
        self._incoming: list[Operation] = []
        self._incoming_next: int | None = None  # the log offset after the last operation read
        self._handed_next: int | None = None  # ...and after the last one handed to the runner
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self.caught_up_operations = -1  # operations applied by the catch-up; -1 until it ran

    # -- start-up -------------------------------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Apply the log from the stored offset to its end to the graph store, then start tailing it. Blocking:
        runs before the worker joins the consumer group. Returns the operations applied."""
        if self.caught_up_operations >= 0:
            return self.caught_up_operations
        from kafka import TopicPartition

        from pipeline.adapters.kafka import ensure_topics

        started = time.monotonic()
        kafka = self.settings.kafka
        ensure_topics(kafka.bootstrap_servers, {self.topic: 1}, kafka.replication_factor,
                      config={"cleanup.policy": "compact"})  # as `touchpoint init` does, if it was not run
        consumer = self._consumer = _consumer(self.settings)
        tp = TopicPartition(self.topic, 0)
        consumer.assign([tp])
        beginning = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        stored = self._meta.get("log_offset")
        if stored is not None and stored < beginning:
            log.warning("The identity store's log offset %d is before the log's start (%d): reading it whole",
                        stored, beginning)
            stored = None
        position = beginning if stored is None else stored
        consumer.seek(tp, position)
        graph = IdentityGraph(self.config, self.state)
        applied = 0
        batch: list[Operation] = []
        while position < end:
            for record in consumer.poll(timeout_ms=1_000).get(tp, []):
                position = record.offset + 1
                if record.value is not None:
                    batch.append(decode_record(record.value))
            if len(batch) >= APPLY_BATCH or position >= end:
                graph.apply(batch)
                graph.take_changes()
                applied += len(batch)
                batch = []
                self._meta["log_offset"] = position
        self._incoming_next = self._handed_next = position
        log.info("Identity log read from offset %s to %d: %d operations in %.1f s (graph: %d identifiers)",
                 "the start" if stored is None else stored, end, applied, time.monotonic() - started, len(graph))
        self.caught_up_operations = applied
        self._thread = threading.Thread(target=self._tail, name="identity-log", daemon=True)
        self._thread.start()
        return applied

    def _tail(self) -> None:
        consumer = self._consumer
        origin = self.origin
        while not self._stop.is_set():
            try:
                fetched = consumer.poll(timeout_ms=200)
            except Exception:  # the broker away: keep trying, the worker's own loop reports the outage
                log.exception("Reading the identity log failed; retrying")
                time.sleep(1)
                continue
            for records in fetched.values():
                ops = []
                for record in records:
                    if record.value is None or (ORIGIN_HEADER, origin) in (record.headers or []):
                        continue
                    ops.append(decode_record(record.value))
                with self._lock:
                    self._incoming.extend(ops)
                    self._incoming_next = records[-1].offset + 1

    def close(self) -> None:
        """Stop tailing; the store keeps the offset read so far if everything read is applied (a restart then
        reads nothing this worker has seen)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            # Nothing waiting: everything read was this worker's own or handed to the runner, which applies what it
            # takes at once.
            applied = not self._incoming
            next_offset = self._incoming_next
        if next_offset is not None:
            self._meta["log_offset"] = next_offset if applied else self._meta.get("log_offset", 0)
        if self._consumer is not None:
            self._consumer.close()
        close_state = getattr(self.state, "close", None)
        if close_state is not None:
            close_state()

    # -- the IdentityLog port ---------------------------------------------------------------------------------

    def initial_operations(self) -> list[Operation]:
        """Nothing: the catch-up applied the log to the graph store before the worker started."""
        self.catch_up()
        return []

    def take_incoming(self) -> list[Operation]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            next_offset = self._incoming_next
        # The runner applies what it takes before it takes again: the previous hand-over is in the graph now.
        handed = self._handed_next
        if handed is not None and self._meta.get("log_offset") != handed:
            self._meta["log_offset"] = handed
        self._handed_next = next_offset
        return incoming

    def publish(self, operations: Sequence[Operation]) -> None:
        self._start_sending(log_records(operations))

    def drop(self, erased: Sequence[Operation]) -> None:
        self._start_sending(log_records((), erased))

    def _start_sending(self, records: list[tuple[bytes, bytes | None]]) -> None:
        if records:
            self._sending.append(asyncio.ensure_future(self._send_all(records)))

    async def _send_all(self, records: list[tuple[bytes, bytes | None]]) -> None:
        headers = [(ORIGIN_HEADER, self.origin)]
        for key, value in records:
            await self._send(key, value, headers)

    async def flush(self) -> None:
        sending, self._sending = self._sending, []
        for task in sending:
            await task
        await self._flush()
