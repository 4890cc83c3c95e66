"""The rules of delivery, in one place: when to flush, how to retry, and in which order things must happen so that
nothing is lost and nothing counts twice.

* Dead letters and identity operations are handed to Kafka when their flush starts, and are flushed (acknowledged)
  before the checkpoint of the records that produced them is stored: a restarted worker resumes from its
  checkpoint, so nothing before it is read again.
* Offsets are committed only after the store has the rows, cells and checkpoints of the records below them.
* A newly assigned partition resumes where its checkpoint says: from the snapshot of its open windows and the
  offset after it, or by replaying from an older offset when no snapshot can be continued.
* A failed store write is retried with a bounded backoff, each failure reported; nothing is committed meanwhile,
  so consumption waits at that point rather than running ahead of what is stored.
* Writes go one at a time (the next flush waits for the one in flight), so commits happen in offset order.
* A revoked partition's state is dropped (its next owner replays from the committed offset); a stop flushes and
  waits for the last write.

The runner is plain Python around the core's processor: Kafka, ClickHouse, metrics and the clock are ports
(`pipeline.runtime.ports`), so every rule above is tested with fakes and an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.core.aggregate import NEVER, Checkpoint, WindowCell
from pipeline.core.processor import Output, SourceRecord, TouchpointProcessor
from pipeline.runtime.ports import Clock, DeadLetters, IdentityLog, Offsets, RunnerObserver, Store

log = logging.getLogger("touchpoint.runner")

T = TypeVar("T")
RunBlocking = Callable[[Callable[[], T]], Awaitable[T]]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    max_events: int  # flush once this many records are buffered...
    max_wait_s: float  # ...or once the oldest buffered record has waited this long
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0  # the backoff doubles up to this, so a recovered store is used within it
    progress_every_s: float = 1.0  # how often lag, watermark and the heartbeat are reported


class StoreUnavailable(RuntimeError):
    """The store kept failing until the runner was asked to stop: the last flush is not stored, and the next
    start replays it from the last committed offset."""


async def _in_thread(call: Callable[[], T]) -> T:
    # The store's driver blocks: a thread keeps the event loop (and the consumer's heartbeats) going.
    return await asyncio.get_running_loop().run_in_executor(None, call)


class Runner:
    def __init__(self, processor: TouchpointProcessor, *, store: Store, dead_letters: DeadLetters,
                 identity_log: IdentityLog | None, offsets: Offsets, clock: Clock, observer: RunnerObserver,
                 policy: DeliveryPolicy,
                 run_blocking: RunBlocking[Any] = _in_thread, on_ready: Callable[[], None] | None = None) -> None:
        self.processor = processor
        self.store = store
        self.dead_letters = dead_letters
        self.identity_log = identity_log
        self.offsets = offsets
        self.clock = clock
        self.observer = observer
        self.policy = policy
        self._run_blocking = run_blocking
        self._on_ready = on_ready  # called once the identity graph is built, before the first touchpoint
        self._identity_ready = False
        self._first_buffered_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_progress_at: float | None = None
        # Flushes and checkpoint loads of newly assigned partitions take turns: one store connection, and a
        # partition must not be restored while a write of its previous owner's output is still in flight.
        self._storage_lock = asyncio.Lock()

    # -- the fetch loop's calls -------------------------------------------------------------------------------

    async def on_records(self, batches: Mapping[int, Sequence[SourceRecord]]) -> None:
        """One fetch: each partition's records in offset order."""
        await self.sync_assignment()
        now_ms = self.clock.now_ms()
        processor = self.processor
        for partition, records in batches.items():
            if not records or not processor.owns(partition):
                continue
            records = await self._unread(partition, records)
            if records:
                processor.process(partition, records, now_ms)
        self._mark_buffered()
        if len(processor.output) >= self.policy.max_events:
            await self.flush()

    async def on_idle(self) -> None:
        """Between fetches: let idle partitions' windows close, flush what is due, report progress."""
        await self.sync_assignment()
        now_ms = self.clock.now_ms()
        self.processor.tick(now_ms, self._caught_up())
        output = self.processor.output
        due = (self._first_buffered_at is not None
               and self.clock.monotonic() - self._first_buffered_at >= self.policy.max_wait_s)
        # Closed windows go out at once: the alerter judges them from the store and should not wait for a full batch.
        if due or output.window_cells or self.processor.snapshot_due(now_ms):
            await self.flush()
        self._report_progress()

    async def sync_assignment(self) -> None:
        """Follow the consumer's assignment: resume new partitions from their checkpoints, drop revoked ones.
        The identity graph is built (or brought up to date) first: enrichment needs it."""
        self._sync_identity()
        assigned = self.offsets.assigned()
        self.revoke(set(self.processor.partitions) - assigned)
        new = sorted(assigned - set(self.processor.partitions))
        if not new:
            return
        async with self._storage_lock:
            await self._drain()
            for partition in new:
                await self._assign(partition)

    def revoke(self, partitions: set[int]) -> None:
        """Drop revoked partitions' open windows. No flush: the next owner replays from the last committed offset
        and every write is idempotent (and a rebalance callback must not wait for a commit)."""
        for partition in partitions:
            if self.processor.owns(partition):
                self.processor.revoke(partition)
                self.observer.forget(partition)

    def request_stop(self) -> None:
        """From now on a failing store is not retried: the stop must not wait for it."""
        self._stopping = True

    async def stop(self) -> None:
        """Final flush: store what was processed and commit it. Raises StoreUnavailable if the store fails."""
        self.request_stop()
        await self.flush(wait=True)

    # -- flushing ---------------------------------------------------------------------------------------------

    async def flush(self, *, wait: bool = False) -> None:
        """Hand what the core produced to storage. The write runs in the background while the next fetch is
        processed; writes stay one at a time, so offsets are committed in order and only after their rows.
        When an unmerge or a late identify put rows under the wrong person or role, the write in flight is
        stored first, then those rows are read back and restated with the buffered ones: this flush writes them,
        with its checkpoints (snapshots of the restated open windows), before its offsets are committed."""
        async with self._storage_lock:
            restatement = self.processor.take_restatement()
            if restatement is not None:
                await self._drain()
                rows = await self._retrying(lambda: self.store.rows_to_restate(restatement))
                self.processor.restate(restatement, rows)
            output = self.processor.take_output(self.clock.now_ms(), force_checkpoints=self._stopping)
            self._first_buffered_at = None
            if _has_work(output):
                await self._drain()
                await self._send_to_kafka(output)
                self._inflight = asyncio.ensure_future(self._store_and_commit(output))
            if wait:
                await self._drain()

    async def _send_to_kafka(self, output: Output) -> None:
        if self.identity_log is not None and output.identity.operations:
            self.identity_log.publish(output.identity.operations)
        if self.identity_log is not None and output.identity.erased:
            self.identity_log.drop(output.identity.erased)
        for dead in output.dead_letters:
            await self.dead_letters.send(dead)

    async def _drain(self) -> None:
        """Wait for the write in flight, if any (its failure, on stop, surfaces here). While it waits (a store
        that keeps failing holds the fetch loop here), lag and the heartbeat are still reported."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            while not inflight.done():
                await asyncio.wait({inflight}, timeout=self.policy.progress_every_s)
                self._report_progress()
            await inflight

    async def _store_and_commit(self, output: Output) -> None:
        if output.checkpoints:
            # Dead letters and identity operations reach Kafka before the checkpoint that moves past their records.
            await self.dead_letters.flush()
            if self.identity_log is not None:
                await self.identity_log.flush()
        await self._retrying(lambda: self.store.write(output))
        offsets = {p: cp.commit_offset for p, cp in output.checkpoints.items() if cp.commit_offset > 0}
        if offsets:
            try:
                await self.offsets.commit(offsets)
            except Exception as exc:  # e.g. a rebalance under way: the data is stored, a later commit covers it
                self.observer.commit_failed(exc)
                log.warning("Offset commit failed (%s: %s); the rows are stored and a later commit or a replay "
                            "covers them", type(exc).__name__, exc)
        self.observer.flushed(output, self.clock.now_ms() / 1000)

    async def _retrying(self, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return await self._run_blocking(call)
            except Exception as exc:  # any failure: writes are idempotent, so the same batch may be written again
                attempt += 1
                delay = min(self.policy.retry_initial_s * 2 ** min(attempt - 1, 20), self.policy.retry_max_s)
                self.observer.store_failed(exc, attempt, delay)
                if self._stopping:
                    raise StoreUnavailable(f"the store failed while stopping ({type(exc).__name__}: {exc}); the "
                                           "next start replays from the last committed offset") from exc
                log.error("Store write failed (attempt %d, %s: %s); retrying in %.1f s. Nothing is committed "
                          "until it succeeds, so consumption waits here.", attempt, type(exc).__name__, exc, delay)
                await self.clock.sleep(delay)

    # -- assignment and identity ------------------------------------------------------------------------------

    async def _assign(self, partition: int) -> None:
        checkpoint = await self._run_blocking(lambda: self.store.load_checkpoint(partition))
        if checkpoint is not None and self.offsets.committed(partition) is None:
            # No offset committed for the group: the topic is new (recreated, or a memory-only broker restarted),
            # or the worker died before its first commit. Either way it is read from the start, which rebuilds
            # every window whole, so the checkpoint must not mark any as final.
            log.warning("Ignoring the checkpoint of partition %d: the group has no committed offset there",
                        partition)
            checkpoint = None
        panes: list[WindowCell] = []
        pane_ids: list[tuple[int, str]] | None = None
        if checkpoint is not None:
            panes = await self._recent_panes(checkpoint)
            from_ms, before = checkpoint.open_from_ms, checkpoint.commit_offset
            pane_ids = await self._run_blocking(lambda: self.store.pane_event_ids(partition, from_ms, before))
        resume = self.processor.assign(partition, checkpoint, self.clock.now_ms(), panes, pane_ids)
        if resume.offset is not None:
            log.info("Resuming partition %d at offset %d (%s%s)", partition, resume.offset, resume.how,
                     f": {resume.note}" if resume.note else "")

    async def _unread(self, partition: int, records: Sequence[SourceRecord]) -> Sequence[SourceRecord]:
        """The records the partition's windows have not folded in yet, in an unbroken run from where they stand.
        The consumer's position can lag the windows (a crash between the store and the commit: those records
        are in the snapshot, so they are skipped) or lead them (a replay from a held-back offset, or a rebalance
        that sought the consumer to an offset another worker committed): then it is sent back."""
        expected = self.processor.partitions[partition].next_offset
        first = records[0].offset
        if first < expected:  # read before: part of the state already
            records = [r for r in records if r.offset >= expected]
            if not records:
                return records
            first = records[0].offset
        if first == expected:
            return records
        earliest = await self.offsets.earliest(partition)
        if earliest is not None and earliest > expected:
            log.warning("Partition %d: records %d-%d are gone from the log (retention); going on from %d",
                        partition, expected, earliest - 1, first)
            return records
        await self.offsets.seek(partition, expected)  # a gap: fetch from where the windows stand
        return []

    async def _recent_panes(self, checkpoint: Checkpoint) -> list[WindowCell]:
        # Hopping windows span panes closed before the restart: their stored cells come back too.
        config = self.processor.config
        count = config.hopping_ms // config.window_ms - 1
        return await self._run_blocking(
            lambda: self.store.recent_panes(checkpoint.partition, checkpoint.closed_before_ms, count))

    def _sync_identity(self) -> None:
        """Bring the graph up to date with the log before the first touchpoint (the log may have done it into the
        graph's store already); afterwards apply other workers' operations as the log hands them over."""
        log_ = self.identity_log
        if not self._identity_ready:
            if log_ is not None:
                started = self.clock.monotonic()
                self.processor.apply_identity(log_.initial_operations(), replay=True)
                # What arrived meanwhile: applying an operation twice changes nothing, missing one would.
                self.processor.apply_identity(log_.take_incoming())
                log.info("Identity graph ready: %d identifiers in %.1f s",
                         len(self.processor.enricher.graph or ()), self.clock.monotonic() - started)
            self._identity_ready = True
            if self._on_ready is not None:
                self._on_ready()
            return
        if log_ is None:
            return
        incoming = log_.take_incoming()
        if incoming:
            self.processor.apply_identity(incoming)
            self._mark_buffered()  # the aliases and transitions they cause are flushed like the rest

    # -- progress ---------------------------------------------------------------------------------------------

    def _mark_buffered(self) -> None:
        if self._first_buffered_at is None:
            self._first_buffered_at = self.clock.monotonic()

    def _caught_up(self) -> set[int]:
        """Partitions whose every record has been read (position at the high watermark)."""
        caught_up = set()
        for partition, windows in self.processor.partitions.items():
            highwater = self.offsets.highwater(partition)
            position = self.offsets.position(partition)
            if position is None:
                position = self.offsets.committed(partition) or windows.next_offset
            if highwater is not None and position >= highwater:
                caught_up.add(partition)
        return caught_up

    def _report_progress(self) -> None:
        """Lag and watermark of every partition, whatever the store does: a worker stuck retrying must show its
        lag growing, not the last value a successful write left."""
        now = self.clock.monotonic()
        if self._last_progress_at is not None and now - self._last_progress_at < self.policy.progress_every_s:
            return
        self._last_progress_at = now
        now_ms = self.clock.now_ms()
        self.observer.heartbeat(now_ms / 1000)
        graph = self.processor.enricher.graph
        if graph is not None:
            self.observer.identifiers(len(graph))
        for partition, windows in self.processor.partitions.items():
            highwater = self.offsets.highwater(partition)
            lag = None if highwater is None else max(0, highwater - windows.next_offset)
            watermark = None if windows.watermark_ms == NEVER else windows.watermark_ms
            self.observer.progress(partition, lag, watermark, now_ms)


def _has_work(output: Output) -> bool:
    return bool(output.records or output.window_cells or output.checkpoints or output.identity or output.restated
                or output.cell_changes)
