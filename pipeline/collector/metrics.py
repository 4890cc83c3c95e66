"""Prometheus metrics of the collector, served at its own GET /metrics. A registry of its own, apart from the
worker's. Labels are bounded sets: configured tenants, result statuses and reasons, endpoints, HTTP codes."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class CollectorMetrics:
    def __init__(self, unacked: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter("touchpoint_collector_events", "Touchpoints answered, by tenant, status "
                              "(accepted, rejected, unavailable) and reason.", ["tenant", "status", "reason"],
                              registry=self.registry)
        self.requests = Counter("touchpoint_collector_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "code"], registry=self.registry)
        self.seconds = Histogram("touchpoint_collector_request_duration_seconds",
                                 "Time from the request to its answer (including the broker's acknowledgements).",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.unacked = Gauge("touchpoint_collector_unacked_events",
                             "Touchpoints handed to the producer and not yet acknowledged or failed.",
                             registry=self.registry)
        self.unacked.set_function(unacked)

    def answered(self, endpoint: str, code: int, seconds: float, tenant: str | None,
                 results: list[dict[str, Any]]) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.seconds.labels(endpoint).observe(seconds)
        if tenant is None or not results:
            return
        tally = Tally((r["status"], r.get("reason", "")) for r in results)
        for (status, reason), count in tally.items():
            self.events.labels(tenant, status, reason).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
