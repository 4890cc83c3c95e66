"""Journeys and person profiles (pipeline/core/journeys.py): the seeds' two cases, gaps and cases, the effort
index with literal values, profiles, and determinism under duplicates, batching and snapshots."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pipeline.core.identity import Forget
from pipeline.core.journeys import (
    DEFAULT_EFFORT_WEIGHTS,
    JOURNEY_COLUMNS,
    PROFILE_COLUMNS,
    JourneyConfig,
    JourneyRow,
    PartitionJourneys,
    ProfileRow,
    effort_index,
    nps_status,
)
from pipeline.core.processor import TouchpointProcessor
from tests.factories import (
    BASE_MS,
    contact,
    csat,
    encode,
    identity_config,
    schema_for,
    survey,
    task,
    touchpoint,
    window_config,
)

MINUTE = 60_000
HOUR = 60 * MINUTE
CONFIG = JourneyConfig(gap_ms=30 * MINUTE, case_gap_ms=2 * HOUR)


def close_all(journeys: PartitionJourneys, horizon: int) -> tuple[list[JourneyRow], dict[Any, ProfileRow]]:
    """What closed by the time the watermark reaches horizon (pane length MINUTE, no lateness)."""
    journeys.advance(horizon)
    return journeys.drain()


def bank_case(person: str = "p-bank", t0: int = BASE_MS, prefix: str = "b") -> list[dict[str, Any]]:
    """The app fails, then a call solves it, then a survey about the call."""
    who = {"person_id": person, "tenant": "bank", "role": "customer"}
    return [
        touchpoint(f"{prefix}1", t0, channel="MOBILE_APP", event_type="screen_view", **who),
        task("FAILURE", event_id=f"{prefix}2", event_time=t0 + 10_000, channel="MOBILE_APP", rage_clicks=4, **who),
        task("FAILURE", event_id=f"{prefix}3", event_time=t0 + 20_000, channel="MOBILE_APP", **who),
        contact(event_id=f"{prefix}4", event_time=t0 + 5 * MINUTE, queue_ms=60_000, resolved=True,
                journey_id=f"{prefix}-case", outcome="SUCCESS", **who),
        csat(5, event_id=f"{prefix}5", event_time=t0 + 12 * MINUTE, about="CONTACT_CENTRE",
             journey_id=f"{prefix}-case", **who),
    ]


def hospital_case(t0: int = BASE_MS) -> list[dict[str, Any]]:
    """A booking that works, a reminder, a visit that goes badly, a poor CSAT."""
    who = {"person_id": "p-hosp", "tenant": "hospital", "role": "user"}
    return [
        touchpoint("h1", t0, channel="WEB", event_type="page_view", **who),
        touchpoint("h2", t0 + 20_000, channel="WEB", event_type="page_view", **who),
        task("SUCCESS", event_id="h3", event_time=t0 + MINUTE, flow="book_appointment", **who),
        touchpoint("h4", t0 + 10 * MINUTE, channel="EMAIL", event_type="email_open", journey_id="bk-1", **who),
        touchpoint("h5", t0 + 20 * MINUTE, channel="STORE", event_type="visit", outcome="FAILURE",
                   journey_id="bk-1", **who),
        csat(1, event_id="h6", event_time=t0 + 25 * MINUTE, channel="EMAIL", about="STORE", journey_id="bk-1",
             **who),
    ]


def test_effort_index_has_literal_values():
    assert effort_index({}) == 0.0
    assert effort_index({c: 99.0 for c in DEFAULT_EFFORT_WEIGHTS}) == 100.0
    # 15 x 1/3 + 15 x 1/3 + 15 x 1/30 + 15 x 2/5 + 5 x 1/3 = 18.1667 of 100
    assert effort_index({"switches": 1, "contacts": 1, "wait_minutes": 1, "failures": 2, "rage": 1}) == 18.2
    assert effort_index({"unresolved": 1, "repeat_contacts": 1}) == 22.5  # 15 + 15 x 1/2
    assert effort_index({"switches": 3}, {"switches": 1, "failures": 1}) == 50.0  # weights from settings


def test_nps_status_follows_the_nps_indicator():
    assert [nps_status(s, 10) for s in (0, 6, 7, 8, 9, 10)] == [
        "detractor", "detractor", "passive", "passive", "promoter", "promoter"]


def test_the_bank_case_is_one_journey_with_a_switch_a_contact_and_a_resolution():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    for event in bank_case():
        journeys.add(event)
    assert close_all(journeys, BASE_MS + 12 * MINUTE + 2 * HOUR - 1) == ([], {})  # the case may go on
    rows, profiles = close_all(journeys, BASE_MS + 12 * MINUTE + 2 * HOUR)
    [row] = rows
    assert len(row) == len(JOURNEY_COLUMNS)
    assert (row.journey_key, row.start_ms, row.end_ms) == ("b1", BASE_MS, BASE_MS + 12 * MINUTE)
    assert row.channels == ["MOBILE_APP", "CONTACT_CENTRE", "SURVEY"] and row.journey_ids == ["b-case"]
    assert (row.channel_switches, row.contacts, row.repeat_contacts, row.resolved) == (1, 1, 0, 1)
    assert (row.wait_ms, row.failures, row.product_failures, row.service_failures) == (60_000, 2, 2, 0)
    assert (row.intermittent, row.rage_touchpoints, row.ux_score, row.cx_score) == (0, 1, 0.0, 100.0)
    assert (row.survey_kinds, row.survey_scores) == (["CSAT"], [5])
    assert row.effort == 18.2  # the literal of test_effort_index_has_literal_values
    assert list(profiles) == [("bank", "p-bank")] and len(journeys) == 0


def test_the_hospital_case_is_one_journey_with_clean_ux_and_bad_cx():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    for event in hospital_case():
        journeys.add(event)
    [row], _ = close_all(journeys, BASE_MS + 25 * MINUTE + 2 * HOUR)
    assert row.channels == ["WEB", "EMAIL", "STORE", "EMAIL"] and row.touchpoints == 6
    assert (row.product_failures, row.ux_score) == (0, 100.0)  # the booking site worked
    assert (row.service_failures, row.cx_score, row.resolved) == (1, 0.0, None)  # the visit did not
    assert row.effort == 18.0  # 15 x 3/3 switches + 15 x 1/5 failures


def test_without_a_shared_journey_id_the_inactivity_gap_cuts_journeys():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    who = {"person_id": "p", "tenant": "t"}
    journeys.add(touchpoint("a", BASE_MS, **who))
    journeys.add(touchpoint("b", BASE_MS + 29 * MINUTE, channel="EMAIL", event_type="email_open", **who))
    journeys.add(touchpoint("c", BASE_MS + 60 * MINUTE, **who))  # 31 minutes after b
    journeys.add(touchpoint("d", BASE_MS + 61 * MINUTE, person_id="q", tenant="t"))  # someone else
    rows, _ = close_all(journeys, BASE_MS + 4 * HOUR)
    assert sorted((r.person_id, r.journey_key, r.touchpoints, r.channel_switches) for r in rows) == [
        ("p", "a", 2, 1), ("p", "c", 1, 0), ("q", "d", 1, 0)]


def test_a_shared_journey_id_joins_touchpoints_beyond_the_gap():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    who = {"person_id": "p", "tenant": "t"}
    journeys.add(touchpoint("a", BASE_MS, journey_id="order-1", **who))
    journeys.add(touchpoint("b", BASE_MS + 90 * MINUTE, channel="STORE", event_type="visit", journey_id="order-1",
                            outcome="SUCCESS", **who))
    journeys.add(touchpoint("c", BASE_MS + 100 * MINUTE, **who))  # within the gap of b: same journey
    rows, _ = close_all(journeys, BASE_MS + 100 * MINUTE + 2 * HOUR)
    assert [(r.journey_key, r.touchpoints, r.channels) for r in rows] == [("a", 3, ["WEB", "STORE", "WEB"])]


def test_profiles_keep_role_path_preferences_last_touch_pre_and_post_purchase_and_nps():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    who = {"person_id": "p", "tenant": "shop"}
    day = 24 * HOUR
    t1 = BASE_MS + 9 * HOUR  # 09:00 UTC
    journeys.add(task("FAILURE", event_id="a1", event_time=t1, role="user", **who))
    journeys.add(task("SUCCESS", event_id="a2", event_time=t1 + MINUTE, role="user", **who))
    journeys.add(touchpoint("a3", t1 + 2 * MINUTE, event_type="page_view", role="user",
                            attributes={"results": "0", "query": "red boots"}, **who))
    journeys.add(contact(event_id="a4", event_time=t1 + 3 * MINUTE, channel="CHATBOT", role="user", queue_ms=0,
                         **who))
    journeys.add(touchpoint("a5", t1 + 4 * MINUTE, channel="BILLING", event_type="purchase", role="customer",
                            customer_since_ms=t1 + 4 * MINUTE, **who))
    t2 = BASE_MS + day + 18 * HOUR  # the next day, 18:00 UTC
    journeys.add(contact(event_id="b1", event_time=t2, role="customer", customer_since_ms=t1 + 4 * MINUTE,
                         resolved=False, **who))
    journeys.add(contact(event_id="b2", event_time=t2 + MINUTE, role="customer", customer_since_ms=t1 + 4 * MINUTE,
                         resolved=False, **who))
    journeys.add(survey("NPS", 3, event_id="b3", event_time=t2 + 2 * MINUTE, role="customer",
                        customer_since_ms=t1 + 4 * MINUTE, **who))
    journeys.add(survey("NPS", 9, event_id="b0", event_time=t2 - MINUTE, role="customer",
                        customer_since_ms=t1 + 4 * MINUTE, **who))  # answered earlier, arrived later
    rows, first = close_all(journeys, t1 + 4 * MINUTE + 30 * MINUTE)
    assert [r.purchases for r in rows] == [1] and first[("shop", "p")].pre_purchase_ux == 50.0
    rows, profiles = close_all(journeys, t2 + 3 * HOUR)
    profile = profiles[("shop", "p")]
    assert len(profile) == len(PROFILE_COLUMNS)
    assert (profile.journeys, profile.role, profile.role_path) == (2, "customer", ["user", "customer"])
    assert profile.role_since_ms == [t1, t1 + 4 * MINUTE]
    # contacts started: CHATBOT 09:00, CONTACT_CENTRE x2 18:00; surveys answered: SURVEY x2 18:00
    assert (profile.contact_channel, profile.contact_channel_n, profile.contact_n) == ("CONTACT_CENTRE", 2, 5)
    assert (profile.contact_hour, profile.contact_hour_n) == (18, 3)  # the early NPS was at 17:59
    assert (profile.pre_purchase_ux, profile.pre_purchase_ux_n, profile.pre_purchase_cx_n) == (50.0, 1, 0)
    assert (profile.post_purchase_cx, profile.post_purchase_cx_n) == (60.0, 1)  # (30 + 90) / 2
    assert (profile.nps_score, profile.nps_status, profile.nps_at_ms) == (3, "detractor", t2 + 2 * MINUTE)
    assert (profile.last_touch_ms, profile.last_touch_channel, profile.last_touch_ok) == (t2 + 2 * MINUTE,
                                                                                         "SURVEY", 0)
    assert profile.no_result_searches == ["red boots"] and profile.updated_ms == t2 + 2 * MINUTE
    [second] = rows
    assert (second.contacts, second.repeat_contacts, second.resolved, second.nps_status) == (2, 1, 0, "detractor")


def test_forget_drops_open_journeys_and_profiles():
    journeys = PartitionJourneys(0, CONFIG, MINUTE, 0)
    for event in bank_case():
        journeys.add(event)
    close_all(journeys, BASE_MS + 3 * HOUR)
    for event in bank_case(t0=BASE_MS + 4 * HOUR, prefix="c"):
        journeys.add(event)
    journeys.forget(["p-bank"])
    assert len(journeys) == 0 and journeys.profiles == {} and journeys.cases == {}


# --- through the processor: duplicates, batching, snapshots ---------------------------------------------------


class Record:
    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self.partition, self.offset, self.value, self.key, self.headers = partition, offset, value, None, ()


def processor() -> TouchpointProcessor:
    return TouchpointProcessor(window_config(MINUTE, 10_000, 10 * 24 * HOUR, 1_000), schema_for, identity_config(),
                               journeys=JourneyConfig(gap_ms=30 * MINUTE, case_gap_ms=HOUR))


def persons_stream(seed: int, count: int = 400) -> list[dict[str, Any]]:
    """Bank-like traffic of a few persons: app tasks, calls with cases, surveys, pauses that end journeys."""
    rng = random.Random(seed)
    events, clock = [], BASE_MS
    for i in range(count):
        clock += rng.choice((1_000, 5_000, 30_000, 30_000, 40 * MINUTE))
        person = f"c{rng.randint(0, 5)}"
        ids = {"customer_id": person, "user_id": f"u{person}", "anonymous_id": None, "tenant": "bank"}
        kind = rng.randint(0, 3)
        if kind == 0:
            events.append(task(rng.choice(("SUCCESS", "FAILURE")), event_id=f"e{i}", event_time=clock,
                               channel="MOBILE_APP", rage_clicks=rng.randint(0, 5), **ids))
        elif kind == 1:
            events.append(contact(event_id=f"e{i}", event_time=clock, journey_id=f"case-{person}-{i // 50}",
                                  resolved=rng.random() < 0.8, **ids))
        elif kind == 2:
            events.append(survey("NPS", rng.randint(0, 10), event_id=f"e{i}", event_time=clock, **ids))
        else:
            events.append(touchpoint(f"e{i}", clock, event_type="page_view", **ids))
    return events


def run(events: list[dict[str, Any]], batches: list[int], *, snapshot_at: int | None = None) -> tuple[Any, Any]:
    """Journey rows and final profiles of a run; with snapshot_at, the journey state goes through JSON after that
    batch into a new processor (the open windows are rebuilt as a replay would)."""
    proc = processor()
    proc.assign(0, None, now_ms=BASE_MS)
    rows, profiles = [], {}
    records = [Record(0, n, encode(e, 2)) for n, e in enumerate(events)]
    start = 0
    for number, size in enumerate(batches):
        proc.process(0, records[start:start + size], now_ms=events[-1]["event_time"])
        start += size
        out = proc.take_output()
        rows += out.journeys
        profiles.update(out.profiles)
        if number == snapshot_at:
            state = json.loads(json.dumps(proc.journeys[0].state()))
            windows, enricher = proc.partitions[0], proc.enricher
            proc = processor()
            proc.enricher = enricher  # the identity graph is the identity log's business
            proc.assign(0, None, now_ms=BASE_MS)
            proc.partitions[0] = windows  # the windows' own snapshot is aggregate's business
            proc.journeys[0].restore(state)
    proc.tick(events[-1]["event_time"] + 10 * 24 * HOUR, caught_up={0})  # idle long enough: all close
    out = proc.take_output()
    rows += out.journeys
    profiles.update(out.profiles)
    return sorted(rows), dict(sorted(profiles.items()))


def test_journeys_are_the_same_whatever_the_batches_duplicates_and_snapshots():
    events = persons_stream(7)
    whole = run(events, [len(events)])
    assert len(whole[0]) > 20 and len(whole[1]) == 6
    assert sum(r.touchpoints for r in whole[0]) == len(events)
    for r in whole[0]:  # the closing path's unrolled formula is the registry's effort_index
        assert r.effort == effort_index({
            "switches": r.channel_switches, "contacts": r.contacts, "repeat_contacts": r.repeat_contacts,
            "wait_minutes": r.wait_ms / 60_000, "failures": r.failures, "intermittent": r.intermittent,
            "rage": r.rage_touchpoints, "unresolved": float(r.resolved == 0)})
    rng = random.Random(3)
    batches = []
    left = len(events)
    while left:
        batches.append(min(left, rng.randint(1, 40)))
        left -= batches[-1]
    assert run(events, batches) == whole
    assert run(events, batches, snapshot_at=len(batches) // 2) == whole
    copies = events[:]
    for i in sorted(rng.sample(range(len(events)), 40), reverse=True):
        copies.insert(i + 1, dict(events[i]))  # redelivered right after the first copy
    assert run(copies, [len(copies)]) == whole


def test_processor_without_journeys_emits_none_and_forget_reaches_the_profiles():
    plain = TouchpointProcessor(window_config(MINUTE, 0, 10 * 24 * HOUR, 1_000), schema_for, identity_config())
    plain.assign(0, None, now_ms=BASE_MS)
    plain.process(0, [Record(0, 0, encode(task("SUCCESS"), 2))], now_ms=BASE_MS)
    assert plain.journeys == {} and plain.take_output().journeys == []
    with_journeys = processor()
    with_journeys.assign(0, None, now_ms=BASE_MS)
    events = persons_stream(1, 60)
    with_journeys.process(0, [Record(0, n, encode(e, 2)) for n, e in enumerate(events)], now_ms=BASE_MS)
    person = with_journeys.take_output().touchpoints[0].person_id
    assert any(k[1] == person for k in with_journeys.journeys[0].open) or any(
        k[1] == person for k in with_journeys.journeys[0].profiles)
    with_journeys.apply_identity([Forget("customer_id:" + events[0]["identifiers"]["customer_id"], BASE_MS)])
    assert not any(k[1] == person for k in [*with_journeys.journeys[0].open, *with_journeys.journeys[0].profiles])


@pytest.mark.parametrize("weights", [{"switches": 0}, {}])
def test_effort_without_weights_is_zero(weights):
    assert effort_index({"switches": 3}, weights) == 0.0


def run_with_restarts(events: list[dict[str, Any]], batches: list[int], restart_after: set[int]) -> tuple[Any, Any]:
    """Journey rows and final profiles when the worker stops after some batches and a new one continues from the
    checkpoint with state it wrote (the snapshot of windows, journeys and profiles), as bounded-restart does."""
    def new() -> TouchpointProcessor:
        return TouchpointProcessor(window_config(MINUTE, 10_000, 10 * 24 * HOUR, 1_000), schema_for, identity_config(),
                                   snapshot_interval_ms=60_000,
                                   journeys=JourneyConfig(gap_ms=30 * MINUTE, case_gap_ms=HOUR))

    now = events[-1]["event_time"]
    proc = new()
    proc.assign(0, None, now_ms=now)
    rows, profiles, touchpoints = [], {}, []
    records = [Record(0, n, encode(e, 2)) for n, e in enumerate(events)]
    start = 0
    for number, size in enumerate(batches):
        proc.process(0, records[start:start + size], now_ms=now)
        start += size
        out = proc.take_output(now, force_checkpoints=number in restart_after)
        rows += out.journeys
        profiles.update(out.profiles)
        touchpoints += out.touchpoints
        if number in restart_after:
            checkpoint, enricher = out.checkpoints[0], proc.enricher
            assert checkpoint.state is not None and checkpoint.commit_offset == start
            proc = new()
            proc.enricher = enricher  # the identity graph is the identity log's business
            ids = [(t.event_time_ms, t.event_id) for t in touchpoints
                   if t.counted and t.event_time_ms >= checkpoint.open_from_ms]
            assert proc.assign(0, checkpoint, now_ms=now, pane_event_ids=ids).how == "state"
            assert proc.journeys[0].open or proc.journeys[0].profiles
    proc.tick(now + 10 * 24 * HOUR, caught_up={0})
    out = proc.take_output(now + 10 * 24 * HOUR)
    rows += out.journeys
    profiles.update(out.profiles)
    return sorted(rows), dict(sorted(profiles.items()))


def test_journeys_and_profiles_survive_restarts_through_the_checkpoint_snapshot():
    events = persons_stream(11)
    batches = [37] * (len(events) // 37) + [len(events) % 37]
    whole = run(events, [len(events)])
    assert run_with_restarts(events, batches, set()) == whole
    assert run_with_restarts(events, batches, {2, 5, 9}) == whole
