"""The console without servers: the UX/CX placement, rate intervals, alert states, dead-letter time filters, and
the API's schema and token rules (with fake queries)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pipeline.app.deadletters import DeadLetterError, parse_since
from pipeline.console.alerts import UnknownAlert, console_state
from pipeline.console.app import create_app
from pipeline.console.health import scrape_counter
from pipeline.core.overview import CX_AXIS, UX_AXIS, health, position, wilson_interval
from pipeline.settings import Settings


def pooled(values: dict[str, float], n: float = 100) -> dict[str, tuple[float, float]]:
    return {indicator: (value * n, n) for indicator, value in values.items()}


def test_the_seeds_land_in_opposite_quadrants():
    bank = position("bank", pooled({"task_success_rate": 0.70, "error_rate": 0.19, "apdex": 0.57,
                                    "lcp_good_share": 1.0, "csat": 0.83, "nps": 50, "fcr": 0.95,
                                    "escalation_rate": 0.03}))
    hospital = position("hospital", pooled({"task_success_rate": 0.97, "error_rate": 0.008, "apdex": 0.78,
                                            "lcp_good_share": 1.0, "csat": 0.17, "fcr": 0.64,
                                            "escalation_rate": 0.25}))
    assert bank.quadrant == "bad UX, good CX" and hospital.quadrant == "good UX, bad CX"
    assert [p.indicator for p in bank.cx_indicators] == ["csat", "nps", "fcr", "escalation_rate"]  # no CES data
    assert {p.family for p in hospital.cx_indicators} == {"CX", "CS"}
    assert {p.family for p in hospital.ux_indicators} == {"UX"}


def test_thin_indicators_are_left_out_and_no_data_says_so():
    p = position("t", {"csat": (1.0, 2.0), "error_rate": (0.0, 50.0)}, min_count=10)
    assert p.cx is None and p.quadrant == "not enough data" and p.ux == 1.0
    assert position("t", {}).ux is None


def test_health_runs_from_bad_to_good_in_either_direction():
    assert health(0.19, bad=0.15, good=0.02) == 0.0 and health(0.01, bad=0.15, good=0.02) == 1.0
    assert math.isclose(health(0.085, bad=0.15, good=0.02), 0.5)
    assert math.isclose(health(0.725, bad=0.6, good=0.85), 0.5)
    for axis in (UX_AXIS, CX_AXIS):
        assert len(axis) >= 3  # several indicators per axis


def test_wilson_interval_covers_the_rate_and_narrows_with_n():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 5000)
        k = rng.randint(0, n)
        low, high = wilson_interval(k, n)  # type: ignore[misc]
        assert 0 <= low <= k / n <= high <= 1
    assert wilson_interval(0, 0) is None
    narrow, wide = wilson_interval(500, 1000), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # type: ignore[index]
    low, high = wilson_interval(5, 10)  # type: ignore[misc]
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)


def test_console_states_are_the_alerters_with_silences_and_acknowledgements_on_top():
    assert [console_state(state, "", False) for state in ("pending", "firing", "resolved", "no_data")] == [
        "pending", "firing", "resolved", "no_data"]
    assert console_state("firing", "ops", False) == "acknowledged"
    assert console_state("pending", "ops", False) == "pending"  # only a firing alert is acknowledged
    assert [console_state(state, "", True) for state in ("pending", "firing", "no_data", "resolved")] == [
        "silenced", "silenced", "silenced", "resolved"]


def test_since_takes_durations_and_times():
    now = 1_800_000_000_000
    assert parse_since("15m", now) == now - 900_000
    assert parse_since("2h", now) == now - 7_200_000
    assert parse_since("1d", now) == now - 86_400_000
    assert parse_since("2026-11-29T08:00", now) == 1_795_939_200_000
    assert parse_since("2026-11-29T09:00+01:00", now) == 1_795_939_200_000
    with pytest.raises(DeadLetterError, match="--since"):
        parse_since("yesterday", now)


def test_scrape_counter_says_none_when_nothing_answers():
    assert scrape_counter("http://127.0.0.1:9/metrics", "touchpoint_clickhouse_insert_failures") is None


class FakeQueries:
    """Stands in for ConsoleQueries: answers from lists."""

    def pooled_by_tenant(self, seconds: int) -> dict[str, dict[str, tuple[float, float]]]:
        return {"bank": pooled({"error_rate": 0.2, "task_success_rate": 0.7, "csat": 0.9, "fcr": 0.9})}


class FakeAlerts:
    """Stands in for LifecycleAlertStore: one firing series, records operators' actions, one case."""

    def __init__(self) -> None:
        self.series = {"fp1": {"alert_id": "fp1", "rule": "r", "tenant": "bank", "channel": "MOBILE_APP",
                               "lifecycle_state": "firing", "acked_by": "", "since_ms": 0, "message": "m"}}
        self.actions: list[tuple[str, str, str]] = []

    def list(self, seconds: int, now_ms: int) -> list[dict[str, Any]]:
        return [dict(a, state=console_state(a["lifecycle_state"], a["acked_by"], False))
                for a in self.series.values()]

    def get(self, alert_id: str, now_ms: int) -> dict[str, Any] | None:
        return next((a for a in self.list(0, now_ms) if a["alert_id"] == alert_id), None)

    def act(self, alert_id: str, action: str, actor: str, note: str, silenced_until_ms: int,
            now_ms: int) -> dict[str, Any]:
        if alert_id not in self.series:
            raise UnknownAlert(alert_id)
        self.actions.append((alert_id, action, actor))
        if action == "acknowledge":
            self.series[alert_id]["acked_by"] = actor
        found = self.get(alert_id, now_ms)
        assert found is not None
        return found

    def cases(self, now_ms: int, everything: bool = False) -> list[dict[str, Any]]:
        return [{"case_id": "c1", "tenant": "hospital", "status": "open", "sla_remaining_ms": 3_600_000}]


