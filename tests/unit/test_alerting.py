"""The alert engine's pure core on synthetic series, with an injected clock: lifecycle (for, hysteresis,
keep_firing_for, no_data), the Wilson, seasonal and divergence rules, routing, silences, grouping, repeat and
escalation timing, follow-up cases, and the delivery queue."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pipeline.adapters.alert_store import PartitionProgress
from pipeline.app.alerter import Dispatcher, closed_horizon
from pipeline.core.alerting import (
    AlertEngine,
    Completeness,
    RuleError,
    fingerprint,
    parse_rule,
    parse_rules,
    robust_z,
    seasonal_hours,
    wilson_interval,
)
from pipeline.core.cases import CaseBook, CaseConfig, TouchpointFact
from pipeline.core.evaluate import WindowTotal
from pipeline.core.notify import (
    Notification,
    Planner,
    Silence,
    backoff_s,
    parse_receivers,
    parse_routes,
)
from pipeline.settings import default_alerting_rules

MIN = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
LENGTHS = {"1m": MIN, "15m": 15 * MIN, "session": MIN}


def total(end: int, value: float, n: float = 100, *, indicator: str = "csat", tenant: str = "bank",
          channel: str = "WEB", kind: str = "1m") -> WindowTotal:
    return WindowTotal(end - LENGTHS[kind], end, tenant, channel, indicator, value * n, n, kind)


def run(rule: dict, series: list[float | None], **kwargs) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Judge one value per minute (None: no data); returns the state after each window and the transitions."""
    engine = AlertEngine([parse_rule(rule)], LENGTHS)
    states, transitions = [], []
    for i, value in enumerate(series, start=1):
        end = T0 + i * MIN
        totals = [] if value is None else [total(end, value, **kwargs)]
        for event in engine.judge(end, totals, now_ms=end + 5_000):
            transitions.append((event.from_state, event.to_state, i))
        states.append(next(iter(engine.series.values())).state if engine.series else "inactive")
    return states, transitions


CSAT_LOW = {"name": "cx_csat_low", "indicator": "csat", "comparison": "below", "threshold": 0.6,
            "recovery_threshold": 0.7, "min_count": 10}


def test_for_windows_and_hysteresis():
    states, transitions = run({**CSAT_LOW, "for_windows": 2}, [0.8, 0.5, 0.5, 0.65, 0.72, 0.5, 0.8])
    assert states == ["inactive", "pending", "firing", "firing", "resolved", "pending", "inactive"]
    assert transitions == [("inactive", "pending", 2), ("pending", "firing", 3), ("firing", "resolved", 5),
                           ("resolved", "pending", 6), ("pending", "inactive", 7)]


def test_keep_firing_for_holds_a_recovered_alert():
    states, transitions = run({**CSAT_LOW, "keep_firing_for_s": 120}, [0.5, 0.8, 0.8, 0.8])
    assert states == ["firing", "firing", "resolved", "resolved"]
    assert transitions == [("inactive", "firing", 1), ("firing", "resolved", 3)]


def test_no_data_is_its_own_state_and_too_few_observations_are_not_silence():
    states, transitions = run({**CSAT_LOW, "no_data_windows": 2}, [0.5, None, None, 0.8, None])
    assert states == ["firing", "firing", "no_data", "inactive", "inactive"]
    assert transitions == [("inactive", "firing", 1), ("firing", "no_data", 3), ("no_data", "inactive", 4)]
    # 5 answers < min_count 10: present but not judged; neither fires nor counts as missing
    states, transitions = run({**CSAT_LOW, "no_data_windows": 1}, [0.1, 0.1], n=5)
    assert states == ["inactive", "inactive"] and transitions == []


def test_events_carry_window_values_and_completeness():
    engine = AlertEngine([parse_rule(CSAT_LOW)], LENGTHS)
    end = T0 + MIN
    events = engine.judge(end, [total(end, 0.5, 40)], now_ms=end + 1_000,
                          completeness=Completeness(4, (0, 1, 2), (3,)))
    (event,) = events
    assert (event.fingerprint, event.window_start_ms, event.window_end_ms, event.value) == (
        "4de570fc1ec7c5c1", T0, T0 + MIN, 0.5)
    assert dict(event.values) == {"count": 40.0, "value": 0.5}
    assert event.message == ("cx_csat_low firing for bank WEB: csat 50.0% (20 of 40) in 2026-01-01 00:00-00:01 UTC "
                             "(1m); partitions 3 closed by idle timeout")
    assert fingerprint("cx_csat_low", "bank", "WEB") == "4de570fc1ec7c5c1"  # stable across runs and processes
    assert (event.completeness.channels_reporting, event.completeness.channels_expected) == (("WEB",), ("WEB",))


