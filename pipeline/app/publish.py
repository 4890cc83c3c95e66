"""`touchpoint publish FILE`: check the whole file first, then publish nothing or every good line, and report
what the broker acknowledged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.adapters.kafka import BOOTSTRAP_TIMEOUT_MS, BadLine, TouchpointEncoder, TouchpointPublisher, read_jsonl
from pipeline.contract.registry import open_registry
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class PublishReport:
    good: int  # lines that passed every check
    bad: list[BadLine]  # lines that did not, with the reason
    sent: bool  # False: nothing was sent (bad lines and no --skip-bad)
    delivered: int  # records the broker acknowledged
    undelivered: list[BadLine]  # good lines the broker did not acknowledge, with the reason


def publish_file(settings: Settings, path: Path, now_ms: int, *, schema_version: int | None = None,
                 skip_bad: bool = False) -> PublishReport:
    encoder = TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject, schema_version)
    good, bad = read_jsonl(path, encoder, now_ms, settings.window.max_future_s * 1000,
                           settings.kafka.max_message_bytes)
    if (bad and not skip_bad) or not good:
        return PublishReport(len(good), bad, False, 0, [])
    publisher = TouchpointPublisher(settings.kafka.bootstrap_servers, settings.kafka.topic, encoder,
                                    bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        failed = publisher.deliver([event for _, event in good])
    finally:
        publisher.producer.close(timeout=10)
    undelivered = [BadLine(good[index][0], reason) for index, reason in failed]
    return PublishReport(len(good), bad, True, len(good) - len(failed), undelivered)
