"""Kafka adapters on kafka-python: topic setup and the publisher channel systems use.

kafka-python's group consumer never gets an assignment on the local Tansu broker, so reading is left to
aiokafka (Faust) and to manually assigned consumers."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fastavro
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from pipeline.contract.registry import SchemaRegistry, parse_for_decoding
from pipeline.contract.wire import frame
from pipeline.core.enrich import identifiers_of
from pipeline.core.validate import BLANK_IDENTIFIERS, violation
from pipeline.topics import TopicSpec


def ensure_topics(bootstrap_servers: str, topics: dict[str, int], replication_factor: int = 1,
                  config: dict[str, str] | None = None) -> list[str]:
    """Create the missing topics (name -> partitions); returns the ones created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="touchpoint-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(name, partitions, replication_factor, topic_configs=config or {})
                  for name, partitions in topics.items() if name not in existing]
        return _create(admin, wanted)
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, wanted: list[NewTopic]) -> list[str]:
    """Create each topic; those that exist already (another init won the race, or the broker's metadata had not
    shown them to list_topics yet) are not reported as created."""
    created = []
    for topic in wanted:
        try:
            admin.create_topics([topic])
            created.append(topic.name)
        except TopicAlreadyExistsError:
            pass  # the topic is there, which is all we need
    return created


BOOTSTRAP_TIMEOUT_MS = 10_000  # an operator's command tells "broker unreachable" after this, not after 30 s


def apply_topics(bootstrap_servers: str, specs: Iterable[TopicSpec], replication_factor: int = 1
                 ) -> tuple[list[str], list[str]]:
    """Create the missing topics with their settings and set the settings that differ on those that exist
    (incrementally: other settings an operator put on a topic stay). Returns (created, reconfigured)."""
    specs = list(specs)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="touchpoint-admin",
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(spec.name, spec.partitions, replication_factor, topic_configs=dict(spec.config))
                  for spec in specs if spec.name not in existing]
        created = _create(admin, wanted)
        present = [spec for spec in specs if spec.name in existing]
        reconfigured: list[str] = []
        if present:
            described = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, spec.name) for spec in present],
                config_filter="all").get("topic", {})
            changes = []
            for spec in present:
                current = described.get(spec.name) or {}
                differ = {key: value for key, value in spec.config.items()
                          if (current.get(key) or {}).get("value") != value}
                if differ:
                    changes.append(ConfigResource(ConfigResourceType.TOPIC, spec.name, configs=differ))
                    reconfigured.append(spec.name)
            if changes:
                admin.alter_configs(changes)
        return created, reconfigured
    finally:
        admin.close()


def topic_configs(bootstrap_servers: str, topics: list[str]) -> dict[str, dict[str, str]]:
    """The settings the broker reports for each topic (name -> setting -> value)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="touchpoint-admin",
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics], config_filter="all")
        return {topic: {key: entry["value"] for key, entry in (configs or {}).items()}
                for topic, configs in described.get("topic", {}).items()}
    finally:
        admin.close()


def partition_key(event: dict[str, Any]) -> bytes:
    """Keyed by the strongest identifier present, so one person's events keep their order as far as the channel
    knows them (the identity graph joins the rest across partitions)."""
    ids = identifiers_of(event["identifiers"], BLANK_IDENTIFIERS)
    return (ids[0] if ids else event["event_id"]).encode()


def _plain_integer_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of record fields typed int or long outside a union: fastavro's writer would silently truncate a
    float or take a bool there, so the check looks at those values' types itself."""
    paths: list[tuple[str, ...]] = []
    for field in schema.get("fields", []):
        kind = field["type"]
        path = (*prefix, field["name"])
        if isinstance(kind, dict) and kind.get("type") == "record":
            paths += _plain_integer_paths(kind, path)
        elif isinstance(kind, list):
            for branch in kind:
                if isinstance(branch, dict) and branch.get("type") == "record":
                    paths += _plain_integer_paths(branch, path)
        elif kind in ("int", "long") or (isinstance(kind, dict) and kind.get("type") in ("int", "long")):
            paths.append(path)
    return paths


class TouchpointEncoder:
    """Avro + Confluent framing with one writer schema from the registry."""

    def __init__(self, registry: SchemaRegistry, subject: str, version: int | None = None) -> None:
        """Write with one version of the subject (its newest when None); the id comes from the registry."""
        if version is None:
            schema_id, schema = registry.latest(subject)
        else:
            schema_id, schema = registry.version(subject, version)
        self.schema_id = schema_id
        self.schema = fastavro.parse_schema(schema)
        self.decoding_schema = parse_for_decoding(schema)
        self.integer_paths = _plain_integer_paths(schema)

    def encode(self, event: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.schema, event)
        return frame(self.schema_id, buffer.getvalue())


