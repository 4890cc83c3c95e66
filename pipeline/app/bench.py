"""`touchpoint bench`: three rates of the same generated events, measured in one run.

* decode: fastavro decoding of the encoded events alone (the core's decode step, no I/O);
* raw consume: aiokafka `getmany` reading the published topic, manually assigned, nothing else done;
* end to end: a real `touchpoint worker` is running and idle; the clock starts when publishing starts and stops
  when the last touchpoint row is in ClickHouse.

Besides rates, the cost of the same run: the worker's CPU seconds (user + system of the worker process, every
thread: the event loop, the ClickHouse writer thread, the Kafka clients' work; not the broker's, ClickHouse's nor
this process's) from the start of the clock to the last row, per event, against fastavro's decode time per event
of the same events; and start-up, from launching the worker to its first row in ClickHouse.

With `preload_identities` the identity log is filled first with that many identifiers (half persons' user ids,
half their devices, linked), so the worker resolves every event against a graph of that size; the worker's
resident memory is read at the end, and the graph's own memory per identifier is measured in this process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings import Settings, to_env

RSS_SAMPLE_EVERY_S = 2.0


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
    startup_s: float = 0.0  # launching the worker -> its first row in ClickHouse
    worker_cpu_s: float = 0.0  # user + system CPU of the worker process while the clock ran
    worker_runqueue_wait_s: float = 0.0  # ...and how long its threads waited for a core meanwhile
    worker_cpu_us_per_event: float = 0.0
    decode_us_per_event: float = 0.0  # CPU time of fastavro decoding alone (the yardstick)
    pipeline_decode_us_per_event: float = 0.0  # CPU time of the worker's decode step (compiled decoders)
    e2e_over_decode: float = 0.0  # goal: >= 1.0
    cpu_over_decode: float = 0.0  # worker CPU per event / decode time per event; goal: <= 1.0
    e2e_over_publish: float = 0.0  # without --drain the publisher sets the pace: goal >= 0.95
    worker_rss_mib_over_time: list[tuple[float, float]] = field(default_factory=list)  # (s since clock start, MiB)
    profile_path: str = ""
    identity_store: str = "memory://"
    restart_s: float = 0.0  # rocksdb:// only: restarted worker spawned -> first row (its local store + the tail)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Cost:
    worker_cpu_us_per_event: float
    decode_us_per_event: float
    pipeline_decode_us_per_event: float
    e2e_over_decode: float
    cpu_over_decode: float
    e2e_over_publish: float


def cost_of(events: int, e2e_events_per_s: float, decode_events_per_s: float, publish_events_per_s: float,
            worker_cpu_s: float, decode_cpu_s: float, pipeline_decode_cpu_s: float) -> Cost:
    """The cost figures of one run of `events` events: the worker's CPU microseconds per event against decoding's
    (both CPU time, so other load on the machine does not tilt them), and the rates' ratios (wall clock)."""
    decode_us = decode_cpu_s * 1e6 / events
    worker_us = worker_cpu_s * 1e6 / events
    return Cost(worker_cpu_us_per_event=worker_us, decode_us_per_event=decode_us,
                pipeline_decode_us_per_event=pipeline_decode_cpu_s * 1e6 / events,
                e2e_over_decode=e2e_events_per_s / decode_events_per_s, cpu_over_decode=worker_us / decode_us,
                e2e_over_publish=e2e_events_per_s / publish_events_per_s)


