"""The collector's HTTP behaviour with a fake broker: per-event results, keys, limits, CORS, gzip, webhooks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from pipeline.adapters.kafka import SCHEMA_MISMATCH, TouchpointEncoder, check_touchpoint
from pipeline.collector.app import create_app
from pipeline.collector.keys import KeyRing, TokenBucket, key_digest
from pipeline.collector.mapping import MappingError, contract_field_names, parse_mapping
from pipeline.contract.registry import open_registry
from pipeline.contract.wire import unframe
from pipeline.core.validate import CONTRACT_VIOLATION, FUTURE_EVENT_TIME
from pipeline.settings import Settings, TenantSettings, WriteKeySettings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
NOW_S = 1_768_435_200.0  # 2026-01-15T00:00:00Z, after the webhook fixtures
BANK_KEY, HOSPITAL_KEY, REVOKED_KEY, SLOW_KEY = "tpk_bank", "tpk_hospital", "tpk_old", "tpk_slow"


class FakeDelivery:
    """Records what would be produced; `acknowledge` says whether the broker confirms."""

    def __init__(self) -> None:
        self.ready = True
        self.acknowledge = True
        self.sent: list[tuple[bytes, bytes]] = []

    def connect(self) -> None:
        pass

    async def deliver(self, keys: list[bytes], values: list[bytes], timeout_s: float) -> list[bool]:
        if not self.acknowledge:
            return [False] * len(values)
        self.sent += list(zip(keys, values, strict=True))
        return [True] * len(values)

    def close(self) -> None:
        pass


def _settings() -> Settings:
    settings = Settings()
    settings.collector.tenants = [
        TenantSettings(name="bank", cors_origins=["https://bank.example"], keys=[
            WriteKeySettings(id="web", sha256=key_digest(BANK_KEY)),
            WriteKeySettings(id="old", sha256=key_digest(REVOKED_KEY), revoked=True),
            WriteKeySettings(id="slow", sha256=key_digest(SLOW_KEY), events_per_s=1, burst=3),
        ]),
        TenantSettings(name="hospital", keys=[WriteKeySettings(id="web", sha256=key_digest(HOSPITAL_KEY))]),
    ]
    settings.collector.max_events_per_request = 50
    settings.collector.max_request_bytes = 64 * 1024
    settings.collector.max_event_bytes = 2_048
    return settings


@pytest.fixture
def delivery() -> FakeDelivery:
    return FakeDelivery()


@pytest.fixture
def client(delivery: FakeDelivery) -> Any:
    with TestClient(create_app(_settings(), delivery, clock=lambda: NOW_S)) as test_client:
        yield test_client


def page_view(event_id: str = "e-1", **fields: Any) -> dict[str, Any]:
    event = {"event_id": event_id, "event_time": int(NOW_S * 1000) - 1_000, "channel": "WEB",
             "event_type": "page_view", "identifiers": {"anonymous_id": "a-1"},
             "web_vitals": {"lcp_ms": 1200.0, "inp_ms": 80.0, "cls": 0.02}}
    event.update(fields)
    return event


def post(client: Any, body: Any, key: str | None = BANK_KEY, **headers: str) -> Any:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/touchpoints", content=data, headers=headers)


def test_batch_answers_per_event_and_produces_only_the_accepted(client: Any, delivery: FakeDelivery) -> None:
    batch = [page_view("ok-1"), page_view("bad-time", event_time=int(NOW_S * 1000) + 3_600_000),
             page_view("no-id", identifiers={"anonymous_id": "undefined"}), page_view("bad-channel", channel="FAX"),
             "not an object", page_view("ok-2", tenant="bank")]
    answer = post(client, batch)
    assert answer.status_code == 200
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (2, 4)
    by_id = {r["index"]: r for r in body["results"]}
    assert [by_id[i]["status"] for i in range(6)] == ["accepted", "rejected", "rejected", "rejected", "rejected",
                                                     "accepted"]
    assert by_id[1]["reason"] == FUTURE_EVENT_TIME
    assert by_id[2]["reason"] == CONTRACT_VIOLATION and "no identifier" in by_id[2]["detail"]
    assert by_id[3]["reason"] == SCHEMA_MISMATCH and "FAX" in by_id[3]["detail"]
    assert by_id[4]["reason"] == "not_an_object"
    # What reached the broker decodes to the accepted events, keyed by the person, tenant taken from the key.
    encoder = TouchpointEncoder(open_registry(Settings().registry.url), Settings().registry.subject)
    import io

    import fastavro

    decoded = [fastavro.schemaless_reader(io.BytesIO(bytes(unframe(v)[1])), encoder.decoding_schema, None)
               for _, v in delivery.sent]
    assert [(e["event_id"], e["tenant"]) for e in decoded] == [("ok-1", "bank"), ("ok-2", "bank")]
    assert decoded[0]["web_vitals"] == {"lcp_ms": 1200.0, "inp_ms": 80.0, "cls": 0.02}
    assert [k for k, _ in delivery.sent] == [b"anonymous_id:a-1", b"anonymous_id:a-1"]


def test_one_object_is_one_touchpoint(client: Any, delivery: FakeDelivery) -> None:
    assert post(client, page_view()).json()["accepted"] == 1
    assert len(delivery.sent) == 1


def test_keys_unknown_revoked_missing_and_other_tenant(client: Any, delivery: FakeDelivery) -> None:
    assert post(client, page_view(), key="tpk_nobody").status_code == 401
    revoked = post(client, page_view(), key=REVOKED_KEY)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]
    assert post(client, page_view(), key=None).status_code == 401
    other = post(client, [page_view("mine"), page_view("theirs", tenant="hospital")])
    assert other.status_code == 403 and "hospital" in other.json()["error"]
    assert post(client, page_view(tenant="hospital"), key=HOSPITAL_KEY).status_code == 200
    assert delivery.sent and len(delivery.sent) == 1  # nothing of the refused requests was produced


def test_key_in_query_string_for_browsers(client: Any) -> None:
    answer = client.post(f"/v1/touchpoints?key={BANK_KEY}", content=json.dumps(page_view()).encode(),
                         headers={"Content-Type": "text/plain"})
    assert answer.status_code == 200 and answer.json()["accepted"] == 1


def test_rate_limit_answers_429_with_retry_after(client: Any, delivery: FakeDelivery) -> None:
    assert post(client, [page_view(f"e-{i}") for i in range(3)], key=SLOW_KEY).status_code == 200
    limited = post(client, page_view("e-4"), key=SLOW_KEY)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert len(delivery.sent) == 3
    assert post(client, page_view("e-5")).status_code == 200  # another key of the tenant is not limited


def test_token_bucket_refills_with_time() -> None:
    bucket = TokenBucket(rate=10, burst=20, tokens=20, updated_s=0)
    assert bucket.take(20, 0) == 0
    assert bucket.take(5, 0) == pytest.approx(0.5)
    assert bucket.take(5, 0.5) == 0
    assert bucket.take(500, 100) == 0  # larger than the burst: costs the whole burst


def test_size_limits(client: Any, delivery: FakeDelivery) -> None:
    too_many = post(client, [page_view(f"e-{i}") for i in range(51)])
    assert too_many.status_code == 413 and "51" in too_many.json()["error"]
    too_big = post(client, b"[" + b" " * (70 * 1024) + b"]")
    assert too_big.status_code == 413
    big_event = post(client, [page_view("big", attributes={"blob": "x" * 5_000}), page_view("small")])
    results = big_event.json()["results"]
    assert big_event.status_code == 200
    assert results[0]["reason"] == "event_too_large" and results[1]["status"] == "accepted"
    bomb = gzip.compress(b"[" + b" " * (1024 * 1024) + b"]")
    answer = post(client, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413 and "gunzipped" in answer.json()["error"]
    assert len(delivery.sent) == 1  # only the small event of the mixed batch


def test_gzip_body(client: Any, delivery: FakeDelivery) -> None:
    body = gzip.compress(json.dumps([page_view("z-1"), page_view("z-2")]).encode())
    answer = post(client, body, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 200 and answer.json()["accepted"] == 2
    assert post(client, b"not gzip", **{"Content-Encoding": "gzip"}).status_code == 400
    assert post(client, b"x", **{"Content-Encoding": "br"}).status_code == 415
    assert post(client, b"{not json").status_code == 400


def test_unacknowledged_events_are_not_accepted(client: Any, delivery: FakeDelivery) -> None:
    delivery.acknowledge = False
    answer = post(client, [page_view("a"), page_view("b", channel="FAX")])
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    statuses = [r["status"] for r in answer.json()["results"]]
    assert statuses == ["unavailable", "rejected"]
    delivery.ready = False
    assert post(client, page_view()).status_code == 503
    assert client.get("/healthz").status_code == 503


def test_cors_per_tenant(client: Any) -> None:
    preflight = client.options(f"/v1/touchpoints?key={BANK_KEY}", headers={
        "Origin": "https://bank.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://bank.example"
    assert client.options(f"/v1/touchpoints?key={HOSPITAL_KEY}", headers={
        "Origin": "https://bank.example", "Access-Control-Request-Method": "POST"}).status_code == 403
    allowed = post(client, page_view(), Origin="https://bank.example")
    assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == "https://bank.example"
    assert post(client, page_view(), Origin="https://evil.example").status_code == 403
    assert post(client, page_view(tenant="hospital"), key=HOSPITAL_KEY,
                Origin="https://bank.example").status_code == 403


def test_snippet_is_served(client: Any) -> None:
    answer = client.get("/v1/snippet.js")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/javascript")
    assert b"sendBeacon" in answer.content and b"largest-contentful-paint" in answer.content


def _decoded(delivery: FakeDelivery) -> list[dict[str, Any]]:
    import io

    import fastavro

    encoder = TouchpointEncoder(open_registry(Settings().registry.url), Settings().registry.subject)
    return [fastavro.schemaless_reader(io.BytesIO(bytes(unframe(v)[1])), encoder.decoding_schema, None)
            for _, v in delivery.sent]


def webhook(client: Any, source: str, fixture: str, key: str = BANK_KEY) -> Any:
    return client.post(f"/v1/webhooks/{source}", content=(FIXTURES / fixture).read_bytes(),
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_typeform_documented_response_becomes_survey_touchpoints(client: Any, delivery: FakeDelivery) -> None:
    answer = webhook(client, "typeform", "typeform_form_response.json")
    assert answer.status_code == 200 and answer.json()["accepted"] == 2
    events = _decoded(delivery)
    assert [(e["survey"]["kind"], e["survey"]["score"], e["survey"]["scale_min"], e["survey"]["scale_max"])
            for e in events] == [("CSAT", 2, 1, 5), ("NPS", 9, 0, 10)]
    assert {e["identifiers"]["user_id"] for e in events} == {"u-20417"}
    assert {(e["channel"], e["event_type"], e["tenant"], e["survey"]["about_channel"]) for e in events} == {
        ("SURVEY", "survey_response", "bank", "STORE")}
    assert events[0]["event_time"] == 1_768_384_937_000  # 2026-01-14T10:02:17Z
    assert len({e["event_id"] for e in events}) == 2
    # The same delivery again (webhooks are retried) carries the same event ids: counted once downstream.
    webhook(client, "typeform", "typeform_form_response.json")
    assert [e["event_id"] for e in _decoded(delivery)[2:]] == [e["event_id"] for e in events]


def test_zendesk_documented_ticket_events(client: Any, delivery: FakeDelivery) -> None:
    assert webhook(client, "zendesk", "zendesk_ticket_created.json").json()["accepted"] == 1
    assert webhook(client, "zendesk", "zendesk_ticket_status_changed.json").json()["accepted"] == 1
    opened, solved = _decoded(delivery)
    assert (opened["channel"], opened["event_type"], opened["outcome"]) == ("HELPDESK", "ticket_opened", None)
    assert (solved["event_type"], solved["outcome"], solved["contact"]["resolved"],
            solved["contact"]["agent_id"]) == ("ticket_resolved", "SUCCESS", True, "9000778899")
    assert opened["journey_id"] == solved["journey_id"] == "zendesk-ticket:48213"
    assert opened["identifiers"]["helpdesk_requester_id"] == "9000445566"
    assert solved["attributes"]["status"] == "solved"


def test_webhook_ignores_other_events_and_unknown_sources(client: Any, delivery: FakeDelivery) -> None:
    payload = json.loads((FIXTURES / "zendesk_ticket_created.json").read_text())
    payload["type"] = "zen:event-type:ticket.priority_changed"
    answer = client.post("/v1/webhooks/zendesk", content=json.dumps(payload).encode(),
                         headers={"Authorization": f"Bearer {BANK_KEY}"})
    assert answer.status_code == 200 and answer.json()["accepted"] == 0 and not delivery.sent
    assert webhook(client, "nosuch", "zendesk_ticket_created.json").status_code == 404
    payload = json.loads((FIXTURES / "zendesk_ticket_created.json").read_text())
    payload["time"] = "yesterday"
    failed = client.post("/v1/webhooks/zendesk", content=json.dumps(payload).encode(),
                         headers={"Authorization": f"Bearer {BANK_KEY}"}).json()
    assert failed["rejected"] == 1 and failed["results"][0]["reason"] == "mapping_failed"
    assert "event_time" in failed["results"][0]["detail"]


def test_mapping_files_are_checked_against_the_contract() -> None:
    fields = contract_field_names(open_registry(Settings().registry.url).latest("touchpoints-value")[1])
    with pytest.raises(MappingError, match="not a contract field"):
        parse_mapping('[touchpoint]\nevent_idd = "x"\n', "bad.toml", fields)
    with pytest.raises(MappingError, match="unknown keys"):
        parse_mapping('[touchpoint]\nevent_id = { path = "x", pth = 1 }\n', "bad.toml", fields)
    mapping = parse_mapping('[touchpoint]\nevent_id = "{a.b}"\nattributes.any = { path = "c", as = "string" }\n',
                            "ok.toml", fields)
    assert mapping.touchpoints({"a": {"b": 7}, "c": True}) == [{"event_id": "7", "attributes": {"any": "true"}}]


def test_shared_check_refuses_what_the_writer_would_coerce() -> None:
    encoder = TouchpointEncoder(open_registry(Settings().registry.url), Settings().registry.subject)
    event = page_view(tenant="bank")
    value, problem = check_touchpoint(event, encoder, int(NOW_S * 1000), 300_000)
    assert problem is None and value is not None
    for bad in ({"event_time": float(event["event_time"])}, {"event_time": True},
                {"survey": {"kind": "CSAT", "score": 4.5, "scale_min": 1, "scale_max": 5}}):
        value, problem = check_touchpoint({**event, **bad}, encoder, int(NOW_S * 1000), 300_000)
        assert value is None and problem is not None and problem[0] == SCHEMA_MISMATCH


def test_keyring_never_holds_keys() -> None:
    ring = KeyRing([TenantSettings(name="t", keys=[WriteKeySettings(id="k", sha256=key_digest("secret"))])])
    assert "secret" not in repr(ring)
    assert ring.authenticate("secret").tenant == "t"


def test_metrics_count_answers_by_tenant_status_and_reason(client: Any) -> None:
    post(client, [page_view("m-1"), page_view("m-2", channel="FAX")])
    post(client, page_view(), key="tpk_nobody")
    text = client.get("/metrics").text
    assert 'touchpoint_collector_events_total{reason="",status="accepted",tenant="bank"} 1.0' in text
    assert 'touchpoint_collector_events_total{reason="schema_mismatch",status="rejected",tenant="bank"} 1.0' in text
    assert 'touchpoint_collector_requests_total{code="401",endpoint="touchpoints"} 1.0' in text
    assert "touchpoint_collector_request_duration_seconds_count" in text
    assert "touchpoint_collector_unacked_events" in text
