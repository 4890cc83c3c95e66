"""Plain-Python parts of the collector: webhook mapping rules, body reading, and delivery's bookkeeping with a
fake producer (acknowledged, failed, never answered, fatally broken)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from typing import Any, ClassVar

import pytest
from kafka.errors import KafkaError, KafkaTimeoutError

from pipeline.collector.delivery import Delivery
from pipeline.collector.intake import Refused, read_body
from pipeline.collector.mapping import FieldRule, ValueProblem, lookup


def test_lookup_paths_items_and_indexes() -> None:
    payload = {"a": {"b": [{"c": 1}, {"c": 2}]}, "n": None}
    assert lookup(payload, None, "a.b.1.c") == 2
    assert lookup(payload, None, "a.b.-1.c") == 2
    assert lookup(payload, None, "a.b.5.c") is None
    assert lookup(payload, None, "n.x") is None
    assert lookup(payload, {"v": 7}, "item.v") == 7


@pytest.mark.parametrize(("spec", "expected"), [
    ("literal", "literal"),
    (5, 5),
    ("{a}-{b.c}", "x-3"),
    ("{a}-{missing}", None),
    ({"path": ["missing", "a"]}, "x"),
    ({"path": "b"}, None),  # an object is not a value
    ({"path": "s", "lower": True, "map": {"solved": "SUCCESS"}}, "SUCCESS"),
    ({"path": "s", "map": {"solved": "SUCCESS"}, "default": "OTHER"}, "OTHER"),  # map is exact after lower
    ({"cases": [{"if": {"s": ["closed", "solved"]}, "value": True}]}, True),
    ({"cases": [{"if": {"a": "y"}, "value": 1}], "default": 0}, 0),
    ({"path": "t", "as": "timestamp_ms"}, 1_768_384_937_000),
    ({"path": "secs", "as": "timestamp_ms"}, 1_768_384_937_000),
    ({"path": "ms", "as": "timestamp_ms"}, 1_768_384_937_123),
    ({"path": "e", "as": "sha256"}, hashlib.sha256(b"person@example.org").hexdigest()),
    ({"path": "b.c", "as": "string"}, "3"),
    ({"path": "f", "as": "int"}, 4),
])
def test_value_specs(spec: Any, expected: Any) -> None:
    payload = {"a": "x", "b": {"c": 3}, "s": "SOLVED", "t": "2026-01-14T10:02:17Z", "secs": 1_768_384_937,
               "ms": 1_768_384_937_123, "e": " Person@Example.org ", "f": "4.0"}
    assert FieldRule("x", spec).value(payload, None) == expected


@pytest.mark.parametrize("spec", [{"path": "t", "as": "timestamp_ms"}, {"path": "f", "as": "int"},
                                  {"path": "naive", "as": "timestamp_ms"}])
def test_values_that_do_not_convert(spec: Any) -> None:
    with pytest.raises(ValueProblem):
        FieldRule("x", spec).value({"t": "yesterday", "f": "4.5", "naive": "2026-01-14T10:02:17"}, None)


def test_read_body_limits_and_gzip() -> None:
    assert read_body(b"[]", None, 10) == b"[]"
    assert read_body(gzip.compress(b"[1, 2]"), "gzip", 10) == b"[1, 2]"
    with pytest.raises(Refused) as too_big:
        read_body(gzip.compress(b" " * 1_000), "gzip", 100)
    assert too_big.value.status == 413
    with pytest.raises(Refused) as unknown:
        read_body(b"x", "deflate", 100)
    assert unknown.value.status == 415


class FakeFuture:
    def __init__(self) -> None:
        self.is_done = False
        self.exception: BaseException | None = None
        self.callbacks: list[Any] = []

    def add_both(self, callback: Any) -> None:
        if self.is_done:  # like kafka-python: a finished future calls back at once
            callback(self.exception)
        else:
            self.callbacks.append(callback)

    def succeeded(self) -> bool:
        return self.is_done and self.exception is None

    def failed(self) -> bool:
        return self.is_done and self.exception is not None

    def finish(self, exception: BaseException | None = None) -> None:
        self.is_done, self.exception = True, exception
        for callback in self.callbacks:
            callback(exception)


class FakeProducer:
    """Answers each send as told: 'ack', 'fail' (a fatal error), or 'silent' (the broker never answers)."""

    made: ClassVar[list[FakeProducer]] = []
    behaviour = "ack"

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[bytes] = []
        self.closed = False
        FakeProducer.made.append(self)

    def send(self, topic: str, key: bytes, value: bytes) -> FakeFuture:
        future = FakeFuture()
        self.sent.append(value)
        if FakeProducer.behaviour == "ack":
            future.finish()
        elif FakeProducer.behaviour == "fail":
            future.finish(KafkaError("Unexpected error in InitProducerIdResponse"))
        elif FakeProducer.behaviour == "timeout":
            future.finish(KafkaTimeoutError("expired"))
        return future

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def _delivery(max_unacked: int = 10) -> Delivery:
    FakeProducer.made = []
    FakeProducer.behaviour = "ack"
    delivery = Delivery("127.0.0.1:1", "t", max_unacked=max_unacked, ack_timeout_s=0.3,
                        producer_factory=FakeProducer)
    delivery.connect()
    for _ in range(100):
        if delivery.ready:
            break
        time.sleep(0.01)
    return delivery


def test_delivery_config_is_acks_all_and_idempotent() -> None:
    delivery = _delivery()
    assert FakeProducer.made[0].config["acks"] == "all" and FakeProducer.made[0].config["enable_idempotence"]
    delivery.close()


def test_delivery_reports_per_record_and_bounds_the_unacknowledged() -> None:
    delivery = _delivery(max_unacked=10)

    async def scenario() -> None:
        assert await delivery.deliver([b"k"] * 3, [b"a", b"b", b"c"]) == [True, True, True]
        assert delivery.unacked == 0
        FakeProducer.behaviour = "silent"
        assert await delivery.deliver([b"k"] * 8, [b"v"] * 8) == [False] * 8  # not answered within the timeout
        assert delivery.unacked == 8
        # No room for 5 more while 8 wait: nothing is sent, all unavailable, after the bounded wait.
        sent_before = len(FakeProducer.made[0].sent)
        assert await delivery.deliver([b"k"] * 5, [b"v"] * 5) == [False] * 5
        assert len(FakeProducer.made[0].sent) == sent_before
        FakeProducer.behaviour = "timeout"  # expired in the producer: not a reason to replace it
        assert await delivery.deliver([b"k"], [b"v"]) == [False]
        assert len(FakeProducer.made) == 1

    asyncio.run(scenario())
    delivery.close()


def test_a_fatally_broken_producer_is_replaced() -> None:
    delivery = _delivery()

    async def scenario() -> None:
        FakeProducer.behaviour = "fail"
        assert await delivery.deliver([b"k"] * 2, [b"a", b"b"]) == [False, False]
        for _ in range(100):
            if delivery.ready and len(FakeProducer.made) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(FakeProducer.made) == 2
        FakeProducer.behaviour = "ack"
        assert await delivery.deliver([b"k"], [b"c"]) == [True]
        assert FakeProducer.made[1].sent == [b"c"]

    asyncio.run(scenario())
    delivery.close()


def test_collector_key_prints_a_settings_entry_that_admits_the_key(tmp_path: Any, monkeypatch: Any) -> None:
    import tomllib

    from typer.testing import CliRunner

    from pipeline.app.cli import app
    from pipeline.collector.keys import KeyRing
    from pipeline.settings import Settings

    out = CliRunner().invoke(app, ["collector-key", "bank", "--key-id", "web"]).stdout
    key = out.split("not stored): ")[1].split()[0]
    entry = out[out.index("[[collector.tenants]]"):]
    assert key not in entry
    (tmp_path / "touchpoint.toml").write_text(entry)
    monkeypatch.setenv("TOUCHPOINT_CONFIG", str(tmp_path / "touchpoint.toml"))
    settings = Settings()
    assert tomllib.loads(entry)["collector"]["tenants"][0]["name"] == "bank"
    grant = KeyRing(settings.collector.tenants).authenticate(key)
    assert (grant.tenant, grant.key_id) == ("bank", "web")


def test_the_shipped_snippet_is_the_pinned_web_vitals_build() -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe = json.loads((root / "web" / "snippet" / "package.json").read_text())
    bundle = (root / "pipeline" / "collector" / "static" / "touchpoint.js").read_text()
    pinned = recipe["devDependencies"]["web-vitals"]
    assert f"web-vitals {pinned}" in bundle.splitlines()[0]
    assert "Apache License" in (root / "pipeline" / "collector" / "static" / "web-vitals.LICENSE").read_text()
    for needed in ("sendBeacon", "largest-contentful-paint", "layout-shift", "/v1/touchpoints"):
        assert needed in bundle