def cpu_seconds(stat_line: str, ticks_per_s: int) -> float:
    """User + system CPU seconds of a process from its /proc/<pid>/stat line (fields 14 and 15, in clock ticks;
    the command name in parentheses may hold spaces, so fields are counted after its closing parenthesis)."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def _worker_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        return cpu_seconds(stat.read(), os.sysconf("SC_CLK_TCK"))


def _worker_runqueue_wait_s(pid: int) -> float:
    """Seconds the worker's threads were ready to run but waited for a core (the scheduler's /proc schedstat,
    summed over the threads alive now): the share of the wall clock that other processes on the cores took."""
    waited_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                waited_ns += int(schedstat.read().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # a thread that ended meanwhile, or a kernel without schedstat
    return waited_ns / 1e9


def _generated(events: int, seed: int) -> list[dict[str, Any]]:
    from pipeline.generate.scenarios import generate

    start_ms = int(time.time() * 1000) - 120_000
    gc.disable()  # a growing list of dicts sets off full collections that would double the time to build it
    try:
        return list(generate("mixed", events, seed=seed, start_ms=start_ms, events_per_s=2_000.0))
    finally:
        gc.enable()


def _decode_rate(values: list[bytes], schema_for: Any, decoder: Callable[..., Any]) -> tuple[float, float]:
    """Events decoded per second (wall clock) and the CPU seconds it took (this process, one thread): the CPU
    figure stands against the worker's CPU even when other processes share the cores."""
    started, cpu_started = time.perf_counter(), time.process_time()
    decoded = decoder(values, schema_for)
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    if decoded.rejections:
        raise RuntimeError(f"bench events failed to decode: {decoded.rejections[0]}")
    return len(values) / elapsed, cpu_s


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
    return _preload_range(0, count // 2)


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


def _wait_rows(client: Any, expected: int, timeout_s: float, *,
               every_2_s: Callable[[], None] | None = None) -> float:
    """When `expected` touchpoint rows are in ClickHouse (perf_counter); `every_2_s` is called meanwhile."""
    from pipeline.adapters.clickhouse_queries import touchpoint_rows

    deadline = time.monotonic() + timeout_s
    sampled = 0.0
    while time.monotonic() < deadline:
        if touchpoint_rows(client) >= expected:
            return time.perf_counter()
        if every_2_s is not None and time.monotonic() - sampled >= RSS_SAMPLE_EVERY_S:
            sampled = time.monotonic()
            every_2_s()
        time.sleep(0.05)
    have = touchpoint_rows(client)
    raise RuntimeError(f"only {have} of {expected} touchpoint rows reached ClickHouse in {timeout_s:.0f} s")


def run_bench(settings: Settings, events: int, *, seed: int = 7, timeout_s: float = 600, identity: bool = True,
              preload_identities: int = 0, drain: bool = False, profile: Path | None = None,
              identity_seed: Path | None = None) -> BenchResult:
    """drain: the worker is paused (SIGSTOP) while every event is published, then resumed, and the clock runs
    from resuming to the last row: the worker's own rate, without the publisher on the same cores.
    profile: the worker writes a cProfile of its whole run (CPU time, every thread) there, and its top functions
    beside it (PATH.txt); profiling slows the worker, so that run's rates and CPU are not its usual ones."""
    from pipeline.adapters.clickhouse import connect, drop_database
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher, partition_key
    from pipeline.app.bootstrap import initialise
    from pipeline.contract.registry import open_registry, parse_for_decoding
    from pipeline.core.decode import decode_batch, decode_batch_with_fastavro

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
        from pipeline.adapters.identity_log import write_operations

        write_operations(bench, preload, "preload")

    registry = open_registry(bench.registry.url)
    encoder = TouchpointEncoder(registry, bench.registry.subject, 1)
    generated = _generated(events + 1, seed)
    warmup, generated = generated[0], generated[1:]
    keys = [partition_key(e) for e in generated]
    values = [encoder.encode(e) for e in generated]
    decoding = parse_for_decoding(registry.schema(encoder.schema_id))  # type: ignore[arg-type]
    decode_rate, decode_cpu_s = _decode_rate(values, lambda _schema_id: decoding, decode_batch_with_fastavro)
    # The worker's own decode step (compiled decoders, fastavro for the rest), beside the yardstick.
    _, pipeline_decode_cpu_s = _decode_rate(values, lambda _schema_id: decoding, decode_batch)

    bench.metrics_port = 0
    bench.window.idle_close_s = 2
    if drain:
        bench.kafka.session_timeout_s = 60  # a paused member must not be evicted (Faust caps it at 90 s)
    if profile is not None:
        bench.profile_path = str(profile.resolve())
    if identity_seed is not None:  # the worker starts with an existing local store: a copy of this one
        from pipeline.adapters.identity_store import seed_graph_state

        bench.identity.store = "rocksdb://"
        seed_graph_state(identity_seed, bench.stack.state_dir / "identity" / bench.kafka.consumer_group)
    env = {**os.environ, **to_env(bench)}
    log_path = settings.stack.state_dir / f"bench-worker-{run}.log"
    settings.stack.state_dir.mkdir(parents=True, exist_ok=True)
    client = connect(bench.clickhouse)
    publisher = TouchpointPublisher(bench.kafka.bootstrap_servers, bench.kafka.topic, encoder)
    publisher.publish(warmup)  # waiting before the worker starts: its first row ends the start-up time
    publisher.flush()
    launched = time.perf_counter()
    worker = _spawn_worker(log_path, "w", env)
    rss_over_time: list[tuple[float, float]] = []
    try:
        # The clock starts once the worker has written a row; a first start reads the whole identity log.
        startup_s = _wait_rows(client, 1, 1_800) - launched
        if drain:
            os.kill(worker.pid, signal.SIGSTOP)
        publish_started = started = time.perf_counter()
        cpu_before, waited_before = _worker_cpu_s(worker.pid), _worker_runqueue_wait_s(worker.pid)
        for key, value in zip(keys, values, strict=True):
            publisher.publish_raw(value, key)
        publisher.flush()
        published = time.perf_counter()
        if drain:
            started = time.perf_counter()
            # Stopped since the first row: nothing spent meanwhile.
            cpu_before, waited_before = _worker_cpu_s(worker.pid), _worker_runqueue_wait_s(worker.pid)
            os.kill(worker.pid, signal.SIGCONT)

        def sample_rss() -> None:
            rss_over_time.append((round(time.perf_counter() - started, 1), round(_worker_rss_mib(worker.pid), 1)))

        finished = _wait_rows(client, events + 1, timeout_s, every_2_s=sample_rss)
        worker_cpu_s = _worker_cpu_s(worker.pid) - cpu_before
        waited_s = _worker_runqueue_wait_s(worker.pid) - waited_before
        worker_rss = _worker_rss_mib(worker.pid)
        rss_over_time.append((round(finished - started, 1), round(worker_rss, 1)))
        restart_s = 0.0
        if identity and bench.identity.store.startswith("rocksdb"):
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            launched = time.perf_counter()
            worker = _spawn_worker(log_path, "a", env)
            late = dict(warmup, event_id="restart-probe", event_time=warmup["event_time"] + 1)
            publisher.publish(late)
            publisher.flush()
            restart_s = _wait_rows(client, events + 2, 600) - launched
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
        drop_database(bench.clickhouse)
        shutil.rmtree(bench.stack.state_dir / "identity" / bench.kafka.consumer_group, ignore_errors=True)
    if profile is not None:
        _write_top_functions(profile)
    per_identifier = graph_bytes_per_identifier(preload) if preload else 0.0
    e2e_rate, publish_rate = events / (finished - started), events / (published - publish_started)
    cost = cost_of(events, e2e_rate, decode_rate, publish_rate, worker_cpu_s, decode_cpu_s, pipeline_decode_cpu_s)
    return BenchResult(events=events, partitions=bench.kafka.partitions, e2e_events_per_s=e2e_rate,
                       raw_consume_events_per_s=raw_rate, decode_events_per_s=decode_rate,
                       publish_events_per_s=publish_rate, e2e_seconds=finished - started, identity=identity,
                       preloaded_identifiers=len(preload) * 2 // 3, worker_rss_mib=worker_rss,
                       graph_bytes_per_identifier=per_identifier, drain=drain, startup_s=startup_s,
                       worker_cpu_s=worker_cpu_s, worker_runqueue_wait_s=waited_s,
                       worker_rss_mib_over_time=rss_over_time, identity_store=bench.identity.store,
                       restart_s=restart_s, profile_path=str(profile or ""), **asdict(cost))


def _spawn_worker(log_path: Path, mode: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open(mode) as log:
        return subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "worker"], stdout=log,
                                stderr=subprocess.STDOUT, env=env)


