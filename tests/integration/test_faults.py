"""The fault matrix (issue 9 part 2), the parts that need no change to the worker: a durable Apache Kafka broker
stopped and restarted mid-stream, and poison records of every kind. Each reconciles exactly: distinct ids
published = distinct rows + dead letters, and no indicator denominator counts an event twice."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import fastavro
import pytest

from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher, partition_key
from pipeline.app.bootstrap import initialise
from pipeline.contract.registry import contract_schemas, open_registry
from pipeline.contract.wire import frame
from pipeline.settings import Settings
from pipeline.stack import local
from tests import reference
from tests.factories import touchpoint
from tests.integration.conftest import is_apache_kafka, read_topic, wait_until
from tests.integration.test_pipeline import all_windows_closed, assert_values_equal, stored_values, traffic

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def publisher_for(settings: Settings, version: int = 1, **config) -> TouchpointPublisher:
    registry = open_registry(settings.registry.url)
    return TouchpointPublisher(settings.kafka.bootstrap_servers, settings.kafka.topic,
                               TouchpointEncoder(registry, settings.registry.subject, version), **config)


@pytest.fixture
def own_kafka(isolated: Settings, tmp_path) -> Iterator[tuple[Settings, local.KafkaBroker]]:
    """A durable Apache Kafka broker of this test's own (the shared one is never stopped), with the topics."""
    java = local.java_major_version(isolated.stack.java)
    if java is None or java < 17 or not local.kafka_jars(isolated.stack.kafka_libs_dir):
        pytest.skip("needs Java 17+ and Apache Kafka's jars (scripts/setup.sh)")
    settings = isolated.model_copy(deep=True)
    settings.stack.broker = "kafka"
    settings.stack.state_dir = tmp_path / "stack"
    settings.stack.kafka_controller_port = free_port()
    settings.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"
    broker = local.KafkaBroker(settings)
    try:
        broker.up(90)
        initialise(settings)
        yield settings, broker
    finally:
        broker.down()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_broker_stopped_and_restarted_mid_stream_loses_and_doubles_nothing(stop, own_kafka, start_worker, ch):
    settings, broker = own_kafka
    # An outage shorter than the idle close: windows open when the broker stops must not be closed early.
    settings.window.idle_close_s = 30
    events = traffic(30_000, start_ms=int(time.time() * 1000) - 400_000, seed=13, prefix="r")
    publisher = publisher_for(settings)
    publisher.publish_many(events)
    publisher.publish_many(events[5_000:6_000])  # a sender's retry: duplicates
    publisher.close()
    worker = start_worker(settings)
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] > 3_000, 90, "the first flushes", worker)
    if stop == "sigkill":  # no clean shutdown: the broker recovers its log from disk on restart
        os.kill(broker.status().pid, signal.SIGKILL)  # type: ignore[arg-type]
    broker.down()  # mid-stream; its log and topics stay on disk
    rows_at_stop = ch.execute("SELECT count() FROM touchpoints")[0][0]
    time.sleep(10)
    assert worker.process.poll() is None, f"the worker ended while the broker was down:\n{worker.log_tail()}"
    broker.up(90)
    wait_until(lambda: all_windows_closed(ch, settings, events[-1]["event_time"]), 240, "all windows closed",
               worker)
    assert rows_at_stop < len(events), "the worker finished before the broker stopped; publish more events"
    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (30_000, 30_000)
    assert ch.execute("SELECT countIf(counted = 0) FROM touchpoints FINAL")[0][0] == 0  # none taken as late
    assert read_topic(settings, settings.kafka.dead_letter_topic, 1, expected=1, timeout_s=3) == []
    assert_values_equal(stored_values(ch), reference.indicator_values(events, settings.window.size_s * 1000))


def test_sigterm_with_the_broker_down_ends_the_worker_within_30_s(own_kafka, start_worker, ch):
    settings, broker = own_kafka
    events = traffic(2_000, start_ms=int(time.time() * 1000) - 60_000, seed=17, prefix="t")
    publisher = publisher_for(settings)
    publisher.publish_many(events)
    publisher.close()
    worker = start_worker(settings)
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] > 0, 90, "the first flush", worker)
    broker.down()
    time.sleep(3)  # the worker notices the broker is gone
    asked = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker was still running 30 s after SIGTERM with the broker down:\n{worker.log_tail()}")
    assert time.monotonic() - asked < 30


