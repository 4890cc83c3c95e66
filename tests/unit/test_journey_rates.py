"""The product recovers the true rates of the conversion and churn scenarios: generated traffic through the core
(journeys, identity) into the ClickHouse views on chdb's embedded engine (the same views run on 18.16 in
tests/integration/test_journeys.py)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from pipeline.adapters.clickhouse import load_migrations
from pipeline.core.journeys import JOURNEY_COLUMNS, PROFILE_COLUMNS, JourneyConfig, JourneyRow, ProfileRow
from pipeline.core.processor import TouchpointProcessor
from pipeline.generate.scenarios import TRUE_RATES, generate
from tests.factories import BASE_MS, encode, identity_config, schema_for, window_config
from tests.unit.test_migrations import apply, rows

MINUTE = 60_000
DAY = 86_400_000


class Record:
    def __init__(self, offset: int, value: bytes) -> None:
        self.partition, self.offset, self.value, self.key, self.headers = 0, offset, value, None, ()


def run_core(events: list[dict[str, Any]]) -> tuple[list[JourneyRow], list[ProfileRow], list[tuple[str, str]]]:
    """Journeys, profiles and identity aliases the core derives from the events, as a worker would."""
    processor = TouchpointProcessor(window_config(MINUTE, 5_000, 10 * DAY, 1_000), schema_for, identity_config(),
                                    journeys=JourneyConfig(gap_ms=30 * MINUTE, case_gap_ms=DAY))
    processor.assign(0, None, now_ms=BASE_MS)
    journeys: list[JourneyRow] = []
    profiles: dict[Any, ProfileRow] = {}
    aliases: list[tuple[str, str]] = []
    records = [Record(n, encode(e, 2)) for n, e in enumerate(events)]
    last = events[-1]["event_time"]
    for start in range(0, len(records), 5_000):
        processor.process(0, records[start:start + 5_000], now_ms=last)
    processor.tick(last + 10 * DAY, caught_up={0})
    out = processor.take_output()
    assert not out.dead_letters
    journeys += out.journeys
    profiles.update(out.profiles)
    aliases += out.identity.aliases
    return journeys, list(profiles.values()), aliases


def insert(session: Any, table: str, columns: tuple[str, ...], data: list[tuple[Any, ...]]) -> None:
    lines = "\n".join(json.dumps(dict(zip(columns, row, strict=True))) for row in data)
    session.query(f"INSERT INTO {table} ({', '.join(columns)}) FORMAT JSONEachRow\n{lines}")


@pytest.fixture(scope="module")
def engine():
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session()
    session.query("CREATE DATABASE IF NOT EXISTS journeys_rates")
    session.query("USE journeys_rates")
    apply(session, load_migrations())
    for scenario, count in (("conversion", 40_000), ("churn", 40_000)):
        events = list(generate(scenario, count, seed=5, start_ms=BASE_MS, events_per_s=200.0, schema_version=2))
        journeys, profiles, aliases = run_core(events)
        insert(session, "journeys", (*JOURNEY_COLUMNS, "recorded_at_ms"), [(*j, 1) for j in journeys])
        insert(session, "person_profiles", (*PROFILE_COLUMNS, "recorded_at_ms"), [(*p, 1) for p in profiles])
        insert(session, "person_aliases", ("alias_person_id", "person_id", "updated_at_ms"),
               [(old, new, n) for n, (old, new) in enumerate(aliases)])
    yield session
    session.close()


def within_sampling_error(observed: int, n: int, p: float) -> bool:
    """Within 4 standard errors, plus 0.01 for the journeys cut off where the generated stream ends."""
    return abs(observed / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 0.01


def test_conversion_by_ux_recovers_the_true_rates(engine):
    found = {ux: (int(users), int(converted)) for ux, users, converted in rows(
        engine, "SELECT ux, sum(users), sum(converted) FROM conversion_by_ux WHERE tenant = 'shop' GROUP BY ux")}
    assert set(found) == {"clean", "failures"}
    for ux, (users, converted) in found.items():
        assert users > 1_000
        assert within_sampling_error(converted, users, TRUE_RATES["conversion"][ux]), (ux, converted / users)


def test_churn_by_service_recovers_the_true_rates(engine):
    found = {service: (int(n), int(churned)) for service, n, churned in rows(
        engine, "SELECT service, sum(customers), sum(churned) FROM churn_by_service WHERE tenant = 'streaming' "
                "GROUP BY service")}
    assert set(found) == {"good", "bad"}
    for service, (customers, churned) in found.items():
        assert customers > 1_000
        assert within_sampling_error(churned, customers, TRUE_RATES["churn"][service]), (service,
                                                                                         churned / customers)


def test_promoters_are_counted_among_customers(engine):
    [(answered, promoters, detractors)] = [tuple(map(int, r)) for r in rows(
        engine, "SELECT sum(answered), sum(promoters), sum(detractors) FROM promoters_by_role "
                "WHERE tenant = 'streaming' AND segment = 'customers'")]
    # 70 % answer; good service (half) answers 9-10, bad service 0-6
    assert answered > 1_000 and within_sampling_error(promoters, answered, 0.5)
    assert promoters + detractors == answered


def test_profiles_of_converted_users_say_so(engine):
    [(profiles, customers)] = [tuple(map(int, r)) for r in rows(
        engine, "SELECT count(), countIf(role = 'customer') FROM person_profiles FINAL WHERE tenant = 'shop'")]
    assert profiles > 2_000 and 0 < customers < profiles
