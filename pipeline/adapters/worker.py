"""The stream processor: a Faust app whose consumer hands whole fetches of the touchpoint topic to the core.

Why not a Faust agent: Faust's fetcher (`Consumer._drain_messages`) awaits
`wait_first(callback(message), suspend_flow.wait())` for every record, which schedules two tasks and a
wait per message, and then every record becomes a Message, an Event and a trip through a stream queue. That
per-record hand-off, not fetching, caps an agent at a few thousand records a second. Here the consumer
subclass takes each fetch (`_wait_next_records`: a {partition: [records]} map straight from aiokafka) and
gives the touchpoint topic's records to the core a partition-batch at a time. Faust still runs everything
else: group membership and rebalances, flow control, offset commits, tables and changelogs, the worker's
lifecycle and signals. Records of any other topic (table changelogs, future agents) take Faust's usual path.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from mode import Service

from pipeline.adapters import metrics
from pipeline.adapters.clickhouse import ClickHouseSink
from pipeline.adapters.identity_log import IdentityTable, encode_chunks, new_identity_table
from pipeline.contract.registry import open_registry, parse_for_decoding
from pipeline.core.aggregate import NEVER
from pipeline.core.evaluate import Alert, AlertRule
from pipeline.core.processor import Output, TouchpointProcessor, WindowConfig
from pipeline.settings import Settings

log = logging.getLogger("touchpoint.worker")


class TouchpointHandler:
    """Owns the core processor for this worker and the I/O around it: flush to ClickHouse, dead letters,
    offset commits, metrics."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.topic = settings.kafka.topic
        registry = open_registry(settings.registry.url)
        self._parsed: dict[int, Any] = {}
        self._registry = registry
        window = settings.window
        self.processor = TouchpointProcessor(
            WindowConfig(window.size_s * 1000, window.allowed_lateness_s * 1000, window.max_future_s * 1000,
                         int(window.idle_close_s * 1000), hopping_ms=window.hopping_size_s * 1000,
                         session_gap_ms=window.session_gap_s * 1000, session_max_ms=window.session_max_s * 1000,
                         apdex_t_ms=dict(window.apdex_t_ms), apdex_default_t_ms=window.apdex_default_t_ms),
            self.schema_for,
            settings.identity.core(),
            identity_enabled=settings.identity.enabled,
        )
        self.identity_table: IdentityTable | None = None  # set by create_app when identity is on
        self._identity_ready = False
        self._identity_pending: list[Any] = []  # other workers' operations, as the table hands them over
        self._identity_chunks = 0
        self.rules = [AlertRule(**rule.model_dump()) for rule in settings.alert_rules]
        self.sink = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, self.topic,
                                   observe=metrics.observe_insert)
        self._first_buffered_at: float | None = None
        self._inflight: asyncio.Future[None] | None = None
        # One ClickHouse connection, used from executor threads: flushes (from the fetch loop and from the
        # rebalance signal) and checkpoint loads take turns under this lock.
        self._storage_lock = asyncio.Lock()

    def schema_for(self, schema_id: int) -> Any:
        """Parsed writer schema by id, fetched from the registry once and cached."""
        if schema_id not in self._parsed:
            schema = self._registry.schema(schema_id)
            self._parsed[schema_id] = None if schema is None else parse_for_decoding(schema)
        return self._parsed[schema_id]

    def on_identity_operations(self, operations: list[Any]) -> None:
        self._identity_pending.extend(operations)

    async def _sync_identity(self) -> None:
        """Build the graph from the whole table before the first touchpoint (Faust has recovered the table by
        then); afterwards apply other workers' operations as the table receives them."""
        table = self.identity_table
        if not self._identity_ready:
            if table is not None:
                started = time.monotonic()
                self.processor.apply_identity(table.all_operations(), replay=True)
                self._identity_pending.clear()  # recovery handed these over too; they are in the table
                log.info("Identity graph ready: %d identifiers in %.1f s",
                         len(self.processor.enricher.graph or ()), time.monotonic() - started)
            self._identity_ready = True
            gc.collect()
            gc.freeze()  # what start-up built (the graph) lives as long as the worker: collections skip it
            return
        if self._identity_pending:
            operations, self._identity_pending = self._identity_pending, []
            self.processor.apply_identity(operations)
            if self._first_buffered_at is None:
                self._first_buffered_at = time.monotonic()

    async def sync_assignment(self, consumer: BatchConsumer) -> None:
        """Follow Faust's assignment: resume new partitions from their checkpoints, drop revoked ones."""
        await self._sync_identity()
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topic}
        for partition in set(self.processor.partitions) - assigned:
            self.processor.revoke(partition)
            metrics.forget_partition(self.topic, partition)
        new = sorted(assigned - set(self.processor.partitions))
        if not new:
            return
        async with self._storage_lock:
            await self.drain(consumer)
            loop = asyncio.get_running_loop()
            config = self.processor.config
            for partition in new:
                tp = TP(self.topic, partition)
                checkpoint = await self._restore(consumer, tp)
                # Hopping windows span panes closed before the restart: their stored cells come back too.
                panes = [] if checkpoint is None else await loop.run_in_executor(
                    None, self.sink.recent_panes, partition, checkpoint.closed_before_ms,
                    config.hopping_ms // config.window_ms - 1)
                self.processor.assign(partition, checkpoint, int(time.time() * 1000), panes)

    async def on_records(self, consumer: BatchConsumer, batches: Mapping[TP, Sequence[Any]]) -> None:
        await self.sync_assignment(consumer)
        now_ms = int(time.time() * 1000)
        for tp, records in batches.items():
            if self.processor.owns(tp.partition):
                self.processor.process(tp.partition, records, now_ms)
        if self._first_buffered_at is None:
            self._first_buffered_at = time.monotonic()
        if len(self.processor.output) >= self.settings.batch.max_events:
            await self.flush(consumer)

    async def _restore(self, consumer: BatchConsumer, tp: TP) -> Any:
        checkpoint = await asyncio.get_running_loop().run_in_executor(None, self.sink.load_checkpoint, tp.partition)
        if checkpoint is None:
            return None
        if consumer._committed_offset.get(tp) is None:
            # No offset committed for the group: the topic is new (recreated, or a memory-only broker restarted),
            # or the worker died before its first commit. Either way it is read from the start, which rebuilds
            # every window whole, so the checkpoint must not mark any as final.
            log.warning("Ignoring the checkpoint of %s: the group has no committed offset there", tp)
            return None
        log.info("Resuming %s from checkpoint: windows before %d are final", tp, checkpoint.closed_before_ms)
        return checkpoint

    async def on_idle(self, consumer: BatchConsumer) -> None:
        await self.sync_assignment(consumer)
        self.processor.tick(int(time.time() * 1000), self._caught_up(consumer))
        output = self.processor.output
        due = (self._first_buffered_at is not None
               and time.monotonic() - self._first_buffered_at >= self.settings.batch.max_wait_s)
        # Closed windows (and windows to judge) go out at once: alerts should not wait for a full batch.
        if due or output.window_cells or output.judge_before_ms is not None:
            await self.flush(consumer)

    def _caught_up(self, consumer: BatchConsumer) -> set[int]:
        """Partitions whose every record has been read (position at the high watermark)."""
        caught_up = set()
        assignment = consumer.assignment()
        for partition in self.processor.partitions:
            tp = TP(self.topic, partition)
            if tp not in assignment:
                continue  # revoked a moment ago; the revoke handler drops it
            highwater = consumer.highwater(tp)
            last_read = consumer._read_offset.get(tp)
            # Nothing read yet: caught up only if the partition holds nothing past the committed offset.
            position = last_read + 1 if last_read is not None else (consumer._committed_offset.get(tp) or 0)
            if highwater is not None and position >= highwater:
                caught_up.add(partition)
        return caught_up

    async def flush(self, consumer: BatchConsumer, *, wait: bool = False) -> None:
        """Hand what the core produced to storage. The write runs in the background while the next fetch is
        processed; writes stay one at a time, so offsets are committed in order and only after their rows."""
        async with self._storage_lock:
            await self._flush_locked(consumer, wait)

    async def _flush_locked(self, consumer: BatchConsumer, wait: bool) -> None:
        output = self.processor.take_output()
        self._first_buffered_at = None
        if (output.records or output.window_cells or output.checkpoints or output.judge_before_ms is not None
                or output.identity):
            await self.drain(consumer)
            producer = self.app.producer
            table = self.identity_table
            if table is not None:
                # Written before the offsets that produced them are committed (the commit flushes the producer).
                for chunk in encode_chunks(output.identity.operations):
                    self._identity_chunks += 1
                    table.write(f"{table.origin}:{self._identity_chunks}", chunk)
            for dead in output.dead_letters:
                record = dead.record
                headers = [("reason", dead.reason.encode()), ("detail", dead.detail.encode()),
                           ("channel", dead.channel.encode()), ("source.topic", self.topic.encode()),
                           ("source.partition", str(record.partition).encode()),
                           ("source.offset", str(record.offset).encode())]
                await producer.send(self.settings.kafka.dead_letter_topic, record.key, record.value, None, None,
                                    headers)
            self._inflight = asyncio.ensure_future(self._store(consumer, output))
        if wait:
            await self.drain(consumer)

    async def drain(self, consumer: BatchConsumer) -> None:
        """Wait for the write in flight, if any."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            await inflight

    async def _store(self, consumer: BatchConsumer, output: Output) -> None:
        delay_s = 0.5
        while True:
            try:
                # The blocking driver runs in a thread so the event loop (and Faust's services) keep going.
                alerts = await asyncio.get_running_loop().run_in_executor(None, self.sink.write, output, self.rules)
                break
            except Exception as exc:  # any failure: rows are idempotent, so writing the same batch again is safe
                metrics.INSERT_FAILURES.inc()
                if consumer.should_stop:
                    raise
                log.error("ClickHouse write of %d touchpoints failed (%s: %s); retrying in %.1f s. Nothing is "
                          "committed until it succeeds, so consumption waits here.",
                          len(output.touchpoints), type(exc).__name__, exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 30.0)
        offsets = {TP(self.topic, p): cp.commit_offset for p, cp in output.checkpoints.items()
                   if cp.commit_offset > 0}
        if offsets:
            # Dead letters and identity chunks reach Kafka before the offsets that produced them are committed.
            await self.app.producer.flush()
            try:
                await consumer._commit_offsets(offsets)
            except Exception as exc:  # e.g. a rebalance under way: the data is stored, a later commit covers it
                log.warning("Offset commit failed (%s: %s); the rows are stored and a later commit or a replay "
                            "covers them", type(exc).__name__, exc)
        self._observe(consumer, output, alerts)

    def _observe(self, consumer: BatchConsumer, output: Output, alerts: list[Alert]) -> None:
        metrics.BATCH_SIZE.observe(output.records)
        for channel, n in output.events_in.items():
            metrics.EVENTS_IN.labels(channel).inc(n)
        out_by_channel: dict[str, int] = {}
        for row in output.touchpoints:
            out_by_channel[row[3]] = out_by_channel.get(row[3], 0) + 1
        for channel, n in out_by_channel.items():
            metrics.EVENTS_OUT.labels(channel).inc(n)
        for dead in output.dead_letters:
            metrics.DEAD_LETTERED.labels(dead.channel, dead.reason).inc()
        for channel, n in output.late.items():
            metrics.LATE.labels(channel).inc(n)
        for channel, n in output.duplicates.items():
            metrics.DUPLICATES.labels(channel).inc(n)
        for record in output.identity.audit:
            metrics.IDENTITY_DECISIONS.labels(record.action).inc()
        for transition in output.identity.transitions:
            metrics.ROLE_TRANSITIONS.labels(transition.to_role).inc()
        if self.processor.enricher.graph is not None:
            metrics.IDENTIFIERS.set(len(self.processor.enricher.graph))
        for alert in alerts:
            metrics.ALERTS_FIRED.labels(alert.rule, alert.severity).inc()
            log.warning("ALERT %s: %s", alert.rule, alert.message)
        now = time.time()
        for partition, windows in self.processor.partitions.items():
            tp = TP(self.topic, partition)
            highwater = consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(self.topic, str(partition)).set(max(0, highwater - windows.next_offset))
            if windows.watermark_ms != NEVER:
                metrics.WATERMARK_LAG.labels(str(partition)).set(now - windows.watermark_ms / 1000)


class BatchConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, with a fetch loop that hands the touchpoint topic over in batches."""

    handler: ClassVar[TouchpointHandler | None] = None

    async def _drain_messages(self, fetcher: Service) -> None:
        handler = type(self).handler
        if handler is None:
            await super()._drain_messages(fetcher)
            return
        stopped = self._stopped.is_set  # type: ignore[attr-defined]
        fetcher_stopped = fetcher._stopped.is_set  # type: ignore[attr-defined]
        try:
            while not (stopped() or fetcher_stopped()):
                generation = self.app.consumer_generation_id
                records, _active = await self._wait_next_records(timeout=0.2)
                if self._recovering():
                    # Faust is recovering the identity table: when done it seeks every partition to its committed
                    # offset (a partition without one keeps its position, hence the seek back below); nothing may
                    # run before the graph and the offsets are known.
                    # The table's changelog records take Faust's own path, which is the recovery.
                    for tp, batch in records.items():
                        if tp.topic == handler.topic and batch:
                            await self._seek(tp, batch[0].offset)  # not read: fetch them again afterwards
                    records = {tp: batch for tp, batch in records.items() if tp.topic != handler.topic}
                    if records:
                        await self._dispatch(handler, records)
                    continue
                if records and not self.should_stop and generation == self.app.consumer_generation_id:
                    await self._dispatch(handler, records)
                await handler.on_idle(self)
                await self.sleep(0)
        finally:
            try:
                await handler.flush(self, wait=True)
            except Exception:  # shutting down: whatever was not flushed is replayed from the committed offset
                log.exception("Final flush failed; the next start replays from the last committed offset")

    def _recovering(self) -> bool:
        return bool(self.app.in_recovery) or not self.app.tables.recovery.completed.is_set()

    async def _dispatch(self, handler: TouchpointHandler, records: Mapping[TP, Sequence[Any]]) -> None:
        assignment = self.assignment()
        ours = {}
        for tp, batch in records.items():
            if not batch or tp not in assignment:
                continue
            self._read_offset[tp] = batch[-1].offset
            if tp.topic == handler.topic:
                ours[tp] = batch
            else:
                for record in batch:  # Faust's own path for other topics (tables' changelogs, agents)
                    await self.callback(self._to_message(tp, record))
        if ours:
            await handler.on_records(self, ours)


class BatchTransport(aiokafka_driver.Transport):
    Consumer = BatchConsumer


class TouchpointApp(faust.App):
    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)


