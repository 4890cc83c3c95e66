"""Identity state in a Faust global table: every worker holds all of it.

Each worker writes the identity operations it derived (links, timestamped facts, erasures) to the table, a
chunk per key, and every worker applies every chunk to its own copy of the graph. The graph is a function of
the set of operations, not their order, so the copies agree without coordination.

The table is a Faust GlobalTable with `use_partitioner` (writes from outside an agent, every changelog partition
a standby of every worker) and `recovery_buffer_size=1` (other workers' writes are applied as they come, not a
thousand at a time): its changelog topic is the identity log, it survives restarts and rebalances, and with
`identity.store = "rocksdb://"` it lives on disk and a restart reads only the changelog's tail.
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from faust.streams import _current_event
from faust.tables.globaltable import GlobalTable

from pipeline.core.identity import Operation, decode_operation, encode_operation
from pipeline.settings import Settings
from pipeline.topics import identity_changelog_topic

OPERATIONS_PER_CHUNK = 2_000  # keeps a changelog record far below the broker's default 1 MB limit


def changelog_topic(settings: Settings) -> str:
    return identity_changelog_topic(settings)


def encode_chunks(operations: Iterable[Operation]) -> list[str]:
    """Operations as JSON arrays, many to a chunk: the log carries few bytes and few records."""
    encoded = [encode_operation(op) for op in operations]
    return [json.dumps(encoded[i:i + OPERATIONS_PER_CHUNK], separators=(",", ":"))
            for i in range(0, len(encoded), OPERATIONS_PER_CHUNK)]


def decode_chunk(value: str) -> list[Operation]:
    return [decode_operation(item) for item in json.loads(value)]


class _StandInMessage:
    partition = 0


class _StandInEvent:
    message = _StandInMessage()


class IdentityTable(GlobalTable):
    """Chunk key -> chunk of identity operations. Hands what other workers write to `on_operations`."""

    on_operations: Callable[[list[Operation]], None] | None = None
    origin: str = uuid.uuid4().hex  # this process: chunks it wrote are in its graph already

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        events = list(batch)
        super().apply_changelog_batch(events)
        if self.on_operations is None:
            return
        operations: list[Operation] = []
        for event in events:
            key, value = self._to_key(event.key), self._to_value(event.value)
            if value is not None and not str(key).startswith(self.origin):
                operations.extend(decode_chunk(value))
        if operations:
            self.on_operations(operations)

    def write(self, key: str, chunk: str) -> None:
        """Write a chunk from outside an agent. Faust's rocksdb store takes the partition of a write from the
        event being processed, even for a global table; the table has one partition, so a stand-in event on
        partition 0 is the truth, and the memory store ignores it."""
        stand_in = _StandInEvent()
        token = _current_event.set(weakref.ref(stand_in))
        try:
            self[key] = chunk
        finally:
            _current_event.reset(token)

    def all_operations(self) -> list[Operation]:
        """Everything in the table: what a (re)started worker builds its graph from."""
        operations: list[Operation] = []
        for value in self.values():
            operations.extend(decode_chunk(value))
        return operations


def new_identity_table(app: Any, settings: Settings) -> IdentityTable:
    table = IdentityTable(
        app, name=settings.identity.table, default=None, key_type=str, value_type=str, partitions=1,
        beacon=app.tables.beacon, is_global=True, use_partitioner=True, standby_buffer_size=1,
        recovery_buffer_size=1, help="Identity operations (links, facts, erasures), a chunk per key.",
    )
    app.tables.add(table)
    return table


def write_chunks(settings: Settings, chunks: list[str], prefix: str) -> None:
    """Write chunks into the table from outside a worker (erasure, the bench's preload), encoded as Faust does
    for str keys and values (JSON), so the workers' tables take them like their own."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, client_id=f"touchpoint-{prefix}",
                             max_request_size=8 * 1024 * 1024)
    try:
        batch = uuid.uuid4().hex
        for n, chunk in enumerate(chunks):
            producer.send(changelog_topic(settings), key=json.dumps(f"{prefix}:{batch}:{n}").encode(),
                          value=json.dumps(chunk).encode())
        producer.flush()
    finally:
        producer.close()
