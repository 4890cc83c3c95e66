"""`touchpoint init` gives the topics the settings production needs; `forget` refuses identifiers of nobody."""

import json
import os
import subprocess
import sys
import time

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher, topic_configs
from pipeline.app.bootstrap import initialise
from pipeline.contract.registry import open_registry
from pipeline.settings import to_env
from pipeline.topics import identity_changelog_topic, topic_specs
from tests.factories import touchpoint
from tests.integration.conftest import is_apache_kafka, read_topic

pytestmark = pytest.mark.integration


def test_init_sets_compaction_and_retention_on_the_broker(isolated):
    if not is_apache_kafka(isolated):
        pytest.skip("runs on Apache Kafka (this broker is Tansu, which does not keep altered topic settings)")
    specs = {spec.name: spec.config for spec in topic_specs(isolated)}
    actual = topic_configs(isolated.kafka.bootstrap_servers, list(specs))
    assert actual[identity_changelog_topic(isolated)]["cleanup.policy"] == "compact"
    assert actual[isolated.kafka.topic]["cleanup.policy"] == "delete"
    assert int(actual[isolated.kafka.topic]["retention.ms"]) == int(isolated.kafka.retention_hours * 3_600_000)
    assert int(actual[isolated.kafka.dead_letter_topic]["retention.ms"]) == int(
        isolated.kafka.dead_letter_retention_days * 86_400_000)
    assert int(actual[isolated.kafka.dead_letter_topic]["max.message.bytes"]) > int(
        actual[isolated.kafka.topic]["max.message.bytes"])
    for name, config in specs.items():
        assert {key: actual[name][key] for key in config} == config


def test_init_puts_back_a_topic_setting_that_drifted(isolated):
    if not is_apache_kafka(isolated):
        pytest.skip("runs on Apache Kafka (this broker is Tansu, which does not keep altered topic settings)")
    admin = KafkaAdminClient(bootstrap_servers=isolated.kafka.bootstrap_servers)
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, isolated.kafka.topic,
                                        configs={"retention.ms": "60000", "segment.ms": "3600000"})])
    admin.close()
    report = initialise(isolated)
    assert report.topics_created == [] and report.topics_reconfigured == [isolated.kafka.topic]
    actual = topic_configs(isolated.kafka.bootstrap_servers, [isolated.kafka.topic])[isolated.kafka.topic]
    assert actual["retention.ms"] == str(int(isolated.kafka.retention_hours * 3_600_000))
    assert actual["segment.ms"] == "3600000"  # a setting init does not state is left as the operator set it
    assert initialise(isolated).topics_reconfigured == []


@pytest.mark.parametrize("identifier", ["", "user_id:null", "guest"])
def test_forget_of_a_blank_or_blocked_identifier_writes_nothing(isolated, ch, identifier):
    result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "forget", identifier], capture_output=True,
                            text=True, env={**os.environ, **to_env(isolated), "COLUMNS": "300"}, timeout=120)
    assert result.returncode == 2 and "refusing to forget" in result.stderr, result.stdout + result.stderr
    assert ch.execute("SELECT count() FROM identity_audit")[0][0] == 0
    assert read_topic(isolated, identity_changelog_topic(isolated), 1, expected=1, timeout_s=3) == []


def test_publish_reports_a_10_mb_line_and_binary_garbage_by_number_and_sends_nothing(isolated, tmp_path):
    now = int(time.time() * 1000)
    good = [json.dumps(touchpoint(f"g{i}", now)).encode() for i in range(2)]
    huge = json.dumps(touchpoint("huge", now, attributes={"blob": "z" * 10_000_000})).encode()
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good[0], huge, good[1], b"\x00\xff\xfe garbage \x9c"]) + b"\n")
    result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "publish", str(path)], capture_output=True,
                            text=True, env={**os.environ, **to_env(isolated), "COLUMNS": "300"}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "line 2: line is 10,0" in result.stdout and "line 4: not UTF-8 text" in result.stdout
    assert "published nothing: 2 bad lines, 2 good" in result.stdout
    assert read_topic(isolated, isolated.kafka.topic, isolated.kafka.partitions, expected=1, timeout_s=3) == []


def test_the_publisher_waits_for_every_in_sync_replica_and_is_idempotent(isolated):
    publisher = TouchpointPublisher(isolated.kafka.bootstrap_servers, isolated.kafka.topic,
                                    TouchpointEncoder(open_registry(isolated.registry.url), isolated.registry.subject))
    try:
        assert publisher.producer.config["acks"] == -1  # "all"
        assert publisher.producer.config["enable_idempotence"] is True
        now = int(time.time() * 1000)
        assert publisher.deliver([touchpoint(f"ack-{i}", now, anonymous_id=f"a-{i}") for i in range(3)]) == []
    finally:
        publisher.close()
    records = read_topic(isolated, isolated.kafka.topic, isolated.kafka.partitions, expected=3)
    assert len(records) == 3



@pytest.mark.parametrize("args", [["init"], ["init", "--dry-run"]])
def test_a_cluster_the_server_does_not_define_is_named_in_one_line(stack_settings, args):
    env = {**os.environ, **to_env(stack_settings), "TOUCHPOINT_CLICKHOUSE__CLUSTER": "nowhere",
           "TOUCHPOINT_CLICKHOUSE__DATABASE": "it_no_cluster", "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True,
                            env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert "no cluster 'nowhere'" in lines[0] and "TOUCHPOINT_CLICKHOUSE__CLUSTER" in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
