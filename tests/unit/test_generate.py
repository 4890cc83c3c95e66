from collections import defaultdict

import fastavro
import pytest

from pipeline.contract.registry import contract_schemas
from pipeline.generate.scenarios import SCENARIOS, generate
from tests.factories import BASE_MS

SCHEMAS = {1: fastavro.parse_schema(contract_schemas()[0]), 2: fastavro.parse_schema(contract_schemas()[1])}


def events(scenario: str, n: int = 4_000, seed: int = 3, version: int = 1) -> list[dict]:
    return list(generate(scenario, n, seed=seed, start_ms=BASE_MS, events_per_s=500, schema_version=version))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("version", [1, 2])
def test_every_event_matches_the_contract(scenario, version):
    batch = events(scenario, 1_500, version=version)
    assert len(batch) == 1_500
    for event in batch:
        fastavro.validation.validate(event, SCHEMAS[version], raise_errors=True)
    assert ("sentiment" in batch[0]) == (version == 2)


def test_deterministic_unique_and_ordered_per_person():
    first, again = events("mixed"), events("mixed")
    assert first == again and events("mixed", seed=4) != first
    assert len({e["event_id"] for e in first}) == len(first)
    times = [e["event_time"] for e in first]
    assert times == sorted(times) and BASE_MS <= times[0]
    span_s = (times[-1] - times[0]) / 1000
    assert 6 < span_s < 10  # 4000 events at 500/s


def _share(batch, keep, hit) -> float:
    chosen = [e for e in batch if keep(e)]
    return sum(1 for e in chosen if hit(e)) / len(chosen)


def test_banking_app_fails_intermittently_and_the_contact_centre_satisfies():
    batch = events("banking_app")
    app_tasks = lambda e: e["channel"] == "MOBILE_APP" and e["event_type"] == "task"  # noqa: E731
    assert 0.2 <= _share(batch, app_tasks, lambda e: e["outcome"] == "FAILURE") <= 0.4
    sessions = defaultdict(list)
    for e in batch:
        if app_tasks(e):
            sessions[e["session_id"]].append(e["outcome"])
    assert any("FAILURE" in o and o[-1] == "SUCCESS" for o in sessions.values())  # a retry worked
    scores = [e["survey"]["score"] for e in batch
              if e["survey"] and e["survey"]["kind"] == "CSAT" and e["survey"]["about_channel"] == "CONTACT_CENTRE"]
    assert len(scores) > 20 and sum(scores) / len(scores) >= 4


def test_hospital_booking_works_on_the_web_and_disappoints_in_person():
    batch = events("hospital_booking")
    web_tasks = lambda e: e["channel"] == "WEB" and e["event_type"] == "task"  # noqa: E731
    assert _share(batch, web_tasks, lambda e: e["outcome"] == "SUCCESS") >= 0.9
    scores = [e["survey"]["score"] for e in batch if e["survey"] and e["survey"]["about_channel"] == "STORE"]
    assert len(scores) > 20 and sum(scores) / len(scores) <= 3
    assert any(e["event_type"] == "identify" and e["identifiers"]["user_id"] and e["identifiers"]["anonymous_id"]
               for e in batch)


def test_mixed_covers_every_channel_and_tenant():
    batch = events("mixed", 8_000)
    assert {e["channel"] for e in batch} == set(SCHEMAS[1]["fields"][2]["type"]["symbols"])
    assert {e["tenant"] for e in batch} == {"bank", "hospital", "shop"}


def test_unknown_scenario_is_refused():
    with pytest.raises(ValueError, match="unknown scenario"):
        next(generate("nope", 1, start_ms=BASE_MS))