def test_events_say_which_of_the_tenants_channels_reported():
    engine = AlertEngine([parse_rule({**CSAT_LOW, "no_data_windows": 1})], LENGTHS)
    end = T0 + MIN
    engine.judge(end, [total(end, 0.8), total(end, 0.8, channel="EMAIL")], now_ms=end)
    (event,) = engine.judge(end + MIN, [total(end + MIN, 0.8)], now_ms=end + MIN)  # EMAIL went silent
    assert (event.channel, event.to_state) == ("EMAIL", "no_data")
    assert event.completeness.as_dict() == {"partitions": 0, "closed_by_watermark": [], "closed_by_idle": [],
                                            "channels_reporting": ["WEB"], "channels_expected": ["EMAIL", "WEB"]}


def test_wilson_interval_and_rule_fire_only_when_the_interval_is_beyond():
    assert tuple(round(x, 4) for x in wilson_interval(45, 100, 0.95)) == (0.3561, 0.5476)
    assert tuple(round(x, 4) for x in wilson_interval(9, 20, 0.95)) == (0.2582, 0.6579)
    rule = {"name": "tsr", "kind": "wilson", "indicator": "task_success_rate", "comparison": "below",
            "threshold": 0.6, "min_count": 20}
    _, fired = run(rule, [0.45], n=100, indicator="task_success_rate")
    _, not_fired = run(rule, [0.45], n=20, indicator="task_success_rate")
    assert fired == [("inactive", "firing", 1)] and not_fired == []
    engine = AlertEngine([parse_rule(rule)], LENGTHS)
    (event,) = engine.judge(T0 + MIN, [total(T0 + MIN, 0.45, 100, indicator="task_success_rate")], T0 + MIN)
    values = dict(event.values)
    assert (round(values["interval_low"], 4), round(values["interval_high"], 4)) == (0.3561, 0.5476)


def test_seasonal_robust_z_and_minimum_history():
    history = [0.02, 0.025, 0.018, 0.022]
    z, median, scale = robust_z(0.05, history)
    assert (round(z, 2), round(median, 4), round(scale, 6)) == (9.78, 0.021, 0.002965)
    assert round(robust_z(0.028, history)[0], 2) == 2.36
    assert seasonal_hours(T0 + 30 * MIN, 2) == [T0 - 7 * 86_400_000, T0 - 14 * 86_400_000]
    rule = parse_rule({"name": "err", "kind": "seasonal", "indicator": "error_rate", "comparison": "above",
                       "weeks": 4, "min_weeks": 3, "z": 3.5, "min_count": 10})
    engine = AlertEngine([rule], LENGTHS)
    end = T0 + MIN
    key = ("bank", "WEB", "error_rate")
    assert engine.judge(end, [total(end, 0.05, indicator="error_rate")], end, baselines={key: history[:2]}) == []
    (event,) = engine.judge(end + MIN, [total(end + MIN, 0.05, indicator="error_rate")], end,
                            baselines={key: history})
    assert event.to_state == "firing" and round(dict(event.values)["z"], 2) == 9.78


def test_seasonal_false_positives_on_a_synthetic_weekly_series():
    """Documented behaviour (docs/alerting.md): an error rate with a daily shape and binomial noise, 4 weeks of
    hourly history, judged over a fifth normal week and then with a doubled rate for one day."""
    rng = random.Random(42)

    def rate(hour: int) -> float:
        return 0.02 + 0.015 * (8 <= hour % 24 <= 20)

    def observed(hour: int, factor: float = 1.0, n: int = 2000) -> float:
        p = rate(hour) * factor
        return sum(rng.random() < p for _ in range(n)) / n

    weeks = [[observed(h) for h in range(168)] for _ in range(4)]
    normal = [observed(h) for h in range(168)]
    anomalous = [observed(h, 2.0) for h in range(24)]

    def alerts(values: list[float], min_mad: float) -> int:
        return sum(robust_z(v, [w[h] for w in weeks], min_mad)[0] > 3.5 for h, v in enumerate(values))

    # A spread floor below the noise (binomial sd ~0.003-0.004 here): 4 weeks' MAD is itself noisy, 5 of 168
    # normal hours alert. A floor at the noise level: none do, and 22 of the 24 doubled hours still alert.
    assert (alerts(normal, 0.002), alerts(anomalous, 0.002)) == (5, 23)
    assert (alerts(normal, 0.004), alerts(anomalous, 0.004)) == (0, 22)


