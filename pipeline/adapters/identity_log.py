"""The shared identity log: every worker publishes the identity operations it derived (links, facts, erasures)
and replays everyone's, from the start, into its own replica of the graph. The graph is a function of the set
of operations, not their order, so replicas agree without coordination; a restarted worker rebuilds its graph
by reading the log again before it processes a touchpoint.

One topic, read whole by every worker with manually assigned partitions (no consumer group): a group would
split the log between workers, and each needs all of it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.core.identity import Operation, decode_operation, encode_operation

log = logging.getLogger("touchpoint.identity")

ORIGIN_HEADER = "origin"
OPERATIONS_PER_RECORD = 2_000  # keeps a record far below the broker's default 1 MB limit


def encode_records(operations: Iterable[Operation]) -> list[bytes]:
    """Operations as JSON arrays, many to a Kafka record: the log carries few bytes and few records."""
    encoded = [encode_operation(op) for op in operations]
    return [json.dumps(encoded[i:i + OPERATIONS_PER_RECORD], separators=(",", ":")).encode()
            for i in range(0, len(encoded), OPERATIONS_PER_RECORD)]


def decode_record(value: bytes) -> list[Operation]:
    return [decode_operation(item) for item in json.loads(value)]


class IdentityLogReader:
    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.origin = uuid.uuid4().hex.encode()  # this process: its own records are already applied
        self._consumer: AIOKafkaConsumer
        self._partitions: list[TopicPartition] = []
        self.applied = 0

    async def start(self) -> None:
        # Created here: aiokafka binds to the running event loop.
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          max_partition_fetch_bytes=8 * 1024 * 1024)
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic)
        if not partitions:
            await self._consumer.stop()
            raise RuntimeError(f"identity log topic {self.topic!r} does not exist: run `touchpoint init`")
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)

    async def recover(self) -> list[Operation]:
        """Everything in the log up to now: the state this worker starts from."""
        ends = await self._consumer.end_offsets(self._partitions)
        operations: list[Operation] = []
        while await self._behind(ends):
            operations.extend(await self.poll(timeout_ms=500, own_too=True))
        log.info("Identity log replayed: %d operations", len(operations))
        return operations

    async def _behind(self, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return True
        return False

    async def poll(self, timeout_ms: int = 0, *, own_too: bool = False) -> list[Operation]:
        """What other workers published since the last poll (aiokafka fetches in the background)."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=50)
        operations: list[Operation] = []
        for records in batches.values():
            for record in records:
                if not own_too and (ORIGIN_HEADER, self.origin) in (record.headers or ()):
                    continue
                operations.extend(decode_record(record.value))
        self.applied += len(operations)
        return operations

    async def stop(self) -> None:
        await self._consumer.stop()