def create_app(settings: Settings) -> TouchpointApp:
    datadir = settings.stack.state_dir / "faust" / settings.kafka.consumer_group
    datadir.mkdir(parents=True, exist_ok=True)
    brokers = [f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")]
    app = TouchpointApp(
        settings.kafka.consumer_group,
        broker=brokers,
        web_enabled=False,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.batch.max_events,
        broker_commit_every=None,
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.kafka.session_timeout_s / 4),
        datadir=str(datadir),  # per group: Faust keeps table stores under datadir/v<version>/
        store=settings.identity.store,
    )
    app.topics.add(app.topic(settings.kafka.topic, value_serializer="raw", key_serializer="raw"))
    handler = TouchpointHandler(app, settings)
    BatchConsumer.handler = handler
    app.touchpoint_handler = handler  # type: ignore[attr-defined]
    if settings.identity.enabled:
        handler.identity_table = new_identity_table(app, settings)
        handler.identity_table.on_operations = handler.on_identity_operations

    @app.on_partitions_revoked.connect
    async def _on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        # No flush here: this runs inside the consumer's rebalance callback, where a commit would wait on the
        # very thread that waits for us. Dropping the state is safe: the next owner replays from the last
        # committed offset, and every write is idempotent.
        for tp in revoked:
            if tp.topic == handler.topic:
                handler.processor.revoke(tp.partition)
                metrics.forget_partition(handler.topic, tp.partition)

    return app


def run_worker(settings: Settings) -> None:
    from faust.worker import Worker

    metrics.serve(settings.metrics_port)
    # Each batch allocates and frees hundreds of thousands of short-lived dicts and tuples; collecting every
    # 700 allocations cost more time than the work itself (measured: in-process rate 45k -> 59k events/s).
    gc.set_threshold(100_000, 50, 100)
    app = create_app(settings)
    Worker(app, loglevel=settings.log_level.upper(), quiet=True).execute_from_commandline()
