"""Dead letters as a tool: list them (decoded where they decode, hex where not) and replay chosen ones to the
touchpoint topic once the cause is fixed.

A replay re-publishes the dead letter's original key and bytes, so the event keeps its event id and lands on the
partition its key chose the first time. Nothing is counted twice:

* a dead letter was never counted (the worker dead-letters an event instead of folding it into a window);
* a replayed event whose pane is still open counts once: the worker counts an event id once per pane;
* one whose pane has closed is late: stored in `touchpoints` with counted = 0, in no indicator;
* `touchpoints` folds copies of an event id (ReplacingMergeTree, the counted copy wins), and each replay is
  recorded in `dead_letter_replays`, so a second `replay` skips what was replayed unless told otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.adapters.clickhouse_queries import ConsoleQueries
from pipeline.adapters.kafka import StoredRecord, publish_records, read_records
from pipeline.contract.registry import open_registry, parse_for_decoding
from pipeline.core.decode import decode_batch
from pipeline.core.validate import violation
from pipeline.settings import Settings

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HEX_BYTES = 256  # how much of an undecodable record is shown


class DeadLetterError(ValueError):
    """An operator's mistake (a bad --since, an unknown offset): one line, no traceback."""


def parse_since(text: str, now_ms: int) -> int:
    """'15m', '2h', '1d' (ago) or an ISO 8601 time (UTC unless it says otherwise) -> epoch ms."""
    match = _RELATIVE.match(text)
    if match:
        return now_ms - int(float(match[1]) * _UNIT_S[match[2]] * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DeadLetterError(f"--since {text!r}: give a duration like 15m, 2h, 1d or a time like "
                              "2026-11-29T08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(slots=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp_ms: int
    reason: str
    detail: str
    channel: str
    source: str  # topic/partition/offset it was read from
    key: str
    event_id: str | None  # when the bytes decode
    event: dict[str, Any] | None  # decoded, when they decode
    hex: str | None  # the first HEX_BYTES bytes, when they do not
    size: int
    replayed: bool = False
    problem_now: str | None = None  # why it would be dead-lettered again if replayed now (None: it would pass)
    payload_omitted: bool = False  # too large to carry: only its source offset says where the bytes are

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _schema_lookup(url: str) -> Any:
    """Schemas by id from the registry as it is now (opened per listing: fixing the registry is a usual cause)."""
    registry = open_registry(url)
    cache: dict[int, Any] = {}

    def schema_for(schema_id: int) -> Any:
        if schema_id not in cache:
            schema = registry.schema(schema_id)
            cache[schema_id] = None if schema is None else parse_for_decoding(schema)
        return cache[schema_id]

    return schema_for


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def describe(records: list[StoredRecord], settings: Settings, now_ms: int) -> list[DeadLetter]:
    """Each record with its reason headers, decoded with today's registry where it decodes."""
    decoded = decode_batch([r.value or b"" for r in records], _schema_lookup(settings.registry.url))
    events = dict(zip(decoded.indexes, decoded.events, strict=True))
    still_bad = {r.index: f"{r.reason}: {r.detail}" for r in decoded.rejections}
    out = []
    for index, record in enumerate(records):
        headers = {k: v.decode(errors="replace") for k, v in record.headers}
        event = events.get(index)
        problem = still_bad.get(index)
        if event is not None:
            found = violation(event, now_ms, settings.window.max_future_s * 1000)
            problem = None if found is None else f"{found[0]}: {found[1]}"
        value = record.value or b""
        if "payload" in headers:
            problem = f"payload {headers['payload']}"
        out.append(DeadLetter(
            partition=record.partition, offset=record.offset, timestamp_ms=record.timestamp_ms,
            reason=headers.get("reason", "unknown"), detail=headers.get("detail", ""),
            channel=headers.get("channel", ""),
            source="/".join(headers.get(k, "?") for k in ("source.topic", "source.partition", "source.offset")),
            key=(record.key or b"").decode(errors="replace"),
            event_id=None if event is None else str(event.get("event_id")),
            event=None if event is None else _jsonable(event),
            hex=None if event is not None else value[:HEX_BYTES].hex(),
            size=int(headers.get("source.size", len(value))) if "payload" in headers else len(value),
            problem_now=problem, payload_omitted="payload" in headers))
    return out


@dataclass(slots=True)
class Listing:
    dead_letters: list[DeadLetter]
    by_reason: dict[str, int] = field(default_factory=dict)
    scanned: int = 0


def list_dead_letters(settings: Settings, *, reason: str | None = None, since_ms: int | None = None,
                      newest: int = 1000, queries: ConsoleQueries | None = None) -> Listing:
    """The newest `newest` dead letters per partition, filtered by reason and time; counts by reason of all read."""
    now_ms = int(time.time() * 1000)
    records = read_records(settings.kafka.bootstrap_servers, settings.kafka.dead_letter_topic, newest)
    letters = describe(records, settings, now_ms)
    replayed: set[tuple[int, int]] = set()
    own = queries is None
    queries = queries or ConsoleQueries(settings.clickhouse)
    try:
        replayed = queries.replayed_dead_letters(settings.kafka.dead_letter_topic)
    finally:
        if own:
            queries.close()
    by_reason: dict[str, int] = {}
    for letter in letters:
        letter.replayed = (letter.partition, letter.offset) in replayed
        by_reason[letter.reason] = by_reason.get(letter.reason, 0) + 1
    chosen = [d for d in letters if (reason is None or d.reason == reason)
              and (since_ms is None or d.timestamp_ms >= since_ms)]
    return Listing(chosen, by_reason, len(letters))


@dataclass(slots=True)
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)
    already_replayed: list[DeadLetter] = field(default_factory=list)
    would_fail: list[DeadLetter] = field(default_factory=list)  # still undecodable or still invalid


def replay(settings: Settings, *, reason: str | None = None, since_ms: int | None = None,
           offsets: Collection[tuple[int, int]] = (), again: bool = False, force: bool = False,
           dry_run: bool = False, newest: int = 100_000) -> ReplayReport:
    """Re-publish the chosen dead letters (by reason, time, or partition/offset) with their original key and bytes.
    Skips those already replayed (unless `again`) and those that would be dead-lettered again (unless `force`)."""
    queries = ConsoleQueries(settings.clickhouse)
    try:
        listing = list_dead_letters(settings, reason=reason, since_ms=since_ms, newest=newest, queries=queries)
        chosen = listing.dead_letters
        if offsets:
            wanted = set(offsets)
            chosen = [d for d in chosen if (d.partition, d.offset) in wanted]
            missing = wanted - {(d.partition, d.offset) for d in chosen}
            if missing:
                names = ", ".join(f"{p}:{o}" for p, o in sorted(missing))
                raise DeadLetterError(f"no dead letter at {names} in {settings.kafka.dead_letter_topic} "
                                      "(matching the other filters)")
        report = ReplayReport()
        for letter in chosen:
            if letter.replayed and not again:
                report.already_replayed.append(letter)
            elif letter.payload_omitted or (letter.problem_now is not None and not force):
                report.would_fail.append(letter)
            else:
                report.replayed.append(letter)
        if dry_run or not report.replayed:
            return report
        by_place = {(r.partition, r.offset): r for r in read_records(
            settings.kafka.bootstrap_servers, settings.kafka.dead_letter_topic, newest)}
        topic = settings.kafka.dead_letter_topic
        batch = []
        for letter in report.replayed:
            record = by_place[(letter.partition, letter.offset)]
            batch.append((record.key, record.value,
                          [("replay.of", f"{topic}/{letter.partition}/{letter.offset}".encode())]))
        publish_records(settings.kafka.bootstrap_servers, settings.kafka.topic, batch)
        now_ms = int(time.time() * 1000)
        queries.record_replays([(topic, d.partition, d.offset, d.event_id or "", d.reason, settings.kafka.topic,
                                 now_ms) for d in report.replayed])
        return report
    finally:
        queries.close()
