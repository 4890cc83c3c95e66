"""Prometheus metrics of a worker. Labels are bounded sets (channel, reason, table, partition, rule):
person ids never become labels."""

from __future__ import annotations

import collections
import logging
from operator import attrgetter
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from pipeline.core.processor import Output

log = logging.getLogger("touchpoint.worker")
_CHANNEL = attrgetter("channel")

EVENTS_IN = Counter("touchpoint_events_in", "Valid touchpoints read, by channel.", ["channel"])
EVENTS_OUT = Counter("touchpoint_events_out", "Touchpoints written to ClickHouse, by channel.", ["channel"])
DEAD_LETTERED = Counter("touchpoint_events_dead_lettered",
                        "Records sent to the dead-letter topic, by channel ('unknown' if undecodable) and reason.",
                        ["channel", "reason"])
LATE = Counter("touchpoint_events_late",
               "Touchpoints whose window had already closed: kept in the raw table, not in indicators.",
               ["channel"])
DUPLICATES = Counter("touchpoint_events_duplicate", "Touchpoints whose event_id was already counted.", ["channel"])
CROSS_PARTITION_DUPLICATES = Counter(
    "touchpoint_events_cross_partition_duplicate",
    "Touchpoints whose event_id this worker also counted on another partition in the same window: counted twice. "
    "A sender keyed a retry differently; see the README's dedup guarantee.", ["channel"])
BATCH_SIZE = Histogram("touchpoint_batch_size_events", "Records per flush to ClickHouse.",
                       buckets=(10, 100, 500, 1_000, 2_500, 5_000, 10_000, 20_000, 50_000, 100_000))
INSERT_SECONDS = Histogram("touchpoint_clickhouse_insert_duration_seconds",
                           "Time of one ClickHouse insert, by table.", ["table"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
INSERT_FAILURES = Counter("touchpoint_clickhouse_insert_failures",
                          "Failed ClickHouse writes (retried with backoff; nothing is committed meanwhile).")
CONSUMER_LAG = Gauge("touchpoint_consumer_lag_events", "Records not yet read (high watermark - position).",
                     ["topic", "partition"])
WATERMARK_LAG = Gauge("touchpoint_watermark_lag_seconds", "Wall clock minus the partition's event-time watermark.",
                      ["partition"])
IDENTIFIERS = Gauge("touchpoint_identity_identifiers", "Identifiers in this worker's copy of the identity graph.")
IDENTITY_DECISIONS = Counter("touchpoint_identity_decisions",
                             "Identity graph decisions: merge, refuse_conflict, refuse_max_values, refuse_limit, "
                             "refuse_unmerged, unmerge, not_restated, forget.", ["action"])
RESTATED = Counter("touchpoint_identity_restated_rows",
                   "Stored touchpoints rewritten after an unmerge or a late identify (person, role, their counts).")
ROLE_TRANSITIONS = Counter("touchpoint_role_transitions", "Role changes written, by new role.", ["to_role"])
STORE_RETRIES = Counter("touchpoint_store_retries",
                        "Store writes retried after a failure (the backoff doubles up to batch.retry_max_s).")
LAST_FLUSH = Gauge("touchpoint_last_flush_timestamp_seconds",
                   "When this worker last stored a flush (and committed its offsets): a stale value means stuck.")
HEARTBEAT = Gauge("touchpoint_event_loop_heartbeat_timestamp_seconds",
                  "When the worker's fetch loop last came round: /metrics answers from its own thread, so a stuck "
                  "event loop shows as a stale heartbeat.")


class PrometheusObserver:
    """The runner's reports as metrics."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def flushed(self, output: Output, at_s: float) -> None:
        BATCH_SIZE.observe(output.records)
        for channel, n in output.events_in.items():
            EVENTS_IN.labels(channel).inc(n)
        # Counted per label first: a labelled child is a lock and a dict lookup, too dear once per row.
        for channel, n in collections.Counter(map(_CHANNEL, output.touchpoints)).items():
            EVENTS_OUT.labels(channel).inc(n)
        for (channel, reason), n in collections.Counter((d.channel, d.reason) for d in output.dead_letters).items():
            DEAD_LETTERED.labels(channel, reason).inc(n)
        for channel, n in output.late.items():
            LATE.labels(channel).inc(n)
        for channel, n in output.duplicates.items():
            DUPLICATES.labels(channel).inc(n)
        for channel, n in output.cross_partition_duplicates.items():
            CROSS_PARTITION_DUPLICATES.labels(channel).inc(n)
        for action, n in collections.Counter(record.action for record in output.identity.audit).items():
            IDENTITY_DECISIONS.labels(action).inc(n)
        if output.restated:
            RESTATED.inc(len(output.restated))
        for role, n in collections.Counter(transition.to_role for transition in output.identity.transitions).items():
            ROLE_TRANSITIONS.labels(role).inc(n)
        LAST_FLUSH.set(at_s)

    def store_failed(self, error: BaseException, attempt: int, retry_in_s: float) -> None:
        INSERT_FAILURES.inc()
        STORE_RETRIES.inc()

    def commit_failed(self, error: BaseException) -> None:
        """Logged by the runner; a later commit covers it."""

    def progress(self, partition: int, lag: int | None, watermark_ms: int | None, now_ms: int) -> None:
        if lag is not None:
            CONSUMER_LAG.labels(self.topic, str(partition)).set(lag)
        if watermark_ms is not None:
            WATERMARK_LAG.labels(str(partition)).set((now_ms - watermark_ms) / 1000)

    def heartbeat(self, at_s: float) -> None:
        HEARTBEAT.set(at_s)

    def identifiers(self, count: int) -> None:
        IDENTIFIERS.set(count)

    def forget(self, partition: int) -> None:
        forget_partition(self.topic, partition)


def observe_insert(table: str, seconds: float, rows: int) -> None:
    INSERT_SECONDS.labels(table).observe(seconds)


def forget_partition(topic: str, partition: int) -> None:
    """A partition this worker no longer reads: drop its gauges so they do not report a stale value."""
    for gauge, labels in ((CONSUMER_LAG, (topic, str(partition))), (WATERMARK_LAG, (str(partition),))):
        try:
            gauge.remove(*labels)
        except KeyError:
            pass


def serve(port: int, host: str = "127.0.0.1") -> WSGIServer | None:
    """Expose /metrics on this address (port 0 disables it); the server, to stop it (tests)."""
    if port:
        server, _ = start_http_server(port, addr=host)
        return server
    return None
