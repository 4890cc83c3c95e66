"""What a request's body becomes: touchpoints checked one by one with the contract's own check, each accepted
(with its Kafka key and Avro value) or rejected with a reason. Plain Python, time injected."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.adapters.kafka import TouchpointEncoder, check_touchpoint, partition_key

EVENT_TOO_LARGE = "event_too_large"


class Refused(Exception):
    """The whole request is refused (400, 403, 413, 415) with a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_body(raw: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as JSON bytes: gunzipped when the sender says so, never larger than `max_bytes` (a gzip bomb
    stops at the limit)."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        if len(raw) > max_bytes:
            raise Refused(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
        return raw
    if encoding not in ("gzip", "x-gzip"):
        raise Refused(415, f"Content-Encoding {content_encoding!r} is not supported; send gzip or nothing")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise Refused(400, f"body is not valid gzip: {exc}") from exc
    if len(body) > max_bytes:
        raise Refused(413, f"request body is over {max_bytes} bytes once gunzipped; the limit is {max_bytes}")
    return body


def parse_touchpoints(body: bytes, max_events: int) -> list[Any]:
    """One JSON object, or a JSON array of them."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"body is not JSON: {exc}") from exc
    items = data if isinstance(data, list) else [data]
    if len(items) > max_events:
        raise Refused(413, f"{len(items)} touchpoints in one request; the limit is {max_events}")
    return items


@dataclass(slots=True)
class Checked:
    results: list[dict[str, Any]] = field(default_factory=list)  # one per input item, in order
    indexes: list[int] = field(default_factory=list)  # which results are accepted, with their records
    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.indexes)


def check_batch(items: list[Any], tenant: str, encoder: TouchpointEncoder, now_ms: int, max_future_ms: int,
                blocked: frozenset[str], max_event_bytes: int) -> Checked:
    """Check every item; the tenant comes from the write key (an item may leave it out, never name another)."""
    out = Checked()
    for index, item in enumerate(items):
        if isinstance(item, dict):
            named = item.get("tenant")
            if named is None or named == "":
                item["tenant"] = tenant
            elif named != tenant:
                raise Refused(403, f"touchpoint {index} is for tenant {named!r}; this key writes tenant {tenant!r}")
        event_id = item.get("event_id") if isinstance(item, dict) else None
        result: dict[str, Any] = {"index": index, "event_id": event_id if isinstance(event_id, str) else None}
        value, problem = check_touchpoint(item, encoder, now_ms, max_future_ms, blocked)
        if problem is None and value is not None and len(value) > max_event_bytes:
            problem = (EVENT_TOO_LARGE, f"touchpoint is {len(value)} bytes in Avro; the limit is {max_event_bytes}")
        if problem is not None:
            result.update(status="rejected", reason=problem[0], detail=problem[1])
        else:
            assert value is not None
            result["status"] = "accepted"
            out.indexes.append(index)
            out.keys.append(partition_key(item))
            out.values.append(value)
        out.results.append(result)
    return out