def _write_top_functions(profile: Path, top: int = 40) -> None:
    """The profile's costliest functions, by own time and by cumulative time, as text beside it."""
    import io
    import pstats

    if not profile.exists():
        raise RuntimeError(f"the worker wrote no profile to {profile} (see its log in the state directory)")
    text = io.StringIO()
    stats = pstats.Stats(str(profile), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    profile.with_name(profile.name + ".txt").write_text(text.getvalue())
# -- the identity graph at scale, in-process ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class IdentityScaleResult:
    identifiers: int
    store: str  # memory | rocksdb
    build_ops_per_s: float
    rss_mib: float  # this process, after building and enriching
    reopen_s: float  # rocksdb: opening the existing store and the graph on it (a restart's local part)
    enrich_us_per_event: float  # CPU of the enriching thread; uniform random look-ups of preloaded persons
    disk_mib: float
    mixed_enrich_us_per_event: float = 0.0  # the generator's mixed scenario: new visitors, sessions, sign-ins

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scale_events(count: int, identifiers: int, seed: int, start_ms: int) -> list[dict[str, Any]]:
    """Page views of preloaded devices (a third signed in with their user id), spread over the whole graph."""
    import random

    rng = random.Random(seed)
    events = []
    for n in range(count):
        i = rng.randrange(max(identifiers // 2, 1))
        ids: dict[str, Any] = {"anonymous_id": f"pre-d{i}", "user_id": f"pre-u{i}" if n % 3 == 0 else None,
                               "customer_id": None}
        events.append({"event_id": f"s{n}", "event_time": start_ms + n, "channel": "WEB",
                       "event_type": "page_view", "identifiers": ids})
    return events


def run_identity_scale(identifiers: int, store: str, directory: str, *, events: int = 200_000,
                       seed: int = 7) -> IdentityScaleResult:
    """Build a graph of `identifiers` (as the bench's preload: half devices, half user ids, linked) in the given
    store, then time enrichment of `events` events against it. With rocksdb and an existing store under
    `directory`, the build is skipped and the reopen timed."""
    from pathlib import Path

    from pipeline.adapters.identity_store import open_graph_state
    from pipeline.core.enrich import Enricher
    from pipeline.core.identity import GraphState, IdentityGraph, MemoryState
    from pipeline.settings import Settings

    cache = Settings().identity.graph_cache_entries
    started = time.perf_counter()
    state: GraphState = MemoryState() if store == "memory" else open_graph_state(Path(directory), cache)
    identity_config = Settings().identity.core()
    graph = IdentityGraph(identity_config, state=state)
    reopen_s = time.perf_counter() - started if len(graph) else 0.0
    build_rate = 0.0
    if not len(graph):
        built = time.perf_counter()
        chunk = 30_000
        done = 0
        gc.disable()
        try:
            for first in range(0, identifiers, chunk):
                ops = _preload_range(first // 2, min(first + chunk, identifiers) // 2)
                graph.apply(ops)
                graph.take_changes()
                done += len(ops)
        finally:
            gc.enable()
        build_rate = done / (time.perf_counter() - built)
    enricher = Enricher(identity_config, state=state)
    sample = _scale_events(events, len(enricher.graph or ()), seed, int(time.time() * 1000))
    gc.collect()
    began = time.thread_time()  # this thread's CPU: other processes on the cores do not count
    for i in range(0, len(sample), 5_000):
        enricher.enrich(sample[i:i + 5_000])
        enricher.take_output()
    per_event = (time.thread_time() - began) / len(sample) * 1e6
    mixed = _generated(events, seed + 1)
    began = time.thread_time()
    for i in range(0, len(mixed), 5_000):
        enricher.enrich(mixed[i:i + 5_000])
        enricher.take_output()
    mixed_per_event = (time.thread_time() - began) / len(mixed) * 1e6
    rss = _rss_bytes() / 2**20
    close = getattr(state, "close", None)
    if close is not None:
        close()  # kept consistent for a reopen (--identity-seed)
    disk = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()) if store != "memory" else 0
    return IdentityScaleResult(len(enricher.graph or ()), store, build_rate, rss, reopen_s,
                               per_event, disk / 2**20, mixed_per_event)


def _preload_range(start: int, stop: int) -> list[Any]:
    """Persons start..stop-1 of the preload: a device and a user id each, seen and linked a month ago."""
    from pipeline.core.identity import Fact, FactKind, make_link

    base_ms = int(time.time() * 1000) - 30 * 86_400_000
    ops: list[Any] = []
    for i in range(start, stop):
        device, user, at = f"anonymous_id:pre-d{i}", f"user_id:pre-u{i}", base_ms + i
        ops += (Fact(device, FactKind.SEEN, at), Fact(user, FactKind.SEEN, at),
                make_link(user, device, at, "identify", ""))
    return ops
