"""Identity state in a Faust global table: every worker holds all of it.

Each worker writes the identity operations it derived (links, timestamped facts, erasures) to the table, a
chunk per key, and every worker applies every chunk to its own copy of the graph. The graph is a function of
the set of operations, not their order, so the copies agree without coordination.

The table is a Faust GlobalTable with `use_partitioner` (writes from outside an agent, every changelog partition
a standby of every worker) and `recovery_buffer_size=1` (other workers' writes are applied as they come, not a
thousand at a time): its changelog topic is the identity log, it survives restarts and rebalances, and with
`identity.store = "rocksdb://"` it lives on disk and a restart reads only the changelog's tail. The table class
itself is in pipeline/adapters/worker.py, the one module that touches Faust's private members.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

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
