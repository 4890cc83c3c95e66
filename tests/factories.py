"""Touchpoint dicts shaped like the Avro record, for unit tests of the core."""

from __future__ import annotations

import io
from typing import Any

import fastavro
from hypothesis import strategies as st

from pipeline.contract.registry import contract_schemas, parse_for_decoding
from pipeline.contract.wire import frame

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

V1, V2, V3 = (fastavro.parse_schema(s) for s in contract_schemas())


def touchpoint(event_id: str = "e-1", event_time: int = BASE_MS, *, channel: str = "WEB",
               event_type: str = "page_view", tenant: str = "bank", anonymous_id: str | None = "a-1",
               user_id: str | None = None, customer_id: str | None = None, person_id: str | None = None,
               role: str = "prospect", previous_contact_ms: int | None = None, **fields: Any) -> dict[str, Any]:
    """A v1-shaped touchpoint plus the keys the enrich step adds (person_id, role, previous_contact_ms...); the
    Avro encoder ignores those."""
    event: dict[str, Any] = {
        "event_id": event_id, "event_time": event_time, "channel": channel, "event_type": event_type,
        "tenant": tenant,
        "identifiers": {"anonymous_id": anonymous_id, "user_id": user_id, "customer_id": customer_id},
        "session_id": None, "journey_id": None, "flow": None, "device_class": None, "outcome": None,
        "error_code": None, "duration_ms": None, "survey": None, "contact": None, "web_vitals": None,
        "amount": None, "attributes": {},
        "person_id": person_id or f"p:{customer_id or user_id or anonymous_id}", "role": role,
        "is_customer": role in ("customer", "habitual_customer"), "is_user": role != "prospect",
        "previous_contact_ms": previous_contact_ms,
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


def survey(kind: str, score: int, **kwargs: Any) -> dict[str, Any]:
    low, high = {"CSAT": (1, 5), "NPS": (0, 10), "CES": (1, 7)}[kind]
    return touchpoint(event_type="survey_response", channel=kwargs.pop("channel", "SURVEY"),
                      survey={"kind": kind, "score": score, "scale_min": low, "scale_max": high,
                              "about_channel": kwargs.pop("about", None)}, **kwargs)


def contact(**kwargs: Any) -> dict[str, Any]:
    """A contact-centre call; contact fields (queue_ms, handle_ms, resolved...) override the defaults."""
    fields = {"queue_ms": 30_000, "handle_ms": 200_000, "first_response_ms": None, "resolved": True,
              "escalated": False, "agent_id": "agent-1"}
    for name in list(fields):
        if name in kwargs:
            fields[name] = kwargs.pop(name)
    return touchpoint(event_type=kwargs.pop("event_type", "contact"), channel=kwargs.pop("channel", "CONTACT_CENTRE"),
                      contact=fields, **kwargs)


def page(lcp_ms: float | None = 1_000.0, inp_ms: float | None = 100.0, cls: float | None = 0.05,
         **kwargs: Any) -> dict[str, Any]:
    return touchpoint(event_type="page_view", web_vitals={"lcp_ms": lcp_ms, "inp_ms": inp_ms, "cls": cls}, **kwargs)


def encode(event: dict[str, Any], schema_id: int = 1) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, V1 if schema_id == 1 else V2, event)
    return frame(schema_id, buffer.getvalue())


DECODE = {i + 1: parse_for_decoding(s) for i, s in enumerate(contract_schemas())}


def schema_for(schema_id: int) -> Any:
    return DECODE.get(schema_id)


# --- randomized streams for the property tests -----------------------------------------------------------------

Step = tuple[int, int, int, int, int]  # (event id number, seconds after BASE_MS, person, kind, value seed)
ROLES = ("prospect", "user", "customer", "habitual_customer", "former_customer")
KINDS = 10


