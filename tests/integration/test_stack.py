"""The project's own local stack: real servers, started and found again."""

import socket
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.adapters.kafka import ensure_topics
from pipeline.stack import local

pytestmark = pytest.mark.integration


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_all(bootstrap, topic):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5_000, auto_offset_reset="earliest")
    consumer.assign([TopicPartition(topic, 0)])
    values = [record.value for record in consumer]
    consumer.close()
    return values


@pytest.mark.smoke
def test_stack_up_is_idempotent_and_status_reports_both(stack_settings):
    first = {s.name: s.pid for s in local.up(stack_settings)}
    again = {s.name: s.pid for s in local.up(stack_settings)}
    assert first == again
    statuses = local.status(stack_settings)
    assert [s.name for s in statuses] == [local.broker_kind(stack_settings), "clickhouse"]
    assert all(s.running for s in statuses)


@pytest.mark.smoke
def test_broker_round_trip_with_manual_assignment(stack_settings):
    topic = f"stack-{uuid.uuid4().hex[:8]}"
    bootstrap = stack_settings.kafka.bootstrap_servers
    assert ensure_topics(bootstrap, {topic: 1}) == [topic]
    assert ensure_topics(bootstrap, {topic: 1}) == []
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topic, key=b"k", value=b"hello").get(timeout=10)
    producer.close()
    assert read_all(bootstrap, topic) == [b"hello"]


def test_clickhouse_is_the_debian_18_16_server(clickhouse):
    assert clickhouse.execute("SELECT version()")[0][0].startswith("18.16")


@pytest.mark.parametrize("kind", ["kafka", pytest.param("tansu", marks=pytest.mark.smoke)])
def test_a_broker_of_its_own_starts_once_reports_its_status_and_stops(kind, stack_settings, tmp_path):
    """On its own ports and state directory, so the shared stack is untouched."""
    settings = stack_settings.model_copy(deep=True)
    settings.stack.broker = kind
    settings.stack.state_dir = tmp_path
    settings.stack.kafka_controller_port = free_port()
    port = free_port()
    settings.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    broker = local.broker(settings)
    assert broker.name == kind and not broker.status().running
    started = time.monotonic()
    try:
        first = broker.up(60)
        startup_s = time.monotonic() - started
        assert first.running and first.pid is not None and first.detail == "started by the project"
        assert broker.up(60).pid == first.pid  # idempotent: the running broker is found again
        assert startup_s < 30, f"{kind} took {startup_s:.1f} s to answer"
        topic = f"own-{uuid.uuid4().hex[:8]}"
        ensure_topics(settings.kafka.bootstrap_servers, {topic: 1})
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        producer.send(topic, value=b"kept").get(timeout=10)
        producer.close()
        if kind == "kafka":
            home = tmp_path / "kafka"
            assert (home / "data" / "meta.properties").is_file()  # formatted once, under the state dir
            assert f"PLAINTEXT://127.0.0.1:{port}" in (home / "config" / "server.properties").read_text()
            assert "Kafka Server started" in (tmp_path / "kafka.log").read_text()
            stopped = broker.down()
            assert not stopped.running and stopped.pid is None
            again = broker.up(60)  # durable storage: the topic and its record survive the restart
            assert again.running and again.pid != first.pid
            assert read_all(settings.kafka.bootstrap_servers, topic) == [b"kept"]
    finally:
        stopped = broker.down()
    assert not stopped.running and stopped.pid is None and stopped.detail == "not running"
    assert not (tmp_path / f"{kind}.pid").exists()
