"""Step 2, validate: the rules of the contract that Avro types alone cannot express."""

from __future__ import annotations

import re
from typing import Any

CONTRACT_VIOLATION = "contract_violation"
FUTURE_EVENT_TIME = "future_event_time"

# Values channel systems send when they have no identifier; they must never identify anyone.
BLANK_IDENTIFIERS = frozenset({"", "null", "none", "undefined", "0", "-1", "anonymous", "unknown"})

# Hashed identifiers (email_sha256, phone_sha256, any *_sha256): the SHA-256 digest in lower-case hex, never the
# raw value, so a raw address or number sent by mistake is refused instead of stored.
HASH_SUFFIX = "_sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_NON_NEGATIVE = ("duration_ms",)
_CONTACT_NON_NEGATIVE = ("queue_ms", "handle_ms", "first_response_ms")


def has_identifier(value: str | None, blocked: frozenset[str] = BLANK_IDENTIFIERS) -> bool:
    return value is not None and value.strip().lower() not in blocked


def violation(event: dict[str, Any], now_ms: int, max_future_ms: int,
              blocked: frozenset[str] = BLANK_IDENTIFIERS) -> tuple[str, str] | None:
    """(reason, detail) when the event breaks the contract, None when it is fine."""
    if not event["event_id"].strip():
        return CONTRACT_VIOLATION, "event_id is empty"
    if not event["tenant"].strip():
        return CONTRACT_VIOLATION, "tenant is empty"
    if not event["event_type"].strip():
        return CONTRACT_VIOLATION, "event_type is empty"
    event_time = event["event_time"]
    if event_time <= 0:
        return CONTRACT_VIOLATION, f"event_time {event_time} is not after the Unix epoch"
    if event_time > now_ms + max_future_ms:
        return FUTURE_EVENT_TIME, (f"event_time is {(event_time - now_ms) / 1000:.0f} s in the future "
                                   f"(limit {max_future_ms / 1000:.0f} s)")
    problem = _identifier_problem(event["identifiers"], blocked)
    if problem is not None:
        return CONTRACT_VIOLATION, problem
    for field in _NON_NEGATIVE:
        value = event.get(field)
        if value is not None and value < 0:
            return CONTRACT_VIOLATION, f"{field} is negative ({value})"
    survey = event.get("survey")
    if survey is not None:
        low, high, score = survey["scale_min"], survey["scale_max"], survey["score"]
        if low >= high:
            return CONTRACT_VIOLATION, f"survey scale {low}-{high} is empty"
        if not low <= score <= high:
            return CONTRACT_VIOLATION, f"survey score {score} is outside its scale {low}-{high}"
    contact = event.get("contact")
    if contact is not None:
        for field in _CONTACT_NON_NEGATIVE:
            value = contact.get(field)
            if value is not None and value < 0:
                return CONTRACT_VIOLATION, f"contact.{field} is negative ({value})"
    return None


def _identifier_problem(ids: dict[str, str | None], blocked: frozenset[str]) -> str | None:
    """No usable identifier, or a hashed one that is not a digest; one pass, has_identifier inlined (every event
    goes through here)."""
    usable = False
    for kind, value in ids.items():
        if value is not None and value.strip().lower() not in blocked:
            usable = True
            if kind.endswith(HASH_SUFFIX) and not _SHA256_HEX.fullmatch(value):
                return (f"identifiers.{kind} is not a SHA-256 digest (64 lower-case hex characters; got "
                        f"{len(value)} characters): send the hash, never the raw value")
    return None if usable else f"no identifier: {', '.join(ids)} are all blank or blocked"
