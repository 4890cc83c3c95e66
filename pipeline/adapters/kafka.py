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
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another init won the race; the topic is there, which is all we need
        return [t.name for t in wanted]
    finally:
        admin.close()


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
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another init won the race; its settings are set below on the next init
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
        return [t.name for t in wanted], reconfigured
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
            try:
                fastavro.validation.validate(event, encoder.schema, raise_errors=True)
            except fastavro.validation.ValidationError as exc:
                bad.append(BadLine(number, f"does not match the Avro schema: {exc}"))
                continue
            record = encoder.encode(event)
            if len(record) + RECORD_OVERHEAD_BYTES > max_record_bytes:
                bad.append(BadLine(number, f"its record is {len(record):,} bytes; the broker takes at most "
                                           f"{max_record_bytes:,} (kafka.max_message_bytes)"))
                continue
            # Fill the optional fields the line left out, exactly as Avro readers will see them.
            filled = fastavro.schemaless_reader(io.BytesIO(record[5:]), encoder.decoding_schema, None)
            assert isinstance(filled, dict)  # the contract is an Avro record
            event = filled
            problem = violation(event, now_ms, max_future_ms)
            if problem is not None:
                bad.append(BadLine(number, f"{problem[0]}: {problem[1]}"))
                continue
            good.append((number, event))
    return good, bad