BANK = {"task_success_rate": 0.71, "error_rate": 0.16, "apdex": 0.59, "csat": 0.85, "nps": 55.0, "fcr": 0.95,
        "escalation_rate": 0.03}
HOSPITAL = {"task_success_rate": 0.97, "error_rate": 0.01, "apdex": 0.77, "csat": 0.17, "fcr": 0.64,
            "escalation_rate": 0.18}
SHOP = {"task_success_rate": 0.94, "error_rate": 0.005, "apdex": 0.75, "csat": 0.83, "nps": 47.5, "fcr": 0.77,
        "escalation_rate": 0.05}


def test_divergence_rules_tell_the_bank_from_the_hospital():
    """The demo's tenants, with the values the generator's mixed scenario gives them (per minute)."""
    rules = [r for r in parse_rules(default_alerting_rules()) if r.kind == "divergence"]
    engine = AlertEngine(rules, LENGTHS)
    end = T0 + MIN
    totals = [total(end, v, 200, indicator=i, tenant=t, channel="MOBILE_APP")
              for t, values in (("bank", BANK), ("hospital", HOSPITAL), ("shop", SHOP)) for i, v in values.items()]
    fired = sorted((e.rule, e.tenant, e.channel, e.to_state) for e in engine.judge(end, totals, end))
    assert fired == [("ux_bad_cx_good", "bank", "ALL", "firing"), ("ux_good_cx_bad", "hospital", "ALL", "firing")]
    # The bank's app recovers: UX good now, the divergence resolves (and no other fires).
    recovered = [total(end + MIN, v, 200, indicator=i, tenant="bank") for i, v in SHOP.items()]
    events = engine.judge(end + MIN, recovered, end + MIN)
    assert [(e.rule, e.tenant, e.from_state, e.to_state) for e in events if e.tenant == "bank"] == [
        ("ux_bad_cx_good", "bank", "firing", "resolved")]


