"""Journeys and profiles on the real stack: a worker cuts the bank's and the hospital's journeys and writes them
to ClickHouse 18.16; the conversion and churn views recover the generated scenarios' true rates there too."""

from __future__ import annotations

import time

import pytest

from pipeline.adapters.clickhouse import ClickHouseSink
from pipeline.core.identity import person_id_of
from pipeline.core.processor import Output
from pipeline.generate.scenarios import TRUE_RATES, generate
from tests.factories import BASE_MS, touchpoint
from tests.integration.conftest import wait_until
from tests.unit.test_journey_rates import run_core, within_sampling_error

pytestmark = pytest.mark.integration


def test_a_worker_writes_the_bank_and_hospital_journeys_and_profiles(isolated, publisher, start_worker, ch):
    isolated.journeys.gap_s = isolated.journeys.case_gap_s = 2  # journeys close once the partitions idle
    worker = start_worker()
    t0 = int(time.time() * 1000) - 120_000
    bank = {"tenant": "bank", "anonymous_id": None, "user_id": "u-jb", "customer_id": "c-jb"}
    hosp = {"tenant": "hospital", "anonymous_id": None, "user_id": "u-jh"}
    publisher.publish_many([
        touchpoint("jb1", t0, channel="MOBILE_APP", event_type="screen_view", **bank),
        touchpoint("jb2", t0 + 1_000, channel="MOBILE_APP", event_type="task", outcome="FAILURE",
                   error_code="HTTP_503", **bank),
        touchpoint("jb3", t0 + 2_000, channel="CONTACT_CENTRE", event_type="contact", journey_id="case-jb",
                   outcome="SUCCESS", contact={"queue_ms": 40_000, "handle_ms": 200_000, "first_response_ms": None,
                                               "resolved": True, "escalated": False, "agent_id": "a1"}, **bank),
        touchpoint("jb4", t0 + 3_000, channel="SURVEY", event_type="survey_response", journey_id="case-jb",
                   survey={"kind": "CSAT", "score": 5, "scale_min": 1, "scale_max": 5,
                           "about_channel": "CONTACT_CENTRE"}, **bank),
        touchpoint("jh1", t0, channel="WEB", event_type="page_view", **hosp),
        touchpoint("jh2", t0 + 1_000, channel="WEB", event_type="task", outcome="SUCCESS", flow="book_appointment",
                   **hosp),
        touchpoint("jh3", t0 + 2_000, channel="STORE", event_type="visit", outcome="FAILURE", journey_id="bk-jh",
                   **hosp),
        touchpoint("jh4", t0 + 3_000, channel="EMAIL", event_type="survey_response", journey_id="bk-jh",
                   survey={"kind": "CSAT", "score": 1, "scale_min": 1, "scale_max": 5, "about_channel": "STORE"},
                   **hosp),
    ])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM journeys FINAL")[0][0] == 2
               and ch.execute("SELECT count() FROM person_profiles FINAL")[0][0] == 2, 90, "two journeys", worker)
    rows = {r[0]: r[1:] for r in ch.execute(
        "SELECT tenant, person_id, channels, channel_switches, contacts, resolved, product_failures, "
        "service_failures, ux_score, cx_score, effort FROM journeys FINAL")}
    assert rows["bank"] == (person_id_of("customer_id:c-jb"), ["MOBILE_APP", "CONTACT_CENTRE", "SURVEY"], 1, 1, 1,
                            1, 0, 0.0, 100.0, 13.3)  # 15/3 + 15/3 + 15 x (40/60)/30 + 15/5
    assert rows["hospital"] == (person_id_of("user_id:u-jh"), ["WEB", "STORE", "EMAIL"], 2, 0, None, 0, 1, 100.0,
                                0.0, 13.0)  # 15 x 2/3 + 15/5
    profiles = dict(ch.execute("SELECT tenant, contact_channel FROM person_profiles FINAL"))
    assert profiles == {"bank": "CONTACT_CENTRE", "hospital": "EMAIL"}  # the call vs the survey by email


def test_the_views_recover_the_scenarios_true_rates_on_clickhouse_18(isolated, ch):
    sink = ClickHouseSink(isolated.clickhouse, isolated.kafka.consumer_group, isolated.kafka.topic)
    for scenario in ("conversion", "churn"):
        events = list(generate(scenario, 25_000, seed=9, start_ms=BASE_MS, events_per_s=200.0, schema_version=2))
        journeys, profiles, aliases = run_core(events)
        out = Output(journeys=journeys, profiles={(p.tenant, p.person_id): p for p in profiles})
        out.identity.aliases = aliases
        sink.write(out)
    conversion = {ux: (users, converted) for ux, users, converted in ch.execute(
        "SELECT ux, sum(users), sum(converted) FROM conversion_by_ux WHERE tenant = 'shop' GROUP BY ux")}
    churn = {service: (n, churned) for service, n, churned in ch.execute(
        "SELECT service, sum(customers), sum(churned) FROM churn_by_service WHERE tenant = 'streaming' "
        "GROUP BY service")}
    assert set(conversion) == {"clean", "failures"} and set(churn) == {"good", "bad"}
    for ux, (users, converted) in conversion.items():
        assert users > 500 and within_sampling_error(converted, users, TRUE_RATES["conversion"][ux])
    for service, (customers, churned) in churn.items():
        assert customers > 500 and within_sampling_error(churned, customers, TRUE_RATES["churn"][service])


def test_a_journey_open_at_a_restart_goes_on_in_the_next_worker(isolated, publisher, start_worker, ch):
    """The journey travels in the checkpoint's snapshot: the second worker continues it, it is not cut in two."""
    isolated.journeys.gap_s = isolated.journeys.case_gap_s = 20
    t0 = int(time.time() * 1000) - 60_000
    bank = {"tenant": "bank", "anonymous_id": None, "user_id": "u-jr", "customer_id": "c-jr"}
    first = start_worker(isolated)
    publisher.publish_many([
        touchpoint("jr1", t0, channel="MOBILE_APP", event_type="screen_view", **bank),
        touchpoint("jr2", t0 + 1_000, channel="MOBILE_APP", event_type="task", outcome="FAILURE", **bank),
    ])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 2, 60, "the app touchpoints", first)
    assert first.stop() == 0
    assert ch.execute("SELECT count() FROM journeys")[0][0] == 0  # still open: it was in the snapshot
    second = start_worker(isolated)
    publisher.publish_many([
        touchpoint("jr3", t0 + 2_000, channel="CONTACT_CENTRE", event_type="contact", journey_id="case-jr",
                   outcome="SUCCESS", contact={"queue_ms": 10_000, "handle_ms": 100_000, "first_response_ms": None,
                                               "resolved": True, "escalated": False, "agent_id": "a1"}, **bank),
    ])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM journeys FINAL")[0][0] >= 1, 120, "the journey", second)
    assert ch.execute("SELECT journey_key, touchpoints, channels, channel_switches FROM journeys FINAL") == [
        ("jr1", 3, ["MOBILE_APP", "CONTACT_CENTRE"], 1)]
