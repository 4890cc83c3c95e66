"""Pipeline health for the console: per-partition consumer lag and watermark lag (checkpoints in ClickHouse
against the topic's end offsets in Kafka), the last flush, insert failures (from a local worker's /metrics when
one answers) and dead letters by reason with examples."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

from pipeline.adapters.clickhouse_queries import ConsoleQueries
from pipeline.settings import Settings

EXAMPLES_PER_REASON = 3
CACHE_S = 4.0  # the page polls every few seconds; Kafka is read at most this often


def scrape_counter(url: str, name: str, timeout_s: float = 0.5) -> float | None:
    """Sum of a Prometheus counter's samples at a /metrics URL; None when nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            metric = line.split(" ", 1)[0].split("{", 1)[0]
            if metric in (name, f"{name}_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


class HealthSource:
    def __init__(self, settings: Settings, queries: ConsoleQueries) -> None:
        self.settings = settings
        self.queries = queries
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            result = self._read()
            self._cached = (time.monotonic(), result)
            return result

    def _read(self) -> dict[str, Any]:
        from pipeline.adapters.kafka import end_offsets
        from pipeline.app.deadletters import list_dead_letters

        settings = self.settings
        now_ms = int(time.time() * 1000)
        errors: list[str] = []
        try:
            ends = end_offsets(settings.kafka.bootstrap_servers, settings.kafka.topic)
        except Exception as exc:  # the broker may be down: health says so instead of failing
            ends = {}
            errors.append(f"Kafka: {type(exc).__name__}: {exc}")
        checkpoints = {c.partition: c for c in self.queries.checkpoints(settings.kafka.consumer_group,
                                                                        settings.kafka.topic)}
        partitions = []
        for partition in sorted(set(ends) | set(checkpoints)):
            cp = checkpoints.get(partition)
            end = ends.get(partition)
            partitions.append({
                "partition": partition, "end_offset": end,
                "read_offset": None if cp is None else cp.read_offset,
                "commit_offset": None if cp is None else cp.commit_offset,
                "lag_events": None if cp is None or end is None else max(0, end - cp.read_offset),
                "watermark_ms": None if cp is None else cp.watermark_ms,
                "watermark_lag_s": None if cp is None or cp.watermark_ms <= 0 else (now_ms - cp.watermark_ms) / 1000,
                "closed_before_ms": None if cp is None else cp.closed_before_ms,
                "checkpoint_at_ms": None if cp is None else cp.written_at_ms,
            })
        last_checkpoint = max((c.written_at_ms for c in checkpoints.values()), default=None)
        dead: dict[str, Any] = {"by_reason": {}, "examples": {}, "scanned": 0}
        try:
            listing = list_dead_letters(settings, newest=settings.console.dead_letters_scanned, queries=self.queries)
            examples: dict[str, list[dict[str, Any]]] = {}
            for letter in sorted(listing.dead_letters, key=lambda d: d.timestamp_ms, reverse=True):
                chosen = examples.setdefault(letter.reason, [])
                if len(chosen) < EXAMPLES_PER_REASON:
                    chosen.append(letter.as_dict())
            dead = {"by_reason": listing.by_reason, "examples": examples, "scanned": listing.scanned}
        except Exception as exc:
            errors.append(f"dead letters: {type(exc).__name__}: {exc}")
        failures = None
        if settings.metrics_port:
            failures = scrape_counter(f"http://127.0.0.1:{settings.metrics_port}/metrics",
                                      "touchpoint_clickhouse_insert_failures")
        return {
            "now_ms": now_ms, "consumer_group": settings.kafka.consumer_group, "topic": settings.kafka.topic,
            "partitions": partitions, "last_checkpoint_ms": last_checkpoint,
            "last_rows_written_ms": self.queries.last_rows_written_ms(),
            "insert_failures": failures,
            "insert_failures_note": ("from the worker's /metrics on this machine" if failures is not None else
                                     "no worker /metrics answered on this machine (see Prometheus)"),
            "dead_letters": dead, "errors": errors,
        }