class TouchpointPublisher:
    """What a channel system uses to publish touchpoints: acknowledged by every in-sync replica, and idempotent
    (the broker drops the copies a producer retry would write)."""

    def __init__(self, bootstrap_servers: str, topic: str, encoder: TouchpointEncoder, **producer_config: Any) -> None:
        self.topic = topic
        self.encoder = encoder
        config: dict[str, Any] = {"linger_ms": 20, "batch_size": 512 * 1024, "acks": "all",
                                  "enable_idempotence": True, "max_request_size": 4 * 1024 * 1024}
        config.update(producer_config)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="touchpoint-publisher",
                                      **config)

    def publish(self, event: dict[str, Any]) -> FutureRecordMetadata:
        return self.producer.send(self.topic, key=partition_key(event), value=self.encoder.encode(event))

    def publish_raw(self, value: bytes | None, key: bytes | None = None) -> FutureRecordMetadata:
        """Send bytes as they are (tests and tooling: replays, deliberately broken records)."""
        return self.producer.send(self.topic, key=key, value=value)

    def publish_many(self, events: Iterable[dict[str, Any]]) -> int:
        count = 0
        for event in events:
            self.publish(event)
            count += 1
        return count

    def deliver(self, events: Sequence[dict[str, Any]], timeout_s: float = 120.0) -> list[tuple[int, str]]:
        """Send every event and wait for the broker's acknowledgements: (index, why) of each one not delivered."""
        futures: list[FutureRecordMetadata | None] = []
        failed: list[tuple[int, str]] = []
        for index, event in enumerate(events):
            try:
                futures.append(self.publish(event))
            except KafkaError as exc:  # refused before sending (e.g. too large for this producer)
                futures.append(None)
                failed.append((index, f"{type(exc).__name__}: {exc}"))
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaTimeoutError:
            pass  # the futures still pending are reported below
        for index, future in enumerate(futures):
            if future is None:
                continue
            if not future.is_done:
                failed.append((index, f"no acknowledgement within {timeout_s:.0f} s"))
            elif future.failed():
                failed.append((index, f"{type(future.exception).__name__}: {future.exception}"))
        return sorted(failed)

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


NOT_AN_OBJECT = "not_an_object"
SCHEMA_MISMATCH = "schema_mismatch"


def _integer_type_problem(event: dict[str, Any], paths: list[tuple[str, ...]]) -> str | None:
    for path in paths:
        value: Any = event
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if value is not None and type(value) is not int:
            return f"{'.'.join(path)} is {type(value).__name__} {value!r}, expected an integer"
    return None


def check_touchpoint(event: Any, encoder: TouchpointEncoder, now_ms: int, max_future_ms: int,
                     blocked: frozenset[str] = BLANK_IDENTIFIERS) -> tuple[bytes, None] | tuple[None, tuple[str, str]]:
    """The one check every way in applies (file publishing, the HTTP collector): the Avro contract, then the
    worker's own rules (`violation`). Returns (framed Avro value, None) or (None, (reason, detail))."""
    if not isinstance(event, dict):
        return None, (NOT_AN_OBJECT, f"a touchpoint is a JSON object, not {type(event).__name__}")
    try:
        # The writer is the fast check; the slow validator runs only on failure, to explain it.
        value = encoder.encode(event)
    except Exception as exc:  # fastavro's writer raises many types on a mismatch; all mean the same here
        try:
            fastavro.validation.validate(event, encoder.schema, raise_errors=True)
        except fastavro.validation.ValidationError as invalid:
            return None, (SCHEMA_MISMATCH, f"does not match the Avro schema: {invalid}")
        return None, (SCHEMA_MISMATCH, f"does not match the Avro schema: {type(exc).__name__}: {exc}")
    problem = _integer_type_problem(event, encoder.integer_paths)
    if problem is not None:
        return None, (SCHEMA_MISMATCH, f"does not match the Avro schema: {problem}")
    broken = violation(event, now_ms, max_future_ms, blocked)
    if broken is not None:
        return None, broken
    return value, None


@dataclass(frozen=True, slots=True)
class BadLine:
    line_number: int
    reason: str


