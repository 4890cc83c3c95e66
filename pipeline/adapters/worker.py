"""The Faust adapter: the one module that touches Faust's private members (each use says why, read against
faust-streaming 0.15.3, which pyproject.toml pins). The rules of delivery are in `pipeline.runtime.runner`; this
module feeds the runner whole fetches and gives it Kafka behind the runner's ports.

Why not a Faust agent: Faust's fetcher (`Consumer._drain_messages`) awaits
`wait_first(callback(message), suspend_flow.wait())` for every record, which schedules two tasks and a wait per
message, and then every record becomes a Message, an Event and a trip through a stream queue. That per-record
hand-off, not fetching, caps an agent at a few thousand records a second. Here the consumer subclass takes each
fetch (a {partition: [records]} map straight from aiokafka) and gives the touchpoint topic's records to the runner
a partition-batch at a time. Faust still runs everything else: group membership and rebalances, offset commits,
the worker's lifecycle and signals. The identity log is read by pipeline.adapters.identity_log (into the graph's
local store) and written through the app's producer.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import faust
from faust.tables import TableManager
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from mode import ServiceT

from pipeline.adapters import metrics
from pipeline.adapters.clickhouse import ClickHouseSink, claim_database
from pipeline.adapters.identity_log import KafkaIdentityLog, changelog_topic
from pipeline.adapters.identity_store import open_graph_state
from pipeline.contract.registry import open_registry, parse_for_decoding
from pipeline.core.identity import GraphState, MemoryState
from pipeline.core.processor import DeadLetter, TouchpointProcessor
from pipeline.runtime.deadletters import dead_letter_message
from pipeline.runtime.ports import SystemClock
from pipeline.runtime.runner import DeliveryPolicy, Runner, StoreUnavailable
from pipeline.settings import Settings

log = logging.getLogger("touchpoint.worker")


# -- the runner's ports on Faust ----------------------------------------------------------------------------------

class KafkaOffsets:
    """Offsets of the touchpoint topic's partitions, from Faust's aiokafka consumer."""

    def __init__(self, consumer: BatchConsumer, topic: str) -> None:
        self.consumer = consumer
        self.topic = topic

    def assigned(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic}

    def committed(self, partition: int) -> int | None:
        # Private: Faust's record of the group's committed offsets (no public accessor in 0.15.3).
        offset: int | None = self.consumer._committed_offset.get(TP(self.topic, partition))
        return offset

    def position(self, partition: int) -> int | None:
        # Private: the last offset Faust's consumer handed on; this module sets it in _dispatch as Faust does.
        last_read = self.consumer._read_offset.get(TP(self.topic, partition))
        return None if last_read is None else last_read + 1

    def highwater(self, partition: int) -> int | None:
        tp = TP(self.topic, partition)
        if tp not in self.consumer.assignment():
            return None  # revoked meanwhile (a rebalance): aiokafka asserts on it; its next owner reports the lag
        try:
            highwater: int | None = self.consumer.highwater(tp)
        except AssertionError:  # revoked between the check and the call (the consumer's own thread)
            return None
        return highwater

    async def seek(self, partition: int, offset: int) -> None:
        tp = TP(self.topic, partition)
        if tp not in self.consumer.assignment():
            return  # revoked meanwhile (a rebalance): its next owner resumes it from the checkpoint
        await self.consumer.seek(tp, offset)
        # Private: Faust's seek records the offset itself as read; the last offset read is the one before it.
        self.consumer._read_offset[tp] = offset - 1 if offset > 0 else None

    async def earliest(self, partition: int) -> int | None:
        tp = TP(self.topic, partition)
        offsets = await self.consumer.earliest_offsets(tp)
        return offsets.get(tp)

    async def commit(self, offsets: Mapping[int, int]) -> None:
        # Private: the commit of explicit offsets (Faust's public commit() commits what its acks allow, and this
        # consumer does not ack per message).
        await self.consumer._commit_offsets({TP(self.topic, p): offset for p, offset in offsets.items()})


class FaustDeadLetters:
    """The dead-letter topic, through the app's producer (flushed before every commit)."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.topic = settings.kafka.dead_letter_topic
        self.source_topic = settings.kafka.topic
        self.max_message_bytes = settings.kafka.max_message_bytes

    async def send(self, dead: DeadLetter) -> None:
        message = dead_letter_message(dead, self.source_topic, self.max_message_bytes)
        await self.app.producer.send(self.topic, message.key, message.value, None, None, message.headers)

    async def flush(self) -> None:
        await self.app.producer.flush()


