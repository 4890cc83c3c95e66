"""`touchpoint bench`: three rates of the same generated events, measured in one run.

* decode: fastavro decoding of the encoded events alone (the core's decode step, no I/O);
* raw consume: aiokafka `getmany` reading the published topic, manually assigned, nothing else done;
* end to end: a real `touchpoint worker` is running and idle; the clock starts when publishing starts and stops
  when the last touchpoint row is in ClickHouse.

With `preload_identities` the identity log is filled first with that many identifiers (half persons' user ids,
half their devices, linked), so the worker resolves every event against a graph of that size; the worker's
resident memory is read at the end, and the graph's own memory per identifier is measured in this process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.settings import Settings, to_env


@dataclass(frozen=True, slots=True)
class BenchResult:
    events: int
    partitions: int
    e2e_events_per_s: float
    raw_consume_events_per_s: float
    decode_events_per_s: float
    publish_events_per_s: float
    e2e_seconds: float
    identity: bool = True
    preloaded_identifiers: int = 0
    worker_rss_mib: float = 0.0
    graph_bytes_per_identifier: float = 0.0
    drain: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generated(events: int, seed: int) -> list[dict[str, Any]]:
    from pipeline.generate.scenarios import generate

    start_ms = int(time.time() * 1000) - 120_000
    gc.disable()  # a growing list of dicts sets off full collections that would double the time to build it
    try:
        return list(generate("mixed", events, seed=seed, start_ms=start_ms, events_per_s=2_000.0))
    finally:
        gc.enable()


def _decode_rate(values: list[bytes], schema_for: Any) -> float:
    from pipeline.core.decode import decode_batch

    started = time.perf_counter()
    decoded = decode_batch(values, schema_for)
    elapsed = time.perf_counter() - started
    if decoded.rejections:
        raise RuntimeError(f"bench events failed to decode: {decoded.rejections[0]}")
    return len(values) / elapsed


async def _raw_consume_rate(bootstrap: str, topic: str, partitions: int, expected: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        started = time.perf_counter()
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=2_000, max_records=50_000)
            if not batches and time.perf_counter() - started > 60:
                raise RuntimeError(f"raw consume saw {seen} of {expected} records in 60 s")
            seen += sum(len(records) for records in batches.values())
        return expected / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def _preload_operations(count: int) -> list[Any]:
    from pipeline.core.identity import Fact, FactKind, make_link

    base_ms = int(time.time() * 1000) - 30 * 86_400_000
    ops: list[Any] = []
    for i in range(count // 2):
        device, user, at = f"anonymous_id:pre-d{i}", f"user_id:pre-u{i}", base_ms + i
        ops += (Fact(device, FactKind.SEEN, at), Fact(user, FactKind.SEEN, at),
                make_link(user, device, at, "identify", ""))
    return ops


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def graph_bytes_per_identifier(ops: list[Any]) -> float:
    """The resident memory a graph built from the operations added, per identifier."""
    from pipeline.core.identity import IdentityGraph

    gc.collect()
    before = _rss_bytes()
    graph = IdentityGraph(Settings().identity.core())
    for i in range(0, len(ops), 10_000):
        graph.apply(ops[i:i + 10_000])
        graph.take_changes()
    gc.collect()
    return (_rss_bytes() - before) / max(len(graph), 1)


def _worker_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _wait_rows(client: Any, expected: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.execute("SELECT count() FROM touchpoints")[0][0] >= expected:
            return time.perf_counter()
        time.sleep(0.05)
    have = client.execute("SELECT count() FROM touchpoints")[0][0]
    raise RuntimeError(f"only {have} of {expected} touchpoint rows reached ClickHouse in {timeout_s:.0f} s")


def run_bench(settings: Settings, events: int, *, seed: int = 7, timeout_s: float = 600, identity: bool = True,
              preload_identities: int = 0, drain: bool = False) -> BenchResult:
    """drain: the worker is paused (SIGSTOP) while every event is published, then resumed, and the clock runs
    from resuming to the last row: the worker's own rate, without the publisher on the same cores."""
    from pipeline.adapters.clickhouse import connect
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher, partition_key
    from pipeline.app.bootstrap import initialise
    from pipeline.contract.registry import open_registry, parse_for_decoding

    run = uuid.uuid4().hex[:8]
    bench = settings.model_copy(deep=True)
    bench.kafka.topic = f"bench-{run}"
    bench.kafka.dead_letter_topic = f"bench-{run}.deadletter"
    bench.kafka.consumer_group = f"bench-{run}"
    bench.clickhouse.database = f"bench_{run}"
    bench.identity.enabled = identity
    initialise(bench)
    preload = _preload_operations(preload_identities) if identity and preload_identities else []
    if preload:
        from pipeline.adapters.identity_log import encode_chunks, write_chunks

        write_chunks(bench, encode_chunks(preload), "preload")

    registry = open_registry(bench.registry.url)
    encoder = TouchpointEncoder(registry, bench.registry.subject, 1)
    generated = _generated(events + 1, seed)
    warmup, generated = generated[0], generated[1:]
    keys = [partition_key(e) for e in generated]
    values = [encoder.encode(e) for e in generated]
    decoding = parse_for_decoding(registry.schema(encoder.schema_id))  # type: ignore[arg-type]
    decode_rate = _decode_rate(values, lambda _schema_id: decoding)

    bench.metrics_port = 0
    bench.window.idle_close_s = 2
    if drain:
        bench.kafka.session_timeout_s = 60  # a paused member must not be evicted (Faust caps it at 90 s)
    env = {**os.environ, **to_env(bench)}
    log_path = settings.stack.state_dir / f"bench-worker-{run}.log"
    settings.stack.state_dir.mkdir(parents=True, exist_ok=True)
    client = connect(bench.clickhouse)
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "worker"], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        publisher = TouchpointPublisher(bench.kafka.bootstrap_servers, bench.kafka.topic, encoder)
        publisher.publish(warmup)  # the clock starts once the worker has joined and written a row
        publisher.flush()
        _wait_rows(client, 1, 120)
        if drain:
            os.kill(worker.pid, signal.SIGSTOP)
        publish_started = started = time.perf_counter()
        for key, value in zip(keys, values, strict=True):
            publisher.publish_raw(value, key)
        publisher.flush()
        published = time.perf_counter()
        if drain:
            started = time.perf_counter()
            os.kill(worker.pid, signal.SIGCONT)
        finished = _wait_rows(client, events + 1, timeout_s)
        worker_rss = _worker_rss_mib(worker.pid)
        publisher.close()
        raw_rate = asyncio.run(_raw_consume_rate(bench.kafka.bootstrap_servers, bench.kafka.topic,
                                                 bench.kafka.partitions, events + 1))
    finally:
        if drain:
            os.kill(worker.pid, signal.SIGCONT)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        client.execute(f"DROP DATABASE IF EXISTS {bench.clickhouse.database}")
    per_identifier = graph_bytes_per_identifier(preload) if preload else 0.0
    return BenchResult(events=events, partitions=bench.kafka.partitions,
                       e2e_events_per_s=events / (finished - started), raw_consume_events_per_s=raw_rate,
                       decode_events_per_s=decode_rate, publish_events_per_s=events / (published - publish_started),
                       e2e_seconds=finished - started, identity=identity, preloaded_identifiers=len(preload) * 2 // 3,
                       worker_rss_mib=worker_rss, graph_bytes_per_identifier=per_identifier, drain=drain)
