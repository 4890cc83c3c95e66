"""Publish -> worker -> ClickHouse on the real local stack (Tansu broker, ClickHouse 18.16 server)."""

from __future__ import annotations

import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import fastavro
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.contract.registry import contract_schemas
from pipeline.contract.wire import frame
from pipeline.core.identity import Role
from pipeline.settings import to_env
from tests import reference
from tests.factories import csat, task, touchpoint
from tests.integration.conftest import read_topic, wait_until

pytestmark = pytest.mark.integration


def traffic(count: int, *, start_ms: int, seed: int = 1, prefix: str = "e") -> list[dict]:
    """Bank app tasks that fail often, kind contact-centre answers, and a hospital visit that goes badly."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        t = start_ms + i * 10  # 100 events per second of event time
        kind = rng.random()
        if kind < 0.5:
            events.append(task("FAILURE" if rng.random() < 0.3 else "SUCCESS", event_id=f"{prefix}{i}",
                               event_time=t, channel="MOBILE_APP", user_id=f"u{rng.randrange(300)}"))
        elif kind < 0.7:
            events.append(csat(rng.choice([4, 5, 5, 3]), event_id=f"{prefix}{i}", event_time=t,
                               channel="CONTACT_CENTRE", about="CONTACT_CENTRE", customer_id=f"c{rng.randrange(200)}"))
        elif kind < 0.85:
            events.append(csat(rng.choice([1, 2, 3, 4]), event_id=f"{prefix}{i}", event_time=t, tenant="hospital",
                               channel="EMAIL", about="STORE", user_id=f"p{rng.randrange(200)}"))
        else:
            events.append(touchpoint(f"{prefix}{i}", t, tenant="hospital", anonymous_id=f"a{rng.randrange(500)}",
                                     web_vitals={"lcp_ms": 1400.0, "inp_ms": 90.0, "cls": 0.02}))
    return events


def stored_values(ch) -> dict:
    rows = ch.execute("SELECT toUInt32(window_start), tenant, channel, indicator, total, count "
                      "FROM indicator_values_by_channel WHERE window_kind = '1m'")
    return {(start, tenant, channel, indicator): (num, den) for start, tenant, channel, indicator, num, den in rows}


def assert_values_equal(stored: dict, expected: dict) -> None:
    """Counts exactly; totals of non-integer values (CLS, times) up to the order ClickHouse sums them in."""
    assert set(stored) == set(expected)
    for key, (num, den) in expected.items():
        assert stored[key][1] == den and math.isclose(stored[key][0], num, rel_tol=1e-9, abs_tol=1e-9), key


# The alerter's threshold rules (its defaults, the error-rate one waiting for two breaching windows).
ALERT_RULES = [
    {"name": "ux_error_rate_high", "kind": "threshold", "indicator": "error_rate", "comparison": "above",
     "threshold": 0.15, "recovery_threshold": 0.10, "min_count": 20, "for_windows": 2},
    {"name": "cx_csat_low", "kind": "threshold", "indicator": "csat", "comparison": "below", "threshold": 0.6,
     "recovery_threshold": 0.7, "min_count": 10, "severity": "critical"},
]


def run_alerter(settings) -> int:
    """The alert engine in-process (no Kafka producer), its clock held still, cycled until it has judged every
    window the stopped workers closed; returns the end of the last window it judged."""
    from pipeline.app.alerter import Alerter

    alerting = settings.model_copy(deep=True)
    alerting.alerting.rules = ALERT_RULES
    alerting.alerting.cases.enabled = False
    now = time.time()
    alerter = Alerter(alerting, clock=lambda: now, produce=False)
    try:
        for _ in range(60):
            report = alerter.cycle()
            if report.active and report.windows == 0:
                return int(alerter.progress["judged_until_ms"])
        raise AssertionError("the alerter did not catch up with the closed windows")
    finally:
        alerter.close()


def stored_transitions(ch) -> set:
    return set(ch.execute("SELECT rule, tenant, channel, from_state, to_state, window_end_ms FROM alert_events"))


def assert_alerts_follow_the_rules(ch, settings, expected: dict, last_event_ms: int) -> set:
    """The alerter, reading what the workers stored, makes exactly the transitions the core's engine makes over the
    batch totals, fires exactly the series the rules' text says, and leaves each series in the engine's state."""
    window_ms = settings.window.size_s * 1000
    judged_until = run_alerter(settings)
    assert judged_until >= last_event_ms - last_event_ms % window_ms + window_ms  # the last window too
    stored = stored_transitions(ch)
    assert stored == reference.alert_transitions(expected, ALERT_RULES, window_ms, judged_until)
    fired = {(rule, tenant, channel) for rule, tenant, channel, _, to, _ in stored if to == "firing"}
    assert fired == reference.firing_series(expected, ALERT_RULES, window_ms, judged_until)
    pending = {(rule, tenant, channel) for rule, tenant, channel, _, to, _ in stored if to == "pending"}
    assert {f for f in fired if f[0] == "ux_error_rate_high"} <= pending  # two windows: pending first
    last = {}
    for rule, tenant, channel, _, to, _end in sorted(stored, key=lambda row: row[5]):
        last[(rule, tenant, channel)] = to
    current = {(rule, tenant, channel): state for rule, tenant, channel, state in ch.execute(
        "SELECT rule, tenant, channel, state FROM alert_current WHERE fingerprint != ''")}
    assert {key: state for key, state in current.items() if key in last} == last
    return fired


def all_windows_closed(ch, settings, last_event_ms: int) -> bool:
    window_ms = settings.window.size_s * 1000
    last_window_start = last_event_ms - last_event_ms % window_ms
    rows = ch.execute("SELECT partition, max(closed_before_ms) FROM pipeline_checkpoints GROUP BY partition")
    return len(rows) == settings.kafka.partitions and all(c > last_window_start for _, c in rows)


@pytest.mark.smoke
def test_publish_to_clickhouse_exact_counts_indicators_and_the_alerters_alerts(isolated, publisher, start_worker,
                                                                              ch):
    start_ms = int(time.time() * 1000) - 120_000
    events = traffic(6_000, start_ms=start_ms)
    worker = start_worker()
    publisher.publish_many(events)
    publisher.publish_many(events[:500])  # a producer retry storm: the same events again
    publisher.flush()
    wait_until(lambda: all_windows_closed(ch, isolated, events[-1]["event_time"]), 90, "all windows closed", worker)

    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (6_000, 6_000)
    expected = reference.indicator_values(events, isolated.window.size_s * 1000)
    assert_values_equal(stored_values(ch), expected)
    assert ch.execute("SELECT count() FROM alert_events")[0][0] == 0  # workers judge nothing
    worker.stop()
    fired = assert_alerts_follow_the_rules(ch, isolated, expected, events[-1]["event_time"])
    assert ("ux_error_rate_high", "bank", "MOBILE_APP") in fired
    assert ("cx_csat_low", "hospital", "STORE") in fired
    # Bad UX but good CX for the bank; good UX but bad CX for the hospital's visit.
    csat_by = dict(ch.execute("SELECT concat(tenant, '/', channel), sum(total) / sum(count) "
                              "FROM indicator_values_by_channel WHERE window_kind = '1m' AND indicator = 'csat' "
                              "GROUP BY tenant, channel"))
    assert csat_by["bank/CONTACT_CENTRE"] > 0.6 > csat_by["hospital/STORE"]
    roles = dict(ch.execute("SELECT toString(role), count() FROM touchpoints FINAL GROUP BY role"))
    assert {"prospect", "user"} <= set(roles) <= {r.value for r in Role}
    view = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "watch", "--once"], capture_output=True, text=True,
                          env={**os.environ, **to_env(isolated), "COLUMNS": "250"}, timeout=60)
    assert view.returncode == 0, view.stderr
    assert "ux_error_rate_high" in view.stdout and "cx_csat_low" in view.stdout and "MOBILE_APP" in view.stdout


def _raw(schema: dict, event: dict, schema_id: int) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), event)
    return frame(schema_id, buffer.getvalue())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.mark.smoke
def test_bad_input_is_dead_lettered_with_reason_and_the_worker_goes_on(isolated, publisher, start_worker, ch):
    now = int(time.time() * 1000)
    isolated.metrics_port = _free_port()
    v1 = contract_schemas()[0]
    bad = {
        "undecodable": b"{\"not\": \"avro\"}",
        "unknown_schema": _raw(v1, touchpoint("u1", now), 999),
        "contract_violation": _raw(v1, touchpoint("c1", now, anonymous_id="null"), 1),
        "future_event_time": _raw(v1, touchpoint("f1", now + 86_400_000), 1),
    }
    worker = start_worker()
    publisher.publish(touchpoint("good-1", now - 1_000))
    for value in bad.values():
        publisher.publish_raw(value, key=b"anonymous:a-1")
    publisher.publish(touchpoint("good-2", now))
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 2, 60, "the two good rows", worker)
    dead = read_topic(isolated, isolated.kafka.dead_letter_topic, 1, expected=4)
    by_reason = {dict(r.headers)["reason"].decode(): r for r in dead}
    assert set(by_reason) == set(bad)
    for reason, record in by_reason.items():
        headers = dict(record.headers)
        assert record.value == bad[reason]  # the original bytes, untouched
        assert headers["source.topic"].decode() == isolated.kafka.topic and headers["detail"]
    assert "all blank" in dict(by_reason["contract_violation"].headers)["detail"].decode()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{isolated.metrics_port}/metrics", timeout=5).read().decode()
    assert _metric(metrics, "touchpoint_events_in_total", channel="WEB") == 2
    assert _metric(metrics, "touchpoint_events_out_total", channel="WEB") == 2
    assert _metric(metrics, "touchpoint_events_dead_lettered_total", channel="unknown", reason="undecodable") == 1
    assert _metric(metrics, "touchpoint_events_dead_lettered_total", channel="WEB", reason="future_event_time") == 1
    assert _metric(metrics, "touchpoint_clickhouse_insert_duration_seconds_count", table="touchpoints") >= 1
    assert "touchpoint_consumer_lag_events" in metrics and "touchpoint_batch_size_events_bucket" in metrics


def test_schema_v1_and_v2_are_read_side_by_side(isolated, start_worker, ch):
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
    from pipeline.contract.registry import open_registry

    registry = open_registry(isolated.registry.url)
    publishers = [TouchpointPublisher(isolated.kafka.bootstrap_servers, isolated.kafka.topic,
                                      TouchpointEncoder(registry, isolated.registry.subject, version))
                  for version in (1, 2)]
    now = int(time.time() * 1000) - 30_000
    worker = start_worker()
    for i in range(200):
        event = touchpoint(f"v-{i}", now + i, channel="MOBILE_APP")
        if i % 2:
            publishers[1].publish({**event, "sentiment": -0.5, "app_version": "2.1.0", "rage_clicks": 4})
        else:
            publishers[0].publish(event)
    for p in publishers:
        p.close()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 200, 60, "200 rows", worker)
    by_schema = dict(ch.execute(
        "SELECT schema_id, countIf(ifNull(sentiment, 0) = -0.5 AND ifNull(app_version, '') = '2.1.0') "
        "FROM touchpoints GROUP BY schema_id"))
    assert by_schema == {1: 0, 2: 100}


def test_sigkill_mid_stream_loses_and_doubles_nothing(isolated, publisher, start_worker, ch):
    isolated.window.idle_close_s = 15  # a slow restart must not idle-close windows the stream still fills
    start_ms = int(time.time() * 1000) - 300_000
    events = traffic(40_000, start_ms=start_ms, seed=5, prefix="k")
    publisher.publish_many(events)
    publisher.flush()
    first = start_worker()
    wait_until(lambda: ch.execute("SELECT count() FROM indicator_cells")[0][0] > 0
               and ch.execute("SELECT count() FROM touchpoints")[0][0] > 8_000, 90, "the first flushes", first)
    first.kill()  # SIGKILL: no flush, no commit, no goodbye to the group
    done_before_kill = ch.execute("SELECT count() FROM touchpoints")[0][0]
    assert done_before_kill < len(events), "the worker finished before it could be killed; publish more events"
    publisher.publish_many(events[10_000:12_000])  # and duplicates while it is down
    publisher.flush()
    second = start_worker()
    wait_until(lambda: all_windows_closed(ch, isolated, events[-1]["event_time"]), 120, "all windows closed", second)

    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (40_000, 40_000)
    expected = reference.indicator_values(events, isolated.window.size_s * 1000)
    assert_values_equal(stored_values(ch), expected)
    second.stop()
    fired = assert_alerts_follow_the_rules(ch, isolated, expected, events[-1]["event_time"])
    assert ("ux_error_rate_high", "bank", "MOBILE_APP") in fired


def test_publish_command_reports_bad_lines_and_publishes_nothing_or_every_good_line(isolated, tmp_path):
    now = int(time.time() * 1000)
    lines = [json.dumps(touchpoint("p1", now)), "{not json", json.dumps({"event_id": "p2"}),
             json.dumps(csat(9, event_id="p3", event_time=now)), json.dumps(task("SUCCESS", event_id="p4",
                                                                                  event_time=now))]
    path = tmp_path / "touchpoints.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = {**os.environ, **to_env(isolated), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "publish", str(path)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "line 2" in result.stdout and "not JSON" in result.stdout
    assert "line 3" in result.stdout and "line 4" in result.stdout and "outside its scale" in result.stdout
    assert "published nothing: 3 bad lines, 2 good" in result.stdout
    assert read_topic(isolated, isolated.kafka.topic, isolated.kafka.partitions, expected=1, timeout_s=3) == []
    result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "publish", "--skip-bad", str(path)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "delivered 2 of 2 touchpoints" in result.stdout and "3 bad lines skipped" in result.stdout
    records = read_topic(isolated, isolated.kafka.topic, isolated.kafka.partitions, expected=2)
    newest = fastavro.parse_schema(contract_schemas()[-1])
    assert sorted(fastavro.schemaless_reader(io.BytesIO(r.value[5:]), newest, None)["event_id"]
                  for r in records) == ["p1", "p4"]


def test_two_workers_share_the_partitions_and_count_each_event_once(isolated, publisher, start_worker, ch):
    isolated.window.idle_close_s = 15  # a pause during the rebalance must not idle-close windows still filling
    start_ms = int(time.time() * 1000) - 240_000
    events = traffic(20_000, start_ms=start_ms, seed=9, prefix="w")
    first = start_worker()
    publisher.publish_many(events[:5_000])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] > 0, 60, "first rows", first)
    second = start_worker()  # joins mid-stream: the group rebalances and partitions move
    publisher.publish_many(events[5_000:])
    publisher.flush()
    wait_until(lambda: all_windows_closed(ch, isolated, events[-1]["event_time"]), 120, "all windows closed", second)
    assert first.process.poll() is None and second.process.poll() is None
    writers = ch.execute("SELECT count(DISTINCT source_partition) FROM touchpoints")[0][0]
    assert writers == isolated.kafka.partitions
    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (20_000, 20_000)
    assert_values_equal(stored_values(ch), reference.indicator_values(events, isolated.window.size_s * 1000))


def test_after_sigkill_the_restarted_worker_replays_only_what_came_after_the_last_checkpoint(
        isolated, publisher, start_worker, ch):
    """Sessions stay open for 30 minutes, so before snapshots a restart replayed every partition from its start;
    now it resumes from the snapshot in the last checkpoint, and the counts stay exact."""
    isolated.window.session_gap_s = 1_800  # the production default: every person's session is open throughout
    isolated.batch.snapshot_interval_s = 1.0
    # The pause before the kill must not idle-close the windows the next records fall in (they would be late).
    isolated.window.idle_close_s = 15
    isolated.metrics_port = _free_port()
    start_ms = int(time.time() * 1000) - 300_000
    events = traffic(20_000, start_ms=start_ms, seed=7, prefix="r")
    first = start_worker()
    publisher.publish_many(events[:15_000])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 15_000, 90, "the first rows", first)
    time.sleep(3)  # quiet: the next flushes write checkpoints with snapshots of everything read
    checkpointed = ch.execute("SELECT sum(r) FROM (SELECT partition, max(read_offset) AS r FROM "
                              "pipeline_checkpoints WHERE state != '' GROUP BY partition)")[0][0]
    assert checkpointed == 15_000
    first.kill()
    publisher.publish_many(events[15_000:])
    publisher.publish_many(events[5_000:5_500])  # duplicates while it is down
    publisher.flush()
    second = start_worker()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] >= 20_000, 90, "the rest", second)
    wait_until(lambda: all_windows_closed(ch, isolated, events[-1]["event_time"]), 120, "all windows closed", second)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{isolated.metrics_port}/metrics", timeout=5).read().decode()
    read_after_restart = sum(_metric(metrics, "touchpoint_events_in_total", channel=c)
                             for c in ("MOBILE_APP", "CONTACT_CENTRE", "EMAIL", "WEB"))
    # Only the 5,000 new records and the 500 duplicates are read again: none of the 15,000 checkpointed ones.
    assert read_after_restart == 5_500, read_after_restart
    assert "(state)" in second.log_path.read_text()
    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (20_000, 20_000)
    expected = reference.indicator_values(events, isolated.window.size_s * 1000)
    assert_values_equal(stored_values(ch), expected)