def client(token: str = "") -> tuple[TestClient, FakeAlerts]:
    settings = Settings()
    settings.console.token = token
    fake = FakeAlerts()
    app = create_app(settings, queries=FakeQueries(),  # type: ignore[arg-type]
                     alerts=fake, health=lambda: {"partitions": []})
    return TestClient(app), fake


def test_openapi_schema_describes_every_endpoint_the_page_uses():
    api, _ = client()
    schema = api.get("/openapi.json").json()
    assert schema["info"]["title"] == "Touchpoint operations console"
    page_js = (create_app.__globals__["STATIC"] / "console.js").read_text()
    for path in ("/api/overview", "/api/channels", "/api/series", "/api/alerts", "/api/cases", "/api/journey",
                 "/api/persons/erase", "/api/health"):
        assert path in schema["paths"] and path in page_js, path
    overview = schema["components"]["schemas"]["TenantOverview"]["properties"]
    assert {"ux", "cx", "quadrant", "ux_indicators", "cx_indicators"} <= set(overview)
    assert api.get("/docs").status_code == 404  # the interactive docs would load scripts from a CDN


def test_page_and_vendored_chart_library_are_served_without_a_cdn():
    api, _ = client()
    page = api.get("/").text
    assert "/static/vendor/uplot/uPlot.iife.min.js" in page and "http" not in page.split("<body")[0].replace(
        'href="/', "")
    assert api.get("/static/vendor/uplot/uPlot.iife.min.js").text.startswith("/*! https://github.com/leeoniya/uPlot")
    assert api.get("/api/overview").json()["tenants"][0]["quadrant"] == "bad UX, good CX"


def test_actions_need_the_token_and_record_the_action():
    api, fake = client()
    assert api.post("/api/alerts/fp1/acknowledge").status_code == 403  # no token set: off
    api, fake = client("s3cret")
    assert api.post("/api/alerts/fp1/acknowledge").status_code == 401
    assert api.post("/api/alerts/fp1/acknowledge",
                    headers={"Authorization": "Bearer nope"}).status_code == 401
    assert fake.actions == []
    done = api.post("/api/alerts/fp1/acknowledge", headers={"Authorization": "Bearer s3cret"},
                    json={"actor": "ops", "note": "looking"})
    assert done.status_code == 200 and done.json()["state"] == "acknowledged"
    assert fake.actions == [("fp1", "acknowledge", "ops")]
    assert api.post("/api/alerts/none/resolve", headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert api.post("/api/alerts/fp1/explode",
                    headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert api.post("/api/persons/erase", json={"identifier": "user_id:x"}).status_code == 401


def test_dead_letters_are_decoded_where_they_decode_and_shown_in_hex_where_not():
    from pipeline.adapters.kafka import StoredRecord, TouchpointEncoder
    from pipeline.app.deadletters import describe
    from pipeline.contract.registry import open_registry
    from tests.factories import BASE_MS, touchpoint

    settings = Settings()
    encoder = TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject, 1)
    good = encoder.encode(touchpoint("e-ok", BASE_MS))
    future = encoder.encode(touchpoint("e-future", BASE_MS + 3_600_000))
    headers = (("reason", b"unknown_schema"), ("detail", b"schema id 1 was missing"), ("source.topic", b"t"),
               ("source.partition", b"2"), ("source.offset", b"40"))
    records = [StoredRecord(0, 0, BASE_MS, b"k", good, headers),
               StoredRecord(0, 1, BASE_MS, b"k", future, (("reason", b"future_event_time"),)),
               StoredRecord(0, 2, BASE_MS, None, b"\x01junk", (("reason", b"undecodable"),)),
               StoredRecord(0, 3, BASE_MS, None, None, ()),
               StoredRecord(0, 4, BASE_MS, None, None, (("reason", b"undecodable"), ("source.size", b"9000000"),
                                                        ("payload", b"omitted: larger than the topic takes")))]
    ok, late, junk, empty, huge = describe(records, settings, now_ms=BASE_MS)
    assert (ok.event_id, ok.hex, ok.problem_now, ok.reason, ok.source) == ("e-ok", None, None, "unknown_schema",
                                                                           "t/2/40")
    assert ok.event is not None and ok.event["tenant"] == "bank"
    assert late.event_id == "e-future" and late.problem_now is not None and "future" in late.problem_now
    assert (junk.event, junk.hex, junk.size) == (None, "016a756e6b", 5) and junk.problem_now.startswith("undecodable")
    assert empty.reason == "unknown" and empty.hex == "" and empty.problem_now is not None
    assert huge.payload_omitted and huge.size == 9_000_000 and huge.problem_now.startswith("payload omitted")
