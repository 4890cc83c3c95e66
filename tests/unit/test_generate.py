import itertools
import uuid
from collections import defaultdict
from functools import cache

import fastavro
import fastavro.validation
import pytest

from pipeline.contract.registry import contract_schemas
from pipeline.core.indicators import BY_ID, observation
from pipeline.generate.scenarios import SCENARIOS, generate
from tests.factories import BASE_MS

SCHEMAS = {1: fastavro.parse_schema(contract_schemas()[0]), 2: fastavro.parse_schema(contract_schemas()[1])}
CHANNELS = {"WEB", "MOBILE_APP", "CONTACT_CENTRE", "CHATBOT", "EMAIL", "SOCIAL", "HELPDESK", "SURVEY", "STORE",
            "BILLING"}
V2_FIELDS = ("sentiment", "app_version", "rage_clicks")


@cache
def _events(scenario: str, n: int, seed: int, version: int, rate: float) -> tuple[dict, ...]:
    return tuple(generate(scenario, n, seed=seed, start_ms=BASE_MS, events_per_s=rate, schema_version=version))


def events(scenario: str, n: int = 6_000, seed: int = 3, version: int = 1, rate: float = 500.0) -> list[dict]:
    return list(_events(scenario, n, seed, version, rate))


def persons(batch: list[dict]) -> dict[str, list[dict]]:
    """The simulated persons, rebuilt by linking the identifiers that appear together on an event."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for e in batch:
        keys = [f"{kind}:{value}" for kind, value in e["identifiers"].items() if value is not None]
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    grouped: dict[str, list[dict]] = defaultdict(list)
    for e in batch:
        kind, value = next((k, v) for k, v in e["identifiers"].items() if v is not None)
        grouped[root(f"{kind}:{value}")].append(e)
    return grouped


def _share(batch, keep, hit) -> float:
    chosen = [e for e in batch if keep(e)]
    assert chosen, "nothing to measure"
    return sum(1 for e in chosen if hit(e)) / len(chosen)


def _mean(values: list[float]) -> float:
    assert values, "nothing to average"
    return sum(values) / len(values)


def _indicator(batch, indicator: str, tenant: str, channel: str) -> tuple[float, float]:
    """(value, denominator) of an indicator over the batch, as the pipeline computes it."""
    num = den = 0.0
    for e in batch:
        seen = observation(BY_ID[indicator], e) if e["tenant"] == tenant else None
        if seen is not None and seen[0] == channel:
            num, den = num + seen[1], den + 1.0
    return num / den, den


# --- the contract -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("version", [1, 2])
def test_every_event_matches_the_contract(scenario, version):
    batch = events(scenario, 3_000, version=version)
    for event in batch:
        fastavro.validation.validate(event, SCHEMAS[version], raise_errors=True)
        assert any(event["identifiers"].values())
        survey = event["survey"]
        assert survey is None or survey["scale_min"] <= survey["score"] <= survey["scale_max"]
    field_names = {f["name"] for f in SCHEMAS[version]["fields"]}
    assert all(set(e) == field_names for e in batch)  # every field present, nothing extra
    if version == 2:
        for field in V2_FIELDS:
            assert any(e[field] is not None for e in batch), f"{field} never filled"
        assert all(-1 <= e["sentiment"] <= 1 for e in batch if e["sentiment"] is not None)


def test_v1_and_v2_differ_only_in_the_v2_fields():
    v1, v2 = events("mixed", 2_000, version=1), events("mixed", 2_000, version=2)
    assert [{k: v for k, v in e.items() if k not in V2_FIELDS} for e in v2] == v1


def test_scenarios_have_descriptions():
    assert {"banking_app", "hospital_booking", "mixed"} <= set(SCENARIOS)
    assert all(isinstance(text, str) and text for text in SCENARIOS.values())


# --- count, ids, determinism, time ------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("n", [0, 1, 7, 2_345])
def test_count_is_exact(scenario, n):
    assert sum(1 for _ in generate(scenario, n, seed=9, start_ms=BASE_MS)) == n


def test_deterministic_for_a_seed_and_different_across_seeds():
    first = list(generate("mixed", 3_000, seed=11, start_ms=BASE_MS))
    assert first == list(generate("mixed", 3_000, seed=11, start_ms=BASE_MS))
    other = list(generate("mixed", 3_000, seed=12, start_ms=BASE_MS))
    assert {e["event_id"] for e in first}.isdisjoint(e["event_id"] for e in other)


def test_event_ids_are_unique_uuid4s():
    batch = events("mixed", 20_000)
    assert len({e["event_id"] for e in batch}) == len(batch)
    assert all(uuid.UUID(e["event_id"]).version == 4 for e in batch[:500])


def test_persons_do_not_collide_across_seeds():
    """Runs with different seeds publish side by side (the demo does): their persons must stay apart."""
    ids_of = lambda batch: {v for e in batch for v in e["identifiers"].values() if v}  # noqa: E731
    assert ids_of(events("mixed", 4_000, seed=1)).isdisjoint(ids_of(events("mixed", 4_000, seed=2)))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_persons_events_are_strictly_in_time_order(scenario):
    grouped = persons(events(scenario))
    assert len(grouped) > 200
    for person_events in grouped.values():
        times = [e["event_time"] for e in person_events]
        assert all(a < b for a, b in itertools.pairwise(times))
        # One simulated person: never two different ids of one kind linked together.
        for kind in ("anonymous_id", "user_id", "customer_id"):
            assert len({e["identifiers"][kind] for e in person_events} - {None}) <= 1


@pytest.mark.parametrize("rate", [50.0, 500.0, 2_000.0, 20_000.0])
def test_event_times_follow_the_rate_mostly_in_order(rate):
    n = 10_000
    times = [e["event_time"] for e in events("mixed", n, rate=rate)]
    assert times[0] == BASE_MS and min(times) >= BASE_MS
    expected_span = n * 1000 / rate
    assert abs((max(times) - BASE_MS) - expected_span) <= 0.05 * expected_span + 1_000
    # Mostly increasing; at tens of events per millisecond a person's second event in one ms moves 1 ms on.
    backwards = sum(1 for a, b in itertools.pairwise(times) if b < a - 1)
    assert backwards <= 0.05 * n
    assert max(a - b for a, b in itertools.pairwise(times)) <= 1_000  # and never far out of order


def test_tenant_override_and_scenario_defaults():
    assert {e["tenant"] for e in events("banking_app", 500)} == {"bank"}
    assert {e["tenant"] for e in events("hospital_booking", 500)} == {"hospital"}
    assert {e["tenant"] for e in generate("mixed", 500, start_ms=BASE_MS, tenant="acme")} == {"acme"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown scenario"):
        next(generate("nope", 1, start_ms=BASE_MS))
    with pytest.raises(ValueError, match="schema_version"):
        next(generate("mixed", 1, start_ms=BASE_MS, schema_version=4))
    with pytest.raises(ValueError, match="events_per_s"):
        next(generate("mixed", 1, start_ms=BASE_MS, events_per_s=0))


def test_roles_progress_from_visitor_to_user_to_customer():
    batch = events("mixed", 10_000)
    identify = [e for e in batch if e["event_type"] == "identify"]
    assert identify and all(e["identifiers"]["anonymous_id"] and e["identifiers"]["user_id"] for e in identify)
    promoted = 0
    for person_events in persons(batch).values():
        roles = [2 if e["identifiers"]["customer_id"] else 1 if e["identifiers"]["user_id"] else 0
                 for e in person_events]
        assert roles == sorted(roles)  # identifiers are only ever gained: visitor, then user, then customer
        promoted += roles[0] == 0 and roles[-1] == 2
    assert promoted > 20
    purchases = [e for e in batch if e["event_type"] == "purchase"]
    assert purchases and all(e["identifiers"]["customer_id"] and e["amount"]["minor_units"] > 0 for e in purchases)


# --- banking_app: bad UX, good CX ------------------------------------------------------------------------------


def test_banking_app_fails_intermittently():
    batch = events("banking_app")
    app_task = lambda e: e["channel"] == "MOBILE_APP" and e["event_type"] == "task"  # noqa: E731
    failed = lambda e: e["outcome"] == "FAILURE"  # noqa: E731
    assert 0.2 <= _share(batch, app_task, failed) <= 0.4
    assert {e["flow"] for e in batch if app_task(e)} >= {"login", "transfer"}
    assert all(e["error_code"] for e in batch if app_task(e) and failed(e))
    assert all(e["error_code"] is None for e in batch if app_task(e) and not failed(e))
    assert {e["error_code"] for e in batch if app_task(e)} >= {"HTTP_503", "TIMEOUT"}
    assert any(e["event_type"] == "app_error" and e["error_code"] for e in batch)
    sessions: dict[str, list[str]] = defaultdict(list)
    for e in batch:
        if app_task(e):
            sessions[e["session_id"]].append(e["outcome"])
    mixed_sessions = [o for o in sessions.values() if "FAILURE" in o and "SUCCESS" in o]
    assert len(mixed_sessions) >= 0.2 * len(sessions)
    pairs = lambda o: set(itertools.pairwise(o))  # noqa: E731
    assert sum(("FAILURE", "SUCCESS") in pairs(o) for o in mixed_sessions) > 50  # a retry worked
    assert sum(("SUCCESS", "FAILURE") in pairs(o) for o in mixed_sessions) > 20  # then it failed again
    value, denominator = _indicator(batch, "error_rate", "bank", "MOBILE_APP")
    assert denominator > 1_000 and value > 0.15  # above the default ux_error_rate_high threshold


def test_banking_app_sessions_start_with_a_login():
    sessions: dict[str, list[dict]] = defaultdict(list)
    for e in events("banking_app"):
        if e["channel"] == "MOBILE_APP":
            sessions[e["session_id"]].append(e)
    for session in sessions.values():
        tasks = [e for e in session if e["event_type"] == "task"]
        logins = [i for i, e in enumerate(tasks) if e["flow"] == "login" and e["outcome"] == "SUCCESS"]
        before_login = tasks[:logins[0]] if logins else tasks
        assert all(e["flow"] == "login" for e in before_login)  # nothing else works until a login has
        # A first session is anonymous until a login attempt names the account (a retry after a call is not).
        if session[0]["event_type"] == "screen_view":
            assert session[0]["identifiers"]["user_id"] is None
        if logins:
            assert all(e["identifiers"]["customer_id"] for e in tasks[logins[0]:])


def test_banking_contact_centre_is_kind_and_effective():
    batch = events("banking_app")
    calls = [e for e in batch if e["channel"] == "CONTACT_CENTRE" and e["event_type"] == "contact"]
    assert len(calls) > 50
    assert _mean([float(e["contact"]["resolved"]) for e in calls]) >= 0.85
    assert _mean([e["contact"]["queue_ms"] for e in calls]) < 120_000
    assert all(e["contact"]["handle_ms"] > 0 and e["contact"]["agent_id"] for e in calls)
    assert all(e["duration_ms"] == e["contact"]["queue_ms"] + e["contact"]["handle_ms"] for e in calls)
    assert all(e["identifiers"]["customer_id"] for e in calls)  # the agent knows the caller from the CRM
    csat = [e["survey"]["score"] for e in batch if e["event_type"] == "survey_response"
            and e["survey"]["kind"] == "CSAT" and e["survey"]["about_channel"] == "CONTACT_CENTRE"]
    assert len(csat) > 30 and _mean(csat) >= 4
    assert any(e["survey"] and e["survey"]["kind"] == "NPS" for e in batch)
    value, _ = _indicator(batch, "csat", "bank", "CONTACT_CENTRE")
    assert value > 0.6  # no cx_csat_low alert for the bank's contact centre


def test_banking_calls_follow_app_trouble():
    for person_events in persons(events("banking_app")).values():
        channels = [e["channel"] for e in person_events]
        if "CONTACT_CENTRE" in channels:
            before = person_events[:channels.index("CONTACT_CENTRE")]
            assert any(e["channel"] == "MOBILE_APP" for e in before)


# --- hospital_booking: good UX, bad CX --------------------------------------------------------------------------


def test_hospital_booking_site_works_well():
    batch = events("hospital_booking")
    web_task = lambda e: e["channel"] == "WEB" and e["event_type"] == "task"  # noqa: E731
    assert _share(batch, web_task, lambda e: e["outcome"] == "SUCCESS") >= 0.9
    assert {e["flow"] for e in batch if web_task(e)} == {"book_appointment"}
    assert _mean([e["duration_ms"] for e in batch if web_task(e)]) < 90_000
    lcp = [e["web_vitals"]["lcp_ms"] for e in batch if e["event_type"] == "page_view"]
    assert len(lcp) > 500 and all(1_200 <= v <= 2_000 for v in lcp)
    value, denominator = _indicator(batch, "error_rate", "hospital", "WEB")
    assert denominator > 500 and value < 0.05


def test_hospital_visit_disappoints():
    batch = events("hospital_booking")
    visits = [e for e in batch if e["channel"] == "STORE" and e["event_type"] == "visit"]
    assert len(visits) > 100
    assert 0.05 <= _share(visits, bool, lambda e: e["error_code"] == "appointment_not_found") <= 0.4
    assert _mean([e["duration_ms"] for e in visits]) > 3_600_000  # long waits
    assert all(int(e["attributes"]["wait_minutes"]) > 30 for e in visits)
    csat = [e["survey"]["score"] for e in batch if e["survey"] and e["survey"]["about_channel"] == "STORE"]
    assert len(csat) > 50 and _mean(csat) <= 3
    value, _ = _indicator(batch, "csat", "hospital", "STORE")
    assert value < 0.6  # the default cx_csat_low alert fires
    assert any(e["channel"] == "HELPDESK" and e["event_type"] == "ticket_opened" and e["contact"] for e in batch)


def test_hospital_visitors_sign_in_to_book():
    for person_events in persons(events("hospital_booking")).values():
        first, types = person_events[0], [e["event_type"] for e in person_events]
        assert first["identifiers"]["user_id"] is None  # arrives as an anonymous visitor
        if "task" in types:
            assert "identify" in types[:types.index("task")]
            assert all(e["identifiers"]["user_id"] for e in person_events[types.index("identify"):])


# --- mixed ------------------------------------------------------------------------------------------------------


def test_mixed_covers_every_channel_tenant_and_healthy_background():
    batch = events("mixed", 10_000)
    assert {e["channel"] for e in batch} == CHANNELS
    assert {e["tenant"] for e in batch} == {"bank", "hospital", "shop"}
    for tenant in ("bank", "hospital", "shop"):
        assert len({e["channel"] for e in batch if e["tenant"] == tenant}) >= 6
    assert {"purchase", "contact", "survey_response", "ticket_opened", "page_view", "screen_view", "task",
            "identify", "visit"} <= {e["event_type"] for e in batch}
    assert any(e["survey"] and e["survey"]["kind"] == "NPS" and e["channel"] == "SURVEY" for e in batch)
    shop = [e for e in batch if e["tenant"] == "shop"]
    assert _share(shop, lambda e: e["event_type"] == "task", lambda e: e["outcome"] == "SUCCESS") >= 0.9
    shop_csat = [e["survey"]["score"] for e in shop if e["survey"] and e["survey"]["kind"] == "CSAT"]
    assert _mean(shop_csat) >= 4
    # The scenario signals survive the background traffic.
    assert _indicator(batch, "error_rate", "bank", "MOBILE_APP")[0] > 0.15
    assert _indicator(batch, "csat", "hospital", "STORE")[0] < 0.6