# A JSON line is larger than its Avro record; a line over this many times the record limit cannot fit.
JSON_TO_AVRO_SLACK = 4
RECORD_OVERHEAD_BYTES = 1024  # key, headers and batch framing around a record's value


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes or None when over `limit`, size) of every line, never holding more than `limit` bytes."""
    number = 0
    while True:
        chunk = handle.readline(limit + 1)
        if not chunk:
            return
        number += 1
        if len(chunk.rstrip(b"\r\n")) <= limit:
            yield number, chunk, len(chunk)
            continue
        size = len(chunk)
        while not chunk.endswith(b"\n"):
            chunk = handle.readline(1 << 20)
            if not chunk:
                break
            size += len(chunk)
        yield number, None, size


def read_jsonl(path: Path, encoder: TouchpointEncoder, now_ms: int, max_future_ms: int,
               max_record_bytes: int = 1_048_576) -> tuple[list[tuple[int, dict[str, Any]]], list[BadLine]]:
    """Check every line of a JSON Lines file (size, UTF-8, JSON, Avro schema, contract) before anything is
    published: (line number, touchpoint) of the good lines and the bad lines with their reason."""
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    max_line_bytes = JSON_TO_AVRO_SLACK * max_record_bytes
    with path.open("rb") as handle:
        for number, raw, size in _bounded_lines(handle, max_line_bytes):
            if raw is None:
                bad.append(BadLine(number, f"line is {size:,} bytes; no touchpoint that long fits the broker's "
                                           f"{max_record_bytes:,}-byte record limit (kafka.max_message_bytes)"))
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadLine(number, f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"))
                continue
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadLine(number, f"not JSON: {exc.msg} at column {exc.colno}"))
                continue
            if not isinstance(event, dict):
                bad.append(BadLine(number, "not a JSON object"))
                continue
            value, problem = check_touchpoint(event, encoder, now_ms, max_future_ms)
            if problem is not None:
                bad.append(BadLine(number, problem[1] if problem[0] == SCHEMA_MISMATCH
                                   else f"{problem[0]}: {problem[1]}"))
                continue
            assert value is not None
            if len(value) + RECORD_OVERHEAD_BYTES > max_record_bytes:
                bad.append(BadLine(number, f"its record is {len(value):,} bytes; the broker takes at most "
                                           f"{max_record_bytes:,} (kafka.max_message_bytes)"))
                continue
            # Fill the optional fields the line left out, exactly as Avro readers will see them.
            filled: dict[str, Any] = fastavro.schemaless_reader(  # type: ignore[assignment]
                io.BytesIO(value[5:]), encoder.decoding_schema, None)
            good.append((number, filled))
    return good, bad


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as it sits in a topic (dead letters: the original key and bytes, and the reason in headers)."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def end_offsets(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """Partition -> offset of the next record to be written (the high watermark); {} if the topic is missing."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             client_id="touchpoint-console")
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        consumer.close()


def read_records(bootstrap_servers: str, topic: str, newest: int, timeout_s: float = 10.0) -> list[StoredRecord]:
    """About the newest `newest` records of every partition of a topic, oldest first per partition (a manually
    assigned consumer: kafka-python's group consumer gets no assignment on the local Tansu broker). Reads on
    until the topic goes quiet, not to the end offset: Tansu reports a batch's base offset + 1 as the end."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                             client_id="touchpoint-deadletters", consumer_timeout_ms=700)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            return []
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        starts = consumer.beginning_offsets(parts)
        for tp in parts:
            consumer.seek(tp, max(starts[tp], ends[tp] - newest))
        by_partition: dict[int, list[StoredRecord]] = {tp.partition: [] for tp in parts}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            before = sum(len(v) for v in by_partition.values())
            for message in consumer:  # ends after consumer_timeout_ms without a record
                by_partition[message.partition].append(StoredRecord(
                    message.partition, message.offset, message.timestamp, message.key, message.value,
                    tuple((k, bytes(v or b"")) for k, v in message.headers)))
                if time.monotonic() > deadline:
                    break
            if sum(len(v) for v in by_partition.values()) == before:
                break  # quiet for a whole timeout: caught up
        return [r for partition in sorted(by_partition) for r in by_partition[partition][-newest:]]
    finally:
        consumer.close()


def publish_records(bootstrap_servers: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None,
                    list[tuple[str, bytes]]]]) -> int:
    """Send (key, value, headers) as they are and wait until the broker has them all."""
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="touchpoint-replay", acks="all")
    count = 0
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers) for key, value, headers in records]
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker refused one
            count += 1
    finally:
        producer.close()
    return count