class FaustIdentityLog(KafkaIdentityLog):
    """The identity log (pipeline.adapters.identity_log) publishing through the app's producer, so its records
    are flushed with everything else before offsets are committed."""

    def __init__(self, app: faust.App, settings: Settings, state: GraphState) -> None:
        topic = changelog_topic(settings)

        async def send(key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
            return await app.producer.send(topic, key, value, 0, None, headers)

        async def flush() -> None:
            await app.producer.flush()

        super().__init__(settings, state, settings.identity.core(), send, flush)


def graph_state_for(settings: Settings) -> GraphState:
    """The identity graph's state: in memory, or on disk under the state dir (identity.store = rocksdb://)."""
    if settings.identity.store.startswith("rocksdb"):
        directory = settings.stack.state_dir / "identity" / settings.kafka.consumer_group
        return open_graph_state(directory, settings.identity.graph_cache_entries)
    return MemoryState()


# -- the consumer -------------------------------------------------------------------------------------------------

class BatchConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer, with a fetch loop that hands the touchpoint topic to the app's runner in batches."""

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        # Private override: Faust's fetch loop (`_drain_messages`), replaced for the touchpoint topic only.
        app = self.app
        if not isinstance(app, TouchpointApp):
            await super()._drain_messages(fetcher)
            return
        runner = app.start_runner(KafkaOffsets(self, app.touchpoint_topic))
        topic = app.touchpoint_topic
        # Private: the consumer's and the fetcher's stop flags (mode Services), checked every fetch.
        stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set  # type: ignore[attr-defined]
        try:
            while not (stopped() or fetcher_stopped()):
                generation = app.consumer_generation_id
                # Private: aiokafka's fetch as a {TP: [records]} map, the batch this whole module exists for.
                fetched, _active = await self._wait_next_records(timeout=0.2)
                records = fetched or {}
                if self._recovering():
                    # Faust's recovery service runs on each assignment (with no table to recover): when done it
                    # seeks every partition to its committed offset (a partition without one keeps its position,
                    # hence the seek back below); nothing may run before the offsets are known.
                    for tp, batch in records.items():
                        if tp.topic == topic and batch:
                            await self._seek(tp, batch[0].offset)  # private: fetch them again afterwards
                    records = {tp: batch for tp, batch in records.items() if tp.topic != topic}
                    if records:
                        await self._dispatch(runner, topic, records)
                    continue
                if records and not self.should_stop and generation == app.consumer_generation_id:
                    await self._dispatch(runner, topic, records)
                await runner.on_idle()
                await self.sleep(0)
        finally:
            try:
                await runner.stop()
            except StoreUnavailable as exc:
                log.error("Final flush not stored: %s", exc)
            except Exception:  # shutting down: whatever was not flushed is replayed from the committed offset
                log.exception("Final flush failed; the next start replays from the last committed offset")

    def _recovering(self) -> bool:
        # recovery: Faust's table recovery service (public attribute, missing from TableManagerT's type).
        return bool(self.app.in_recovery) or not self.app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]

    async def _dispatch(self, runner: Runner, topic: str, records: Mapping[TP, Sequence[Any]]) -> None:
        assignment = self.assignment()
        ours: dict[int, Sequence[Any]] = {}
        for tp, batch in records.items():
            if not batch or tp not in assignment:
                continue
            # Private: Faust's last-read offsets, which its own fetch loop keeps and its lag/commit logic reads.
            self._read_offset[tp] = batch[-1].offset
            if tp.topic == topic:
                ours[tp.partition] = batch
            else:
                for record in batch:  # Faust's own path for other topics; private: its record -> Message
                    await self.callback(self._to_message(tp, record))
        if ours:
            await runner.on_records(ours)


class BatchTransport(aiokafka_driver.Transport):
    Consumer = BatchConsumer


