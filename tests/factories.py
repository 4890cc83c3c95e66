"""Touchpoint dicts shaped like the Avro record, for unit tests of the core."""

from __future__ import annotations

import io
from typing import Any

import fastavro

from pipeline.contract.registry import contract_schemas, parse_for_decoding
from pipeline.contract.wire import frame

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

V1, V2, V3 = (fastavro.parse_schema(s) for s in contract_schemas())


def touchpoint(event_id: str = "e-1", event_time: int = BASE_MS, *, channel: str = "WEB",
               event_type: str = "page_view", tenant: str = "bank", anonymous_id: str | None = "a-1",
               user_id: str | None = None, customer_id: str | None = None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": event_id, "event_time": event_time, "channel": channel, "event_type": event_type,
        "tenant": tenant,
        "identifiers": {"anonymous_id": anonymous_id, "user_id": user_id, "customer_id": customer_id},
        "session_id": None, "journey_id": None, "flow": None, "device_class": None, "outcome": None,
        "error_code": None, "duration_ms": None, "survey": None, "contact": None, "web_vitals": None,
        "amount": None, "attributes": {},
    }
    event.update(fields)
    return event


def csat(score: int, **kwargs: Any) -> dict[str, Any]:
    return touchpoint(event_type="survey_response", channel=kwargs.pop("channel", "SURVEY"),
                      survey={"kind": "CSAT", "score": score, "scale_min": 1, "scale_max": 5,
                              "about_channel": kwargs.pop("about", None)}, **kwargs)


def task(outcome: str, **kwargs: Any) -> dict[str, Any]:
    error = "HTTP_503" if outcome == "FAILURE" else None
    return touchpoint(event_type="task", outcome=outcome, error_code=error, **kwargs)


def encode(event: dict[str, Any], schema_id: int = 1) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, V1 if schema_id == 1 else V2, event)
    return frame(schema_id, buffer.getvalue())


DECODE = {i + 1: parse_for_decoding(s) for i, s in enumerate(contract_schemas())}


def schema_for(schema_id: int) -> Any:
    return DECODE.get(schema_id)
