"""The project's own local stack: real servers, started and found again."""

import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.adapters.kafka import ensure_topics
from pipeline.stack import local

pytestmark = pytest.mark.integration


def test_stack_up_is_idempotent_and_status_reports_both(stack_settings):
    first = {s.name: s.pid for s in local.up(stack_settings)}
    again = {s.name: s.pid for s in local.up(stack_settings)}
    assert first == again
    statuses = local.status(stack_settings)
    assert [s.name for s in statuses] == ["tansu", "clickhouse"] and all(s.running for s in statuses)


def test_broker_round_trip_with_manual_assignment(stack_settings):
    topic = f"stack-{uuid.uuid4().hex[:8]}"
    bootstrap = stack_settings.kafka.bootstrap_servers
    assert ensure_topics(bootstrap, {topic: 1}) == [topic]
    assert ensure_topics(bootstrap, {topic: 1}) == []
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topic, key=b"k", value=b"hello").get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5_000, auto_offset_reset="earliest")
    consumer.assign([TopicPartition(topic, 0)])
    values = [record.value for record in consumer]
    consumer.close()
    assert values == [b"hello"]


def test_clickhouse_is_the_debian_18_16_server(clickhouse):
    assert clickhouse.execute("SELECT version()")[0][0].startswith("18.16")
