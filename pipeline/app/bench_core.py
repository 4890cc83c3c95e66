"""`python -m pipeline.app.bench_core`: the core's cost per event with and without journeys and profiles, in process
(no Kafka, no ClickHouse): the same generated, encoded events through TouchpointProcessor, runs alternated, the
median of each kept."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.contract.registry import open_registry, parse_for_decoding
from pipeline.core.processor import TouchpointProcessor
from pipeline.settings import Settings


@dataclass(slots=True)
class _Record:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()


def _records(events: int, seed: int, settings: Settings) -> tuple[list[_Record], int, Any]:
    from pipeline.adapters.kafka import TouchpointEncoder
    from pipeline.generate.scenarios import generate

    registry = open_registry(settings.registry.url)
    encoder = TouchpointEncoder(registry, settings.registry.subject, 2)
    start_ms = 1_767_225_600_000
    generated = list(generate("mixed", events, seed=seed, start_ms=start_ms, events_per_s=2_000.0,
                              schema_version=2))
    records = [_Record(0, n, encoder.encode(e)) for n, e in enumerate(generated)]
    schema = parse_for_decoding(registry.version(settings.registry.subject, 2)[1])
    return records, generated[-1]["event_time"], lambda schema_id: schema if schema_id == encoder.schema_id else None


def _run(records: list[_Record], last_ms: int, schema_for: Any, settings: Settings, journeys: bool,
         batch: int) -> tuple[float, int]:
    processor = TouchpointProcessor(settings.window.core(), schema_for, settings.identity.core(),
                                    journeys=settings.journeys.core() if journeys else None)
    processor.assign(0, None, now_ms=last_ms)
    closed = 0
    started = time.process_time()  # CPU time of this process: the machine's other load counts less
    for start in range(0, len(records), batch):
        processor.process(0, records[start:start + batch], now_ms=last_ms)
        closed += len(processor.take_output().journeys)
    processor.tick(last_ms + 30 * 86_400_000, caught_up={0})
    closed += len(processor.take_output().journeys)
    return time.process_time() - started, closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    settings = Settings()
    gc.set_threshold(100_000, 50, 100)  # as the worker runs (pipeline/adapters/worker.py run_worker)
    records, last_ms, schema_for = _records(args.events, 1, settings)
    timings: dict[bool, list[float]] = {False: [], True: []}
    journeys_closed = 0
    _run(records, last_ms, schema_for, settings, True, args.batch)  # warm-up
    for _ in range(args.runs):
        for with_journeys in (False, True):
            seconds, closed = _run(records, last_ms, schema_for, settings, with_journeys, args.batch)
            timings[with_journeys].append(seconds)
            journeys_closed = max(journeys_closed, closed)
    without, with_ = statistics.median(timings[False]), statistics.median(timings[True])
    per = 1e6 / args.events
    print(f"events {args.events}, runs {args.runs}, journeys closed {journeys_closed}")
    print(f"without journeys: median {without * per:.2f} us/event  runs {[round(t, 3) for t in timings[False]]} s")
    print(f"with journeys:    median {with_ * per:.2f} us/event  runs {[round(t, 3) for t in timings[True]]} s")
    print(f"ratio {with_ / without:.3f} (+{100 * (with_ / without - 1):.1f} %)")


if __name__ == "__main__":
    main()
