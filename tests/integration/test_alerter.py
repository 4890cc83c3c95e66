"""`touchpoint alerter` on the real stack: two alerters over cells and checkpoints of four partitions, a webhook
test server on loopback that fails for a while, the active alerter SIGKILLed; and the demo's traffic through two
real workers raising (and resolving) the two UX-CX divergence alerts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.adapters.clickhouse import ClickHouseSink
from pipeline.core.aggregate import WindowCell
from pipeline.settings import Settings, to_env
from tests.integration.conftest import read_topic, wait_until

pytestmark = pytest.mark.integration
PANE_MS = 10_000


class Hook:
    """A webhook receiver on loopback: answers 500 while failing, records every body it accepted."""

    def __init__(self) -> None:
        self.failing = True
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hook.failing:
                    hook.refused += 1
                    self.send_response(500)
                else:
                    hook.accepted.append(body)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[tuple[str, str, str]]:
        """(notification reason, alert status, transition event id or case id) of every accepted alert."""
        return [(body["touchpoint"]["reason"], alert["status"],
                 alert["touchpoint"].get("event_id") or alert["fingerprint"])
                for body in self.accepted for alert in body["alerts"]]


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.server.shutdown()


class AlerterProcess:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "alerter"], stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, **to_env(settings)})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])


def alerting_settings(isolated: Settings, hook: Hook, *, idle_close_s: float | None = None) -> Settings:
    settings = isolated.model_copy(deep=True)
    if idle_close_s is not None:
        settings.window.idle_close_s = idle_close_s
    alerting = settings.alerting
    alerting.topic = f"{settings.kafka.topic}.alerts"
    alerting.cycle_s = 0.3
    alerting.lease_ttl_s = 3
    alerting.retry_initial_s = 0.2
    alerting.retry_max_s = 1.0
    alerting.receivers = [{"name": "hook", "kind": "webhook", "url": hook.url, "timeout_s": 2}]
    alerting.routes = [{"receiver": "hook", "repeat_interval_s": 3600}]
    return settings


def cell(end_ms: int, partition: int, n: float, value: float, indicator: str = "csat") -> WindowCell:
    return WindowCell(window_kind="1m", window_start_ms=end_ms - PANE_MS, window_end_ms=end_ms, tenant="bank",
                      channel="WEB", role="customer", flow="", device_class="", indicator=indicator,
                      partition=partition, count=n, total=n * value, sketch=())


def checkpoint(ch: Any, settings: Settings, closed_before: dict[int, int]) -> None:
    now = int(time.time() * 1000)
    ch.execute("INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, commit_offset, read_offset, "
               "watermark_ms, closed_before_ms, written_at_ms) VALUES",
               [(settings.kafka.consumer_group, settings.kafka.topic, p, 1, 1 + closed // 1000, closed, closed, now)
                for p, closed in closed_before.items()])


def detractor(ch: Any, event_id: str, event_time_ms: int, person: str) -> None:
    ch.execute("INSERT INTO touchpoints (event_id, event_time_ms, tenant, channel, event_type, person_id, role, "
               "is_customer, survey_kind, survey_score, survey_scale_min, survey_scale_max, attribute_keys, "
               "attribute_values, schema_id, source_partition, source_offset, counted) VALUES",
               [(event_id, event_time_ms, "hospital", "SURVEY", "survey_response", person, "customer", 1, "NPS", 2, 0,
                 10, [], [], 1, 0, 0, 1)])


def lease(ch: Any) -> tuple[int, str] | None:
    rows = ch.execute("SELECT epoch, holder FROM alerter_lease WHERE epoch = (SELECT max(epoch) FROM alerter_lease) "
                      "ORDER BY claimed_at_ms, holder LIMIT 1")
    return (int(rows[0][0]), rows[0][1]) if rows else None


def events(ch: Any) -> list[tuple[str, str, str, int]]:
    return [tuple(r) for r in ch.execute(
        "SELECT event_id, from_state, to_state, window_end_ms FROM alert_events ORDER BY window_end_ms, at_ms")]


def test_two_alerters_judge_whole_windows_once_survive_a_failing_webhook_and_a_sigkill(
        isolated: Settings, ch: Any, hook: Hook, tmp_path: Path) -> None:
    settings = alerting_settings(isolated, hook, idle_close_s=120)  # partitions stay 'active' for the test
    settings.alerting.rules = [{"name": "cx_csat_low", "indicator": "csat", "comparison": "below", "threshold": 0.6,
                                "recovery_threshold": 0.7, "min_count": 10}]
    settings.alerting.cases.sla_hours = 3 / 3600  # a case escalates 3 s after it opened
    now = int(time.time() * 1000)
    base = now - now % PANE_MS - 30 * PANE_MS
    ends = [base + k * PANE_MS for k in range(1, 7)]
    sink = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    # Windows 1-3 breach (CSAT 50 %), each partition holding 4 answers: fewer than min_count alone, 16 together.
    sink.write_cells([cell(end, p, 4, 0.5) for end in ends[:3] for p in range(4)], now)
    # Partition 3 has closed window 1 only: windows 2 and 3 must wait for it.
    checkpoint(ch, settings, {0: ends[2], 1: ends[2], 2: ends[2], 3: ends[0]})
    detractor(ch, "d-1", ends[0] - 5_000, "person-1")

    alerters = [AlerterProcess(settings, tmp_path / "alerter-a.log")]
    try:
        wait_until(lambda: lease(ch), 30, "a first alerter to take the lease")
        alerters.append(AlerterProcess(settings, tmp_path / "alerter-b.log"))
        fired = wait_until(lambda: [e for e in events(ch) if e[2] == "firing"], 30, "the firing transition")
        assert [(e[1], e[2], e[3]) for e in fired] == [("inactive", "firing", ends[0])]
        time.sleep(1.5)
        progress = ch.execute("SELECT window_end_ms FROM alert_state FINAL WHERE fingerprint = ''")
        assert progress == [(ends[0],)]  # windows 2 and 3 are not closed on partition 3 yet
        assert hook.accepted == [] and hook.refused >= 1  # the receiver is down: retried, not lost
        case = wait_until(lambda: ch.execute("SELECT case_id, status, reason, queue FROM cases FINAL"), 20,
                          "the detractor's case")
        assert [c[2:] for c in case] == [("nps_detractor", "cx-follow-up")]
        hook.failing = False
        wait_until(lambda: ("transition", "firing", fired[0][0]) in hook.alerts(), 20, "the firing notification")
        wait_until(lambda: any(reason == "case" for reason, _, _ in hook.alerts()), 20, "the case escalation")
        assert ch.execute("SELECT status FROM cases FINAL") == [("escalated",)]

        # A notification sent but not yet logged when its alerter dies is sent again (the documented bound of at
        # least once); here everything sent is logged before the kill, so nothing may repeat.
        wait_until(lambda: ch.execute("SELECT count() FROM alert_notifications WHERE receiver = 'hook' AND "
                                      "status = 'sent'")[0][0] >= 2, 10, "the deliveries to be logged")
        # SIGKILL the active alerter (mid-cycle: it cycles every 0.3 s), then let the windows close and recover.
        epoch, holder = lease(ch) or (0, "")
        active = next(a for a in alerters if f"-{a.process.pid}-" in holder)
        active.process.send_signal(signal.SIGKILL)
        active.process.wait()
        killed_at = time.monotonic()
        sink.write_cells([cell(end, p, 4, 0.9) for end in ends[3:] for p in range(4)], int(time.time() * 1000))
        checkpoint(ch, settings, dict.fromkeys(range(4), ends[5]))
        wait_until(lambda: (lease(ch) or (0, ""))[0] > epoch, 30, "the standby to take the lease")
        took_over_s = time.monotonic() - killed_at
        resolved = wait_until(lambda: [e for e in events(ch) if e[2] == "resolved"], 30, "the resolution")
        assert [(e[1], e[2], e[3]) for e in resolved] == [("firing", "resolved", ends[3])]
        wait_until(lambda: ("transition", "resolved", resolved[0][0]) in hook.alerts(), 20,
                   "the resolved notification")
        assert took_over_s < 30
        time.sleep(2)  # anything repeated would arrive now

        stored = events(ch)
        assert len(stored) == len({e[0] for e in stored}) == 2  # no transition written twice
        transitions = [a for a in hook.alerts() if a[0] == "transition"]
        assert sorted(transitions) == sorted([("transition", "firing", fired[0][0]),
                                              ("transition", "resolved", resolved[0][0])])
        # The open case escalates once per SLA period (3 s here), each level notified once.
        levels = [alert["touchpoint"]["case"]["escalation_level"] for body in hook.accepted for alert in body["alerts"]
                  if body["touchpoint"]["reason"] == "case" and alert["fingerprint"] == case[0][0]]
        assert levels and sorted(levels) == list(range(1, len(levels) + 1))
        records = read_topic(settings, settings.alerting.topic, 1, 2)
        produced = [r.key.decode() for r in records]
        fingerprints = {r[0] for r in ch.execute("SELECT DISTINCT fingerprint FROM alert_events")}
        assert set(produced) == fingerprints and len(records) == 2
        log = ch.execute("SELECT receiver, status, count() FROM alert_notifications GROUP BY receiver, status "
                         "ORDER BY receiver, status")
        assert ("hook", "failed") in {(r[0], r[1]) for r in log}
    finally:
        for alerter in alerters:
            alerter.stop()
        sink.client.disconnect()


def test_demo_traffic_raises_both_divergence_alerts_through_two_workers_and_two_alerters(
        isolated: Settings, ch: Any, hook: Hook, start_worker: Any, publisher: Any, tmp_path: Path) -> None:
    from pipeline.generate.scenarios import generate

    settings = alerting_settings(isolated, hook)
    hook.failing = False
    settings.alerting.rules = [r for r in settings.alerting.rules if r["kind"] == "divergence"]
    workers = [start_worker(), start_worker()]
    alerters = [AlerterProcess(settings, tmp_path / f"alerter-{n}.log") for n in range(2)]
    try:
        start = int(time.time() * 1000) + 2_000
        for event in generate("mixed", 24_000, seed=3, start_ms=start, events_per_s=1_000):
            publisher.publish(event)
        publisher.flush()

        def firing() -> set[tuple[str, str]]:
            return {(r[0], r[1]) for r in ch.execute("SELECT rule, tenant FROM alert_current WHERE state = 'firing'")}

        wait_until(lambda: {("ux_bad_cx_good", "bank"), ("ux_good_cx_bad", "hospital")} <= firing(), 120,
                   "both divergence alerts", workers[0])
        assert firing() == {("ux_bad_cx_good", "bank"), ("ux_good_cx_bad", "hospital")}
        wait_until(lambda: {(a[1], a[2]) for a in hook.alerts()} and {
            body["groupLabels"]["rule"] for body in hook.accepted} >= {"ux_bad_cx_good", "ux_good_cx_bad"}, 30,
            "the webhook notifications")
        # The traffic recovers: healthy journeys (the shop's) for the bank and the hospital. Idle partitions'
        # watermarks kept moving with the wall clock, so the new traffic starts after every closed window.
        closed = ch.execute("SELECT max(closed_before_ms) FROM pipeline_checkpoints")[0][0]
        resume = max(start + 40_000, closed + 20_000, int(time.time() * 1000))
        healthy = [e for e in generate("mixed", 60_000, seed=4, start_ms=resume, events_per_s=2_000)
                   if e["tenant"] == "shop"]
        for event in healthy:  # both copies of an event together: event time only moves forward
            for tenant in ("bank", "hospital"):
                publisher.publish({**event, "tenant": tenant, "event_id": f"{tenant}-{event['event_id']}"})
        publisher.flush()
        try:
            wait_until(lambda: not firing(), 120, "the divergence alerts to resolve", workers[0])
        except BaseException:
            print(ch.execute("SELECT rule, tenant, from_state, to_state, window_end_ms, message, closed_by_idle "
                             "FROM alert_events ORDER BY at_ms"))
            print(ch.execute("SELECT tenant, counted, count(), min(event_time_ms), max(event_time_ms) FROM touchpoints "
                             "WHERE event_id LIKE 'hospital-%' GROUP BY tenant, counted"), resume)
            print(ch.execute("SELECT toUInt32(window_end), indicator, sum(count), sum(total) FROM indicator_cells "
                             "WHERE tenant = 'hospital' AND window_kind = '1m' AND indicator IN ('csat', 'fcr', "
                             "'escalation_rate', 'nps') GROUP BY window_end, indicator ORDER BY window_end"))
            print(ch.execute("SELECT partition, max(closed_before_ms), max(written_at_ms) FROM pipeline_checkpoints "
                             "GROUP BY partition"), start)
            raise
        resolved = {(r[0], r[1]) for r in ch.execute(
            "SELECT rule, tenant FROM alert_events WHERE to_state = 'resolved'")}
        assert resolved == {("ux_bad_cx_good", "bank"), ("ux_good_cx_bad", "hospital")}
        # Two alerters, one engine: every transition once.
        assert ch.execute("SELECT count(), uniqExact(event_id), uniqExact(epoch) FROM alert_events") == [(4, 4, 1)]
    finally:
        for alerter in alerters:
            alerter.stop()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **to_env(settings), "COLUMNS": "200"})


def test_operators_ack_silence_resolve_and_close_cases_from_the_cli(
        isolated: Settings, ch: Any, hook: Hook, tmp_path: Path) -> None:
    settings = alerting_settings(isolated, hook, idle_close_s=120)
    hook.failing = False
    settings.alerting.rules = [{"name": "cx_csat_low", "indicator": "csat", "comparison": "below", "threshold": 0.6,
                                "min_count": 10}]
    now = int(time.time() * 1000)
    end = now - now % PANE_MS - 5 * PANE_MS
    sink = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    sink.write_cells([cell(end, p, 4, 0.5) for p in range(4)], now)
    checkpoint(ch, settings, dict.fromkeys(range(4), end))
    detractor(ch, "d-2", end - 5_000, "person-2")
    alerter = AlerterProcess(settings, tmp_path / "alerter.log")
    try:
        wait_until(lambda: ch.execute("SELECT count() FROM alert_current WHERE state = 'firing'")[0][0], 30,
                   "the alert to fire")
        listed = cli(settings, "alerts", "list")
        fp = ch.execute("SELECT fingerprint FROM alert_current")[0][0]
        assert listed.returncode == 0 and fp in listed.stdout and "firing" in listed.stdout

        wrong = cli(settings, "alerts", "ack", "zzz", "--by", "ana")
        assert wrong.returncode == 1 and "no alert with fingerprint 'zzz'" in wrong.stdout
        assert cli(settings, "alerts", "ack", fp[:6], "--by", "ana").returncode == 0
        wait_until(lambda: ch.execute("SELECT acked_by FROM alert_current")[0][0] == "ana", 20, "the ack")

        silenced = cli(settings, "alerts", "silence", "tenant=bank", "--duration", "600", "--by", "ana")
        assert silenced.returncode == 0 and "silence" in silenced.stdout
        assert cli(settings, "alerts", "resolve", fp, "--by", "ana").returncode == 0
        wait_until(lambda: ch.execute("SELECT state FROM alert_current")[0][0] == "resolved", 20, "the resolution")
        wait_until(lambda: ch.execute("SELECT count() FROM alert_notifications WHERE status = 'silenced'")[0][0],
                   10, "the silenced notification")
        resolved = ch.execute("SELECT cause, actor FROM alert_events WHERE to_state = 'resolved'")
        assert resolved == [("manual", "ana")]
        assert [a for a in hook.alerts() if a[1] == "resolved"] == []  # muted by the silence

        case_id = wait_until(lambda: ch.execute("SELECT case_id FROM cases FINAL"), 20, "the case")[0][0]
        assert case_id in cli(settings, "cases", "list").stdout
        assert cli(settings, "cases", "close", case_id[:8], "--by", "ana").returncode == 0
        wait_until(lambda: ch.execute("SELECT status, closed_by FROM cases FINAL") == [("closed", "ana")], 20,
                   "the case to close")
        # The history row follows the case's row (write_cases inserts cases, then case_history): wait for it too.
        wait_until(lambda: [r[0] for r in ch.execute("SELECT action FROM case_history ORDER BY at_ms")]
                   == ["opened", "closed"], 20, "the case's history")
        assert [r[0] for r in ch.execute("SELECT action FROM case_history ORDER BY at_ms")] == ["opened", "closed"]
    finally:
        alerter.stop()
        sink.client.disconnect()


class Crash(Exception):
    """Stands for the process dying between two writes of a cycle."""


def test_a_takeover_after_a_crash_between_writes_neither_repeats_nor_loses_a_transition(
        isolated: Settings, ch: Any, hook: Hook) -> None:
    from pipeline.app.alerter import Alerter
    from pipeline.core.notify import Notification

    settings = alerting_settings(isolated, hook, idle_close_s=120)
    settings.alerting.lease_ttl_s = 1
    settings.alerting.rules = [{"name": "cx_csat_low", "indicator": "csat", "comparison": "below", "threshold": 0.6,
                                "min_count": 10}]
    settings.alerting.routes = [{"receiver": "log"}]
    settings.alerting.receivers = [{"name": "log"}]
    now = int(time.time() * 1000)
    ends = [now - now % PANE_MS - 10 * PANE_MS + k * PANE_MS for k in (1, 2)]
    sink = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    sink.write_cells([cell(ends[0], p, 4, 0.5) for p in range(4)], now)
    checkpoint(ch, settings, dict.fromkeys(range(4), ends[0]))
    sent: list[str] = []  # to_state of every alert the second alerter delivered

    def down(_: Notification) -> tuple[bool, int, str]:
        return False, 503, "down"

    def record(n: Notification) -> tuple[bool, int, str]:
        sent.extend(a["touchpoint"]["to_state"] for a in n.payload["alerts"])
        return True, 200, ""

    first = Alerter(settings, holder="a", senders={"log": down}, produce=False)
    second = Alerter(settings, holder="b", senders={"log": record}, produce=False)
    try:
        def crash(*_: Any, **__: Any) -> None:
            raise Crash

        first.store.write_states = crash  # type: ignore[method-assign]
        with pytest.raises(Crash):  # the outbox and the transition are written, the states are not
            first.cycle()
        assert first.dispatcher is not None
        first.dispatcher.stop()  # the process is gone: nothing more from it
        assert [e[2] for e in events(ch)] == ["firing"]
        assert not second.cycle().active  # the lease is still the first one's
        wait_until(lambda: second.cycle().active, 10, "the second alerter to take over")
        wait_until(lambda: sent == ["firing"], 10, "the resumed notification")
        sink.write_cells([cell(ends[1], p, 4, 0.9) for p in range(4)], int(time.time() * 1000))
        checkpoint(ch, settings, dict.fromkeys(range(4), ends[1]))
        wait_until(lambda: second.cycle().events, 10, "the next window")
        wait_until(lambda: sent == ["firing", "resolved"], 10, "the resolution")
        time.sleep(1)
        assert [(e[1], e[2]) for e in events(ch)] == [("inactive", "firing"), ("firing", "resolved")]
        assert sent == ["firing", "resolved"]  # the resumed one once, the new one once
    finally:
        second.close()
        first.store.close()
        sink.client.disconnect()


def test_the_console_interface_over_the_lifecycle_tables(isolated: Settings, ch: Any, hook: Hook,
                                                         tmp_path: Path) -> None:
    from pipeline.app.alert_admin import LifecycleAlertStore

    settings = alerting_settings(isolated, hook, idle_close_s=120)
    hook.failing = False
    settings.alerting.rules = [{"name": "cx_csat_low", "indicator": "csat", "comparison": "below", "threshold": 0.6,
                                "min_count": 10}]
    now = int(time.time() * 1000)
    end = now - now % PANE_MS - 5 * PANE_MS
    sink = ClickHouseSink(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    sink.write_cells([cell(end, p, 4, 0.5) for p in range(4)], now)
    checkpoint(ch, settings, dict.fromkeys(range(4), end))
    alerter = AlerterProcess(settings, tmp_path / "alerter.log")
    store = LifecycleAlertStore(settings)
    try:
        listed = wait_until(lambda: store.list(3600, int(time.time() * 1000)), 30, "the alert in the console list")
        (alert,) = listed
        assert (alert["rule"], alert["tenant"], alert["channel"], alert["state"], alert["window_end_ms"]) == (
            "cx_csat_low", "bank", "WEB", "firing", end)
        acted = store.act(alert["alert_id"], "acknowledge", "ana", "looking", 0, int(time.time() * 1000))
        assert [h["action"] for h in acted["history"]] == ["inactive->firing", "ack"]
        wait_until(lambda: (store.get(alert["alert_id"], int(time.time() * 1000)) or {}).get("state")
                   == "acknowledged", 20, "the acknowledgement")
        until = int(time.time() * 1000) + 600_000
        silenced = store.act(alert["alert_id"], "silence", "ana", "", until, int(time.time() * 1000))
        assert (silenced["state"], silenced["silenced_until_ms"]) == ("silenced", until)
        store.act(alert["alert_id"], "resolve", "ana", "", 0, int(time.time() * 1000))
        wait_until(lambda: (store.get(alert["alert_id"], int(time.time() * 1000)) or {}).get("state")
                   == "resolved", 20, "the resolution")
        with pytest.raises(LookupError):
            store.act("nope", "resolve", "ana", "", 0, int(time.time() * 1000))
    finally:
        store.close()
        alerter.stop()
        sink.client.disconnect()