def _avro(schema: dict, event: dict, schema_id: int) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), event)
    return frame(schema_id, buffer.getvalue())


def poison(kind: str, now: int) -> tuple[bytes | None, str]:
    """(record value, the dead letter's reason) of each kind of bad input."""
    v1, v3 = contract_schemas()[0], contract_schemas()[-1]
    noise = random.Random(kind).randbytes
    good = _avro(v1, touchpoint(f"{kind}-x", now), 1)
    raw_email = touchpoint(f"{kind}-x", now)
    raw_email["identifiers"] = {**raw_email["identifiers"], "email_sha256": "alice@example.com"}
    return {
        "random_bytes": (noise(300), "undecodable"),
        "unknown_schema_id": (_avro(v1, touchpoint(f"{kind}-x", now), 999), "unknown_schema"),
        "truncated": (good[: len(good) // 2], "undecodable"),
        "empty": (b"", "undecodable"),
        "null_value": (None, "undecodable"),
        "blank_identifiers": (_avro(v1, touchpoint(f"{kind}-x", now, anonymous_id="null"), 1), "contract_violation"),
        "raw_email_in_hash": (_avro(v3, raw_email, 3), "contract_violation"),
        "a_year_ahead": (_avro(v1, touchpoint(f"{kind}-x", now + 366 * 86_400_000), 1), "future_event_time"),
        "one_mb": (b"\x00\x00\x00\x00\x01" + noise(1_040_000), "undecodable"),
        "ten_mb": (b"\x00\x00\x00\x00\x01" + noise(10 * MIB), "undecodable"),
    }[kind]


@pytest.mark.parametrize("kind", ["random_bytes", "unknown_schema_id", "truncated", "empty", "null_value",
                                  "blank_identifiers", "raw_email_in_hash", "a_year_ahead",
                                  "one_mb", "ten_mb"])
def test_a_poison_record_becomes_one_dead_letter_and_the_partition_goes_on(kind, isolated, start_worker, ch):
    if not is_apache_kafka(isolated):
        pytest.skip("the fault matrix runs on Apache Kafka (this broker is Tansu)")
    now = int(time.time() * 1000)
    value, reason = poison(kind, now)
    if value is not None and len(value) > isolated.kafka.max_message_bytes - 1024:
        isolated.kafka.max_message_bytes = len(value) + MIB  # the topic takes it; so must the dead-letter topic
        initialise(isolated)
    first = touchpoint("good-before", now - 1_000, anonymous_id="a-1")
    key = partition_key(first)  # the good records and the poison share a key, so a partition
    publisher = publisher_for(isolated, max_request_size=isolated.kafka.max_message_bytes + MIB)
    before = publisher.publish(first)
    publisher.producer.flush()
    offset = publisher.publish_raw(value, key=key).get(timeout=30).offset
    publisher.publish(touchpoint("good-after", now, anonymous_id="a-1"))
    publisher.close()
    worker = start_worker()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 2, 90,
               "the good records on both sides of the poison", worker)
    dead = read_topic(isolated, isolated.kafka.dead_letter_topic, 1, expected=2, timeout_s=10)
    assert len(dead) == 1, f"{len(dead)} dead letters for one poison record"
    headers = {k: v.decode() for k, v in dead[0].headers}
    assert headers["reason"] == reason and headers["detail"]
    assert headers["source.offset"] == str(offset) and headers["source.partition"] == str(before.get().partition)
    assert headers["source.size"] == str(len(value or b""))
    if dead[0].value != value:  # the original bytes, or only past the producers' limit, the reason and size alone
        assert value is not None and dead[0].value is None and headers["payload"].startswith("omitted"), headers
        assert len(value) > isolated.kafka.max_message_bytes - 16_384
    assert worker.process.poll() is None
    assert ch.execute("SELECT uniqExact(event_id) FROM touchpoints")[0][0] == 2