class PromptTableManager(TableManager):
    """Faust's table manager without its start-up pause: Faust sleeps a second before registering tables, for
    agents that declare them late; this app declares none (the identity graph is kept by identity_log)."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()  # private: what Faust's on_start does after its sleep
            await self.recovery.start()


class TouchpointApp(faust.App):
    """A Faust app whose consumer feeds a runner; the runner is made by `make_runner` once the consumer exists."""

    touchpoint_topic: str
    make_runner: Callable[[KafkaOffsets], Runner]
    identity_log: KafkaIdentityLog | None = None
    runner: Runner | None = None

    def _new_transport(self) -> Any:
        # Private hook: the only way to give Faust a transport (and so a consumer) class of our own.
        return BatchTransport(self.conf.broker_consumer, self)

    def start_runner(self, offsets: KafkaOffsets) -> Runner:
        if self.runner is None:
            self.runner = self.make_runner(offsets)
        else:
            self.runner.offsets = offsets  # a new consumer (Faust restarts its fetcher after a crash)
        return self.runner


def processor_for(settings: Settings, state: GraphState | None = None) -> TouchpointProcessor:
    registry = open_registry(settings.registry.url)
    parsed: dict[int, Any] = {}

    def schema_for(schema_id: int) -> Any:
        """Parsed writer schema by id, fetched from the registry once and cached."""
        if schema_id not in parsed:
            schema = registry.schema(schema_id)
            parsed[schema_id] = None if schema is None else parse_for_decoding(schema)
        return parsed[schema_id]

    config = settings.window.core()
    return TouchpointProcessor(config, schema_for, settings.identity.core(), identity_enabled=settings.identity.enabled,
                               identity_state=state,
                               snapshot_interval_ms=int(settings.batch.snapshot_interval_s * 1000),
                               journeys=settings.journeys.core())


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
        producer_max_request_size=settings.kafka.max_message_bytes,
        datadir=str(datadir),  # per group: Faust keeps table stores under datadir/v<version>/
        TableManager=PromptTableManager,
    )
    app.touchpoint_topic = settings.kafka.topic
    app.topics.add(app.topic(settings.kafka.topic, value_serializer="raw", key_serializer="raw"))
    state = graph_state_for(settings) if settings.identity.enabled else None
    identity_log = FaustIdentityLog(app, settings, state) if state is not None else None
    app.identity_log = identity_log
    policy = DeliveryPolicy(settings.batch.max_events, settings.batch.max_wait_s,
                            retry_max_s=settings.batch.retry_max_s)

    def make_runner(offsets: KafkaOffsets) -> Runner:
        store = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic,
                               observe=metrics.observe_insert)
        return Runner(processor_for(settings, state), store=store, dead_letters=FaustDeadLetters(app, settings),
                      identity_log=identity_log, offsets=offsets, clock=SystemClock(),
                      observer=metrics.PrometheusObserver(settings.kafka.topic), policy=policy,
                      on_ready=_freeze_start_up_heap)

    app.make_runner = make_runner

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # Faust's signal type wants a `signal` keyword
    async def _on_revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        if app.runner is not None:
            app.runner.revoke({tp.partition for tp in revoked if tp.topic == settings.kafka.topic})

    return app


def _freeze_start_up_heap() -> None:
    # What start-up built (the identity graph) lives as long as the worker: full collections skip it.
    gc.collect()
    gc.freeze()


def _exit_after(seconds: float) -> None:
    """A stop that has not finished within `seconds` ends the process: aiokafka's consumer waits 60 s for an
    unreachable broker before it gives up, and an operator's SIGTERM must not. Nothing is lost by it: offsets
    are committed only after their rows are stored, so the next start replays whatever was not."""

    def watchdog() -> None:
        time.sleep(seconds)
        log.error("Stop did not finish within %.0f s (broker or ClickHouse unreachable?); exiting now. The next "
                  "start replays from the last committed offset.", seconds)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()


def run_worker(settings: Settings) -> None:
    from faust.worker import Worker

    class TouchpointWorker(Worker):
        # Private overrides: mode's signal handlers (SIGTERM, SIGINT), wrapped to bound how long a stop may take.
        def _on_sigterm(self) -> None:
            _exit_after(settings.stop_timeout_s)
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            _exit_after(settings.stop_timeout_s)
            super()._on_sigint()

        async def on_execute(self) -> None:
            # mode's hook after logging is set up and before the app starts: the identity log's catch-up runs
            # before the worker joins the group, so a long first read does not hold up the consumer's heartbeats.
            if app.identity_log is not None:
                app.identity_log.catch_up()

        def on_worker_shutdown(self) -> None:
            if app.identity_log is not None:
                app.identity_log.close()

    # Refused before anything starts: another pipeline's cells would be overwritten.
    claim_database(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    metrics.serve(settings.metrics_port, settings.metrics_host)
    # Each batch allocates and frees hundreds of thousands of short-lived dicts and tuples; collecting every
    # 700 allocations cost more time than the work itself (measured: in-process rate 45k -> 59k events/s).
    gc.set_threshold(100_000, 50, 100)
    app = create_app(settings)
    with _profiled(settings.profile_path):
        TouchpointWorker(app, loglevel=settings.log_level.upper(), quiet=True).execute_from_commandline()


@contextmanager
def _profiled(path: str) -> Iterator[None]:
    """With a path: a cProfile of every thread (the event loop's and the ClickHouse writer's), in each thread's CPU
    time so that waiting costs nothing, merged into one pstats file when the worker stops."""
    if not path:
        yield
        return
    import cProfile
    import pstats

    profiles: list[cProfile.Profile] = []

    def profile_this_thread(*_: Any) -> None:
        if threading.current_thread().name == "stop-watchdog":
            sys.setprofile(None)  # it only sleeps; its unfinished sleep would be charged with another thread's time
            return
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()  # in a new thread, replaces this hook, which threading called once at its first event

    # Collections are no function call, so cProfile misses them: their pauses are timed apart.
    collections: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    collection_started: list[float] = [0.0]

    def time_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collection_started[0] = time.thread_time()
        else:
            generation = collections[info["generation"]]
            generation[0] += 1
            generation[1] += time.thread_time() - collection_started[0]

    threading.setprofile(profile_this_thread)
    profile_this_thread()
    gc.callbacks.append(time_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(time_collection)
        threading.setprofile(None)  # None removes the hook
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(path)
        log.info("Profile of %d threads written to %s; garbage collections (count, CPU s) by generation: %s",
                 len(profiles), path, {g: (n, round(s, 3)) for g, (n, s) in collections.items()})