def test_rule_errors_name_the_rule_and_the_field():
    cases = [
        ({"name": "a", "indicator": "nope", "threshold": 1}, "alert rule 'a', field 'indicator': unknown indicator"),
        ({"name": "b", "indicator": "csat", "threshold": "x"}, "alert rule 'b', field 'threshold': must be a number"),
        ({"name": "c", "indicator": "csat", "comparison": "below", "threshold": 0.6, "recovery_threshold": 0.5},
         "alert rule 'c', field 'recovery_threshold': must be at or above the threshold 0.6"),
        ({"name": "d", "kind": "wilson", "indicator": "nps", "threshold": 1},
         "alert rule 'd', field 'indicator': nps is not a rate"),
        ({"name": "e", "kind": "divergence", "ux": {"error_rate": [0.1, 0.05]}, "cx": {"csat": [0.6, 0.7]}},
         "alert rule 'e', field 'ux': needs at least min_signals (2) indicators"),
        ({"name": "f", "indicator": "csat", "thresold": 1}, "alert rule 'f', field 'thresold': unknown field"),
        ({"name": "g", "indicator": "intermittency", "window_kind": "1m"},
         "alert rule 'g', field 'window_kind': intermittency is computed in session windows"),
    ]
    for raw, message in cases:
        with pytest.raises(RuleError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_rule(raw)


RECEIVERS = parse_receivers([{"name": "log"}, {"name": "ops", "kind": "webhook", "url": "http://127.0.0.1:9/x"},
                             {"name": "oncall", "kind": "webhook", "url": "http://127.0.0.1:9/y"}])


def firing_engine(tenants=("bank",), channels=("WEB", "MOBILE_APP")):
    engine = AlertEngine([parse_rule(CSAT_LOW)], LENGTHS)
    end = T0 + MIN
    events = engine.judge(end, [total(end, 0.5, tenant=t, channel=c) for t in tenants for c in channels], end)
    return engine, events


def test_routes_group_series_of_one_rule_and_tenant_into_one_notification():
    routes = parse_routes([{"receiver": "ops", "match": {"family": "CX", "severity": ["warning", "critical"]}},
                           {"receiver": "log"}], RECEIVERS)
    _engine, events = firing_engine(tenants=("bank", "hospital"))
    notes = Planner(routes, {}).transitions(events, [], T0 + MIN)
    assert [(n.receiver, n.group_key, len(n.payload["alerts"])) for n in notes] == [
        ("ops", 'ops:{rule="cx_csat_low",tenant="bank"}', 2),
        ("ops", 'ops:{rule="cx_csat_low",tenant="hospital"}', 2)]
    body = notes[0].payload
    assert (body["version"], body["status"], body["groupLabels"]) == (
        "4", "firing", {"rule": "cx_csat_low", "tenant": "bank"})
    assert body["commonLabels"]["alertname"] == "cx_csat_low" and "channel" not in body["commonLabels"]
    assert {a["labels"]["channel"] for a in body["alerts"]} == {"WEB", "MOBILE_APP"}
    assert body["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    # Planning is deterministic: a successor plans the same ids for the same transitions.
    assert [n.notification_id for n in Planner(routes, {}).transitions(events, [], T0 + 2 * MIN)] == [
        n.notification_id for n in notes]


def test_silences_mute_matching_alerts_until_they_end():
    routes = parse_routes([{"receiver": "ops"}], RECEIVERS)
    _, events = firing_engine()
    silence = Silence("s1", (("tenant", "bank"),), T0, T0 + 10 * MIN)
    muted = Planner(routes, {}).transitions(events, [silence], T0 + MIN)
    later = Planner(routes, {}).transitions(events, [silence], T0 + 11 * MIN)
    assert [n.silenced_by for n in muted] == ["s1"] and [n.silenced_by for n in later] == [""]


def test_escalation_when_not_acknowledged_and_repeat_interval():
    routes = parse_routes([{"receiver": "ops", "repeat_interval_s": 600,
                            "escalate": [{"after_s": 900, "receiver": "oncall"}]}], RECEIVERS)
    engine, events = firing_engine(channels=("WEB",))
    planner = Planner(routes, {})
    planner.transitions(events, [], T0 + MIN)
    last = {e.fingerprint: e for e in events}
    (series,) = engine.series.values()
    series.since_ms = T0 + MIN  # fired at this wall time
    timeline = []
    for minute in (5, 11, 16, 17, 22):
        notes = planner.follow_ups(engine.series.values(), last, [], T0 + minute * MIN)
        timeline.append((minute, sorted((n.reason, n.receiver) for n in notes)))
    assert timeline == [(5, []), (11, [("repeat", "ops")]), (16, [("escalation", "oncall")]), (17, []),
                        (22, [("repeat", "ops")])]
    # Acknowledged: no repeat, no escalation.
    engine2, events2 = firing_engine(channels=("WEB",))
    planner2 = Planner(routes, {})
    planner2.transitions(events2, [], T0 + MIN)
    assert engine2.acknowledge(events2[0].fingerprint, "ana", T0 + 2 * MIN)
    (s2,) = engine2.series.values()
    s2.since_ms = T0 + MIN
    assert planner2.follow_ups(engine2.series.values(), {e.fingerprint: e for e in events2}, [],
                               T0 + 30 * MIN) == []


def test_resolve_by_hand_is_a_transition():
    engine, events = firing_engine(channels=("WEB",))
    event = engine.resolve_by_hand(events[0].fingerprint, "ana", T0 + 3 * MIN)
    assert event is not None and (event.from_state, event.to_state, event.cause, event.actor) == (
        "firing", "resolved", "manual", "ana")
    assert engine.resolve_by_hand(events[0].fingerprint, "ana", T0 + 4 * MIN) is None


def fact(event_id: str, person: str = "p1", *, customer: bool = True, kind: str | None = "NPS",
         score: int | None = 3, low: int = 0, high: int = 10, escalated: bool = False, t: int = T0) -> TouchpointFact:
    return TouchpointFact(event_id, t, "hospital", "SURVEY", person, customer, kind, score, low, high, escalated)


def test_detractor_customers_open_one_case_per_person_and_reason_and_escalate_after_the_sla():
    book = CaseBook(CaseConfig(sla_ms=48 * 3_600_000))
    opened = book.observe([
        fact("e1"),  # NPS 3: detractor
        fact("e2", score=5),  # the same person and reason: the case is open already
        fact("e3", "p2", customer=False),  # not a customer
        fact("e4", "p3", kind="CSAT", score=2, low=1, high=5),  # CSAT 2 of 5
        fact("e5", "p4", kind="CSAT", score=3, low=1, high=5),  # CSAT 3: not a detractor
        fact("e6", "p5", kind=None, score=None, escalated=True),  # escalated contact
        fact("e7", "p6", score=7),  # NPS 7: passive
    ], now_ms=T0)
    assert sorted((c.case.person_id, c.case.reason, c.case.queue) for c in opened) == [
        ("p1", "nps_detractor", "cx-follow-up"), ("p3", "csat_detractor", "cx-follow-up"),
        ("p5", "escalated_contact", "support-escalations")]
    assert book.observe([fact("e1")], now_ms=T0) == []  # reading the same touchpoint again opens nothing
    assert book.tick(T0 + 47 * 3_600_000) == []
    escalated = book.tick(T0 + 48 * 3_600_000)
    assert sorted((c.case.person_id, c.action, c.case.escalation_level) for c in escalated) == [
        ("p1", "escalated", 1), ("p3", "escalated", 1), ("p5", "escalated", 1)]
    assert book.tick(T0 + 95 * 3_600_000) == []  # once per SLA period
    assert sorted((c.case.person_id, c.case.escalation_level) for c in book.tick(T0 + 96 * 3_600_000)) == [
        ("p1", 2), ("p3", 2), ("p5", 2)]
    p1 = next(c.case for c in opened if c.case.person_id == "p1")
    closed = book.close(p1.case_id, "ana", T0 + 97 * 3_600_000)
    assert closed is not None and closed.case.status == "closed"
    assert [c.case.person_id for c in book.observe([fact("e9", t=T0 + 51 * 3_600_000)], T0)] == ["p1"]


def test_closed_horizon_counts_idle_partitions_as_closed():
    now = T0 + 10 * MIN
    progress = [PartitionProgress(0, T0 + 5 * MIN, now - 500), PartitionProgress(1, T0 + 4 * MIN, now - 300),
                PartitionProgress(2, T0 + 1 * MIN, now - 60_000)]  # partition 2 idle; partition 3 never wrote
    horizon, _closed, idle = closed_horizon(progress, [0, 1, 2, 3], now, 5_000, MIN)
    assert (horizon, idle) == (T0 + 4 * MIN, {2, 3})
    # Every partition idle: wall-clock time closes windows, so silence is judged too.
    horizon, _, idle = closed_horizon(progress, [0, 1, 2, 3], now + 60_000, 5_000, MIN)
    assert (horizon, idle) == (T0 + 10 * MIN, {0, 1, 2, 3})


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(n, 1.0, 10.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_receiver_that_is_down_neither_blocks_others_nor_loses_notifications():
    delivered: dict[str, list[str]] = {"up": [], "down": []}
    down_until = time.time() + 0.6
    blocked = threading.Event()

    def up(n: Notification) -> tuple[bool, int, str]:
        delivered["up"].append(n.notification_id)
        return True, 200, ""

    def down(n: Notification) -> tuple[bool, int, str]:
        if time.time() < down_until:
            blocked.set()
            return False, 500, "HTTP 500"
        delivered["down"].append(n.notification_id)
        return True, 200, ""

    dispatcher = Dispatcher({"up": up, "down": down}, 0.05, 0.2, 3600)
    try:
        for i in range(3):
            dispatcher.submit(Notification(f"n{i}", "down", "g", "transition", {}))
            dispatcher.submit(Notification(f"n{i}", "up", "g", "transition", {}))
        deadline = time.time() + 0.4
        while len(delivered["up"]) < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert delivered["up"] == ["n0", "n1", "n2"] and delivered["down"] == [] and blocked.is_set()
        deadline = time.time() + 5
        while len(delivered["down"]) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert sorted(delivered["down"]) == ["n0", "n1", "n2"]
        rows = dispatcher.take_log()
        assert {(r.notification.notification_id, r.notification.receiver) for r in rows if r.status == "sent"} == {
            (f"n{i}", r) for i in range(3) for r in ("up", "down")}
        assert any(r.status == "failed" and r.http_status == 500 for r in rows)
    finally:
        dispatcher.stop()