def stream_event(step: Step) -> dict[str, Any]:
    """A touchpoint of one of ten kinds that together feed every indicator, float values included."""
    number, seconds, person, kind, v = step
    common: dict[str, Any] = {"event_id": str(number), "event_time": BASE_MS + seconds * 1000, "tenant": "t",
                              "person_id": f"person-{person}", "role": ROLES[(v + person) % len(ROLES)]}
    if kind <= 2:
        outcome = ("SUCCESS", "FAILURE", "ABANDONED")[kind]
        event = task(outcome, flow=("login", "checkout", None)[v % 3], duration_ms=500 + v * 37,
                     device_class=("MOBILE", "DESKTOP", None)[v % 3], rage_clicks=v % 5, **common)
    elif kind == 3:
        event = page(lcp_ms=500 + v * 13.7, inp_ms=v * 1.3, cls=(v % 5) * 0.07, device_class="DESKTOP", **common)
    elif kind == 4:
        event = touchpoint(event_type="app_crash", channel="MOBILE_APP", error_code="E", **common)
    elif kind == 5:
        event = contact(journey_id=f"j{v % 3}", sentiment=(v % 200 - 100) / 100.0, resolved=v % 4 != 0,
                        escalated=v % 7 == 0, queue_ms=v * 900, handle_ms=60_000 + v * 11,
                        outcome="ABANDONED" if v % 9 == 0 else "SUCCESS",
                        previous_contact_ms=None if v % 2 else BASE_MS - v * 86_400_000 // 10, **common)
    elif kind == 6:
        event = survey("CSAT", 1 + v % 5, about="STORE", sentiment=(v % 41) / 20.0 - 1.0, **common)
    elif kind == 7:
        event = survey(("NPS", "CES")[v % 2], v % 8, **common)
    elif kind == 8:
        event = contact(event_type="ticket_opened", channel="HELPDESK", journey_id=f"j{v % 3}",
                        first_response_ms=v * 60_000, queue_ms=None, handle_ms=None, resolved=None, **common)
    else:
        event = touchpoint(event_type="identify", channel="WEB", **common)
    return event


@st.composite
def streams(draw: st.DrawFn, max_size: int = 120) -> list[Step]:
    """Mostly increasing event times with out-of-order, late and duplicate events, pauses that end sessions."""
    n = draw(st.integers(1, max_size))
    out: list[Step] = []
    clock = 0
    for i in range(n):
        if out and draw(st.integers(0, 9)) == 0:
            out.append(out[draw(st.integers(0, len(out) - 1))])  # a redelivered copy
            continue
        clock += draw(st.sampled_from([0, 1, 3, 7, 12, 20, 20, 200]))
        jitter = draw(st.integers(-90, 5))
        event_id = draw(st.sampled_from([i, i, i, max(0, i - draw(st.integers(1, 5)))]))  # some reused ids
        out.append((event_id, max(0, clock + jitter), draw(st.integers(0, 4)), draw(st.integers(0, KINDS - 1)),
                    draw(st.integers(0, 300))))
    return out


def window_config(window_ms: int, lateness_ms: int, max_future_ms: int, idle_close_ms: int,
                  **lengths: Any) -> Any:
    """The settings' window configuration with the lengths a test sets (the defaults live in settings only)."""
    import dataclasses

    from pipeline.settings import Settings

    return dataclasses.replace(Settings().window.core(), window_ms=window_ms, lateness_ms=lateness_ms,
                               max_future_ms=max_future_ms, idle_close_ms=idle_close_ms, **lengths)


def identity_config(**overrides: Any) -> Any:
    """The settings' identity configuration with the limits and periods a test sets (the defaults live in settings
    only)."""
    import dataclasses

    from pipeline.settings import Settings

    return dataclasses.replace(Settings().identity.core(), **overrides)


def window_lengths(**lengths: int) -> dict[str, int]:
    """PartitionWindows' length arguments from the settings' window configuration, with the ones a test sets."""
    import dataclasses

    from pipeline.settings import Settings

    return dataclasses.replace(Settings().window.core(), **lengths).lengths()  # type: ignore[no-any-return]
