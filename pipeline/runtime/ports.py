"""What the runner needs from the world, as small interfaces: the adapters (Faust/Kafka, ClickHouse, Prometheus)
implement them in production, and in-memory fakes stand in for them in the runner's unit tests."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from pipeline.core.aggregate import Checkpoint, WindowCell
from pipeline.core.identity import Operation
from pipeline.core.processor import DeadLetter, Output, Restatement, TouchpointRow


class Store(Protocol):
    """Durable storage of what the core produces (ClickHouse). Blocking calls: the runner runs them in a thread.
    Every write is idempotent: writing the same output twice leaves the same rows."""

    def write(self, output: Output) -> None:
        """Rows, cells and identity records, then the checkpoints last, so a checkpoint never claims rows that
        are not there."""

    def load_checkpoint(self, partition: int) -> Checkpoint | None: ...

    def rows_to_restate(self, restatement: Restatement) -> list[TouchpointRow]:
        """The stored rows (one per event) of the restatement's partitions resolved from one of its identifiers,
        with event times from that identifier's time on, found through the tables ordered by person."""

    def recent_panes(self, partition: int, before_ms: int, count: int) -> list[WindowCell]: ...

    def pane_event_ids(self, partition: int, from_ms: int, before_offset: int) -> list[tuple[int, str]]:
        """(event time, event id) of the partition's counted touchpoints read before `before_offset` with event
        times from `from_ms` on: the dedup sets of the panes open at a checkpoint."""


class DeadLetters(Protocol):
    """The dead-letter topic. send() may only enqueue; flush() returns once everything sent is acknowledged."""

    async def send(self, dead: DeadLetter) -> None: ...

    async def flush(self) -> None: ...


class IdentityLog(Protocol):
    """The shared log of identity operations: every worker publishes what it derived and applies the others'."""

    def initial_operations(self) -> list[Operation]:
        """What the graph must still apply when this worker starts (a log with a local store of its own may have
        applied everything already and return nothing)."""

    def take_incoming(self) -> list[Operation]:
        """Other workers' operations received since the last call."""

    def publish(self, operations: Sequence[Operation]) -> None:
        """Enqueue this worker's operations; they reach the log by the next flush()."""

    def drop(self, erased: Sequence[Operation]) -> None:
        """Enqueue the removal of operations an erasure took out of the graph (tombstones in a keyed log)."""

    async def flush(self) -> None: ...


class Offsets(Protocol):
    """The consumer's view of the touchpoint topic's partitions (Kafka offsets; partition numbers only)."""

    def assigned(self) -> set[int]: ...

    def committed(self, partition: int) -> int | None: ...

    def position(self, partition: int) -> int | None:
        """The next offset this consumer reads, if known."""

    def highwater(self, partition: int) -> int | None: ...

    async def commit(self, offsets: Mapping[int, int]) -> None: ...

    async def seek(self, partition: int, offset: int) -> None:
        """Read the partition from this offset on (records already fetched from before are not handed over);
        nothing if the partition is no longer assigned."""

    async def earliest(self, partition: int) -> int | None:
        """The first offset the log still holds (retention removes older records)."""


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, epoch milliseconds: what the core compares event times with."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, for timing flushes and retries."""

    async def sleep(self, seconds: float) -> None: ...


class RunnerObserver(Protocol):
    """Where the runner reports what it did (Prometheus and logs in production)."""

    def flushed(self, output: Output, at_s: float) -> None:
        """A flush is stored (and its offsets committed, when it had any); at_s: wall-clock epoch seconds."""

    def store_failed(self, error: BaseException, attempt: int, retry_in_s: float) -> None: ...

    def commit_failed(self, error: BaseException) -> None: ...

    def progress(self, partition: int, lag: int | None, watermark_ms: int | None, now_ms: int) -> None:
        """Consumer lag and event-time watermark of a partition, reported whether or not writes succeed."""

    def heartbeat(self, at_s: float) -> None:
        """The fetch loop is alive (wall-clock epoch seconds)."""

    def identifiers(self, count: int) -> None:
        """Identifiers in this worker's copy of the identity graph."""

    def forget(self, partition: int) -> None:
        """A partition this worker no longer reads."""


class SystemClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)
