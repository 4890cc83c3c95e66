"""Prometheus metrics of a worker. Labels are bounded sets (channel, reason, table, partition, rule):
person ids never become labels."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter("touchpoint_events_in", "Valid touchpoints read, by channel.", ["channel"])
EVENTS_OUT = Counter("touchpoint_events_out", "Touchpoints written to ClickHouse, by channel.", ["channel"])
DEAD_LETTERED = Counter("touchpoint_events_dead_lettered",
                        "Records sent to the dead-letter topic, by channel ('unknown' if undecodable) and reason.",
                        ["channel", "reason"])
LATE = Counter("touchpoint_events_late",
               "Touchpoints whose window had already closed: kept in the raw table, not in indicators.",
               ["channel"])
DUPLICATES = Counter("touchpoint_events_duplicate", "Touchpoints whose event_id was already counted.", ["channel"])
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
                             "Identity graph decisions: merge, refuse_conflict, refuse_limit, forget.", ["action"])
ROLE_TRANSITIONS = Counter("touchpoint_role_transitions", "Role changes written, by new role.", ["to_role"])
ALERTS_FIRED = Counter("touchpoint_alerts_fired", "Alerts raised, by rule and severity.", ["rule", "severity"])
# Liveness, set by the runner (deploy/prometheus/alerts.yml fires when they go stale):
LAST_FLUSH = Gauge("touchpoint_last_flush_timestamp_seconds",
                   "Unix time of the last flush cycle that succeeded (an idle worker's empty flush counts).")
EVENT_LOOP_HEARTBEAT = Gauge("touchpoint_event_loop_heartbeat_timestamp_seconds",
                             "Unix time the worker's event loop last ran its heartbeat task: stale when it is stuck, "
                             "even though /metrics, served from its own thread, still answers.")


def observe_insert(table: str, seconds: float, rows: int) -> None:
    INSERT_SECONDS.labels(table).observe(seconds)


def forget_partition(topic: str, partition: int) -> None:
    """A partition this worker no longer reads: drop its gauges so they do not report a stale value."""
    for gauge, labels in ((CONSUMER_LAG, (topic, str(partition))), (WATERMARK_LAG, (str(partition),))):
        try:
            gauge.remove(*labels)
        except KeyError:
            pass


def serve(port: int, host: str | None = None) -> WSGIServer | None:
    """Expose /metrics on this port (0 disables it), on the address of the metrics_host setting by default
    (loopback: a container deployment sets 0.0.0.0 so Prometheus reaches it)."""
    if port:
        if host is None:
            from pipeline.settings import get_settings

            host = get_settings().metrics_host
        server, _ = start_http_server(port, addr=host)
        return server
    return None
