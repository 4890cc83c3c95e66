"""`touchpoint bench --collector`: HTTP load on a real collector on loopback, batches of touchpoints per request;
reports the events per second the broker acknowledged and the request latency percentiles."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.settings import Settings, TenantSettings, WriteKeySettings


@dataclass(frozen=True, slots=True)
class CollectorBenchResult:
    events: int
    batch: int
    concurrency: int
    accepted: int
    seconds: float
    accepted_events_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    records_on_topic: int
    collector_rss_mib: float
    collector_cpu_s: float  # CPU time the collector's processes used during the load (all threads)
    events_per_cpu_s: float  # accepted events per second of collector CPU: the rate on an idle core


    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _load(url: str, key: str, bodies: list[bytes], concurrency: int
                ) -> tuple[list[float], dict[str, int], int, float]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    accepted = 0
    queue = iter(bodies)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one_connection(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        for body in queue:
            sent = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
            latencies.append((time.perf_counter() - sent) * 1000)
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            if response.status == 200:
                accepted += orjson.loads(answer)["accepted"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one_connection(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, statuses, accepted, elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children (uvicorn workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _delete_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="touchpoint-bench")
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()


def _records_on_topic(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 60) -> int:
    """Read the topic back and count its records (Tansu's end offsets lag, so they are not trusted)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             consumer_timeout_ms=2_000, fetch_max_bytes=64 * 1024 * 1024)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        seen = 0
        deadline = time.monotonic() + timeout_s
        while seen < expected and time.monotonic() < deadline:
            seen += sum(1 for _ in consumer)
        return seen
    finally:
        consumer.close()


def run_collector_bench(settings: Settings, events: int = 100_000, batch: int = 100, concurrency: int = 8,
                        workers: int = 1) -> CollectorBenchResult:
    """Start a collector (its own topic and key) and post `events` generated touchpoints, `batch` per request,
    over `concurrency` keep-alive connections; the clock runs from the first request to the last answer."""
    from pipeline.adapters.kafka import ensure_topics
    from pipeline.collector.keys import key_digest, new_key
    from pipeline.collector.runner import CollectorProcess, free_port
    from pipeline.generate.scenarios import generate

    run = uuid.uuid4().hex[:8]
    bench = settings.model_copy(deep=True)
    bench.kafka.topic = f"bench-collector-{run}"
    key = new_key()
    bench.collector.port = free_port()
    bench.collector.workers = workers
    bench.collector.tenants = [TenantSettings(name="bench", cors_origins=[], keys=[
        WriteKeySettings(id="bench", sha256=key_digest(key), events_per_s=1e9, burst=1_000_000_000)])]
    bench.log_level = "warning"
    ensure_topics(bench.kafka.bootstrap_servers, {bench.kafka.topic: bench.kafka.partitions})
    start_ms = int(time.time() * 1000) - 60_000
    warmup_events = 5 * batch
    generated = list(generate("mixed", events + warmup_events, seed=11, start_ms=start_ms,
                              events_per_s=events / 50))
    for event in generated:
        event["tenant"] = "bench"
    bodies = [orjson.dumps(generated[i:i + batch]) for i in range(0, len(generated), batch)]
    warmup, bodies = bodies[:5], bodies[5:]
    settings.stack.state_dir.mkdir(parents=True, exist_ok=True)
    collector = CollectorProcess(bench, settings.stack.state_dir / f"bench-collector-{run}.log")
    try:
        collector.wait_ready()
        url = collector.url + "/v1/touchpoints"
        asyncio.run(_load(url, key, warmup, 2))  # warm-up: connections, metadata, first batches
        cpu_before = _cpu_seconds(collector.process.pid)
        latencies, statuses, accepted, elapsed = asyncio.run(_load(url, key, bodies, concurrency))
        cpu = _cpu_seconds(collector.process.pid) - cpu_before
        rss = collector.rss_mib()
    finally:
        collector.stop()
    on_topic = _records_on_topic(bench.kafka.bootstrap_servers, bench.kafka.topic, bench.kafka.partitions,
                                 accepted + warmup_events) - warmup_events
    _delete_topic(bench.kafka.bootstrap_servers, bench.kafka.topic)
    return CollectorBenchResult(
        events=events, batch=batch, concurrency=concurrency, accepted=accepted, seconds=elapsed,
        accepted_events_per_s=accepted / elapsed, requests_per_s=len(bodies) / elapsed,
        p50_ms=_percentile(latencies, 0.50), p99_ms=_percentile(latencies, 0.99), max_ms=max(latencies),
        statuses=statuses, records_on_topic=on_topic, collector_rss_mib=rss, collector_cpu_s=cpu,
        events_per_cpu_s=accepted / cpu if cpu else 0.0)
