"""Realistic multi-channel touchpoint traffic, as pure Python: journeys of simulated persons, interleaved in
event time. Each yielded dict has the exact shape of the Avro record (v1, or v2 with its optional fields)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

SCENARIOS: dict[str, str] = {
    "banking_app": "A bank's mobile app fails intermittently; users call the contact centre, where a kind agent "
                   "solves it (bad UX, good CX).",
    "hospital_booking": "A hospital's booking site works well, then the visit at the clinic goes badly "
                        "(good UX, bad CX).",
    "mixed": "Both of the above plus ordinary, healthy traffic on all ten channels for three tenants.",
}

Step = dict[str, Any]  # the fields a journey sets on one event; the driver adds id, time, tenant, identifiers
Journey = Iterator[Step]


class Person:
    """Who the journey is about; identifiers appear as the person signs in or buys."""

    def __init__(self, rng: random.Random, tenant: str, *, user: bool, customer: bool) -> None:
        n = rng.getrandbits(40)
        self.tenant = tenant
        self.anonymous_id: str | None = f"dev-{n:010x}"
        self.user_id: str | None = f"{tenant[:1]}u-{n % 10_000_000:07d}" if user else None
        self.customer_id: str | None = f"{tenant[:1]}c-{n % 10_000_000:07d}" if customer else None
        self.session = f"s-{n:010x}"

    def identifiers(self) -> dict[str, str | None]:
        return {"anonymous_id": self.anonymous_id, "user_id": self.user_id, "customer_id": self.customer_id}


def _survey(kind: str, score: int, about: str | None) -> dict[str, Any]:
    low, high = {"CSAT": (1, 5), "NPS": (0, 10), "CES": (1, 7)}[kind]
    return {"kind": kind, "score": max(low, min(high, score)), "scale_min": low, "scale_max": high,
            "about_channel": about}


def _contact(rng: random.Random, *, queue: tuple[int, int], handle: tuple[int, int], resolved: float,
             agent: str) -> dict[str, Any]:
    return {"queue_ms": rng.randint(*queue), "handle_ms": rng.randint(*handle), "first_response_ms": None,
            "resolved": rng.random() < resolved, "escalated": rng.random() < 0.05, "agent_id": agent}


def _vitals(rng: random.Random, lcp: tuple[float, float]) -> dict[str, Any]:
    return {"lcp_ms": round(rng.uniform(*lcp), 1), "inp_ms": round(rng.uniform(40, 180), 1),
            "cls": round(rng.uniform(0.0, 0.08), 3)}


def banking_journey(rng: random.Random) -> tuple[Person, Journey]:
    person = Person(rng, "bank", user=True, customer=True)

    def steps() -> Journey:
        app = {"channel": "MOBILE_APP", "device_class": "MOBILE", "session_id": person.session}
        yield {**app, "event_type": "screen_view", "flow": "login", "attributes": {"screen": "login"}}
        failures = 0
        for flow in ("login", "transfer"):
            for _attempt in range(3):  # intermittent: a retry often works
                failed = rng.random() < 0.3
                failures += failed
                yield {**app, "event_type": "task", "flow": flow, "outcome": "FAILURE" if failed else "SUCCESS",
                       "error_code": rng.choice(("HTTP_503", "TIMEOUT", "HTTP_500")) if failed else None,
                       "duration_ms": rng.randint(4_000, 20_000) if failed else rng.randint(1_500, 6_000)}
                if failed and rng.random() < 0.3:
                    yield {**app, "event_type": "app_error", "flow": flow, "error_code": "E_GATEWAY"}
                if not failed:
                    break
        if failures and rng.random() < 0.5:
            agent = f"agent-{rng.randint(1, 40):02d}"
            yield {"channel": "CONTACT_CENTRE", "event_type": "contact", "flow": "app_problem",
                   "session_id": f"call-{rng.getrandbits(32):08x}", "outcome": "SUCCESS",
                   "duration_ms": rng.randint(180_000, 540_000),
                   "contact": _contact(rng, queue=(15_000, 90_000), handle=(150_000, 480_000), resolved=0.92,
                                       agent=agent), "sentiment": round(rng.uniform(0.3, 0.9), 2)}
            yield {"channel": "SURVEY", "event_type": "survey_response",
                   "survey": _survey("CSAT", rng.choice((4, 5, 5, 5, 4, 3)), "CONTACT_CENTRE")}
            if rng.random() < 0.4:
                yield {"channel": "EMAIL", "event_type": "survey_response",
                       "survey": _survey("NPS", rng.choice((8, 9, 10, 10, 9, 7)), None)}

    return person, steps()


def hospital_journey(rng: random.Random) -> tuple[Person, Journey]:
    person = Person(rng, "hospital", user=False, customer=False)

    def steps() -> Journey:
        web = {"channel": "WEB", "device_class": rng.choice(("DESKTOP", "MOBILE")), "session_id": person.session,
               "flow": "book_appointment"}
        for page in ("/", "/specialties", "/book"):
            yield {**web, "event_type": "page_view", "web_vitals": _vitals(rng, (1_100, 2_000)),
                   "duration_ms": rng.randint(300, 1_200), "attributes": {"path": page}}
        person.user_id = f"hu-{rng.getrandbits(24):07d}"  # signs in to book
        yield {**web, "event_type": "identify"}
        ok = rng.random() < 0.97
        yield {**web, "event_type": "task", "outcome": "SUCCESS" if ok else "FAILURE",
               "error_code": None if ok else "HTTP_502", "duration_ms": rng.randint(40_000, 110_000),
               "rage_clicks": 0}
        if not ok:
            return
        lost = rng.random() < 0.25
        yield {"channel": "STORE", "event_type": "visit", "flow": "appointment",
               "outcome": "FAILURE" if lost else "SUCCESS", "error_code": "appointment_not_found" if lost else None,
               "duration_ms": rng.randint(3_600_000, 10_800_000),
               "attributes": {"site": rng.choice(("north", "central")), "wait_minutes": str(rng.randint(55, 170))}}
        yield {"channel": "EMAIL", "event_type": "survey_response",
               "survey": _survey("CSAT", rng.choice((1, 1, 2, 2, 3, 3, 4)), "STORE"),
               "sentiment": round(rng.uniform(-0.9, -0.2), 2)}
        if rng.random() < 0.2:
            yield {"channel": "HELPDESK", "event_type": "ticket_opened", "flow": "complaint",
                   "contact": {"queue_ms": None, "handle_ms": None, "first_response_ms": rng.randint(3_600_000,
                                                                                                     86_400_000),
                               "resolved": False, "escalated": rng.random() < 0.3, "agent_id": None}}

    return person, steps()


def shop_journey(rng: random.Random) -> tuple[Person, Journey]:
    """Ordinary traffic for a retailer across every channel, with healthy figures."""
    person = Person(rng, "shop", user=rng.random() < 0.6, customer=rng.random() < 0.4)

    def steps() -> Journey:
        if rng.random() < 0.5:
            yield {"channel": "SOCIAL", "event_type": "ad_click", "attributes": {"campaign": "winter"}}
        if rng.random() < 0.4:
            yield {"channel": "EMAIL", "event_type": "email_open", "attributes": {"campaign": "newsletter"}}
        device = rng.choice(("DESKTOP", "MOBILE", "TABLET"))
        channel = "WEB" if device != "MOBILE" or rng.random() < 0.5 else "MOBILE_APP"
        view = "page_view" if channel == "WEB" else "screen_view"
        for _ in range(rng.randint(1, 4)):
            yield {"channel": channel, "event_type": view, "device_class": device, "session_id": person.session,
                   "web_vitals": _vitals(rng, (900, 2_400)), "flow": "browse"}
        ok = rng.random() < 0.95
        yield {"channel": channel, "event_type": "task", "flow": "checkout", "device_class": device,
               "session_id": person.session, "outcome": "SUCCESS" if ok else rng.choice(("FAILURE", "ABANDONED")),
               "error_code": None, "duration_ms": rng.randint(20_000, 90_000)}
        if ok:
            if person.customer_id is None:
                person.customer_id = f"sc-{rng.getrandbits(24):07d}"  # the first purchase makes a customer
            yield {"channel": "BILLING", "event_type": "purchase",
                   "amount": {"minor_units": rng.randint(999, 25_000), "currency": "EUR"}}
        if rng.random() < 0.3:
            yield {"channel": "CHATBOT", "event_type": "contact", "flow": "order_status", "outcome": "SUCCESS",
                   "contact": _contact(rng, queue=(0, 2_000), handle=(30_000, 120_000), resolved=0.85,
                                       agent="bot")}
        if rng.random() < 0.2:
            yield {"channel": "STORE", "event_type": "visit", "flow": "pickup", "outcome": "SUCCESS",
                   "duration_ms": rng.randint(120_000, 600_000)}
        if rng.random() < 0.35:
            yield {"channel": "SURVEY", "event_type": "survey_response",
                   "survey": _survey("CSAT", rng.choice((4, 5, 5, 4, 3)), channel)}
        if rng.random() < 0.2:
            yield {"channel": "SURVEY", "event_type": "survey_response",
                   "survey": _survey("NPS", rng.choice((9, 10, 8, 7, 9, 6)), None)}
        if rng.random() < 0.05:
            yield {"channel": "HELPDESK", "event_type": "ticket_opened", "flow": "returns",
                   "contact": {"queue_ms": None, "handle_ms": None, "first_response_ms": rng.randint(600_000,
                                                                                                     7_200_000),
                               "resolved": None, "escalated": False, "agent_id": None}}

    return person, steps()


JourneyMaker = Callable[[random.Random], tuple[Person, Journey]]
_MIXES: dict[str, tuple[tuple[JourneyMaker, float], ...]] = {
    "banking_app": ((banking_journey, 1.0),),
    "hospital_booking": ((hospital_journey, 1.0),),
    "mixed": ((banking_journey, 0.3), (hospital_journey, 0.3), (shop_journey, 0.4)),
}
_V1_NULLS: dict[str, Any] = {
    "session_id": None, "journey_id": None, "flow": None, "device_class": None, "outcome": None,
    "error_code": None, "duration_ms": None, "survey": None, "contact": None, "web_vitals": None, "amount": None,
}
_V2_ONLY = ("sentiment", "app_version", "rage_clicks")


def generate(scenario: str, count: int, *, seed: int = 0, start_ms: int, events_per_s: float = 1000.0,
             tenant: str | None = None, schema_version: int = 1, concurrent_journeys: int = 200) -> Iterator[dict]:
    """Exactly `count` events, about `events_per_s` per second of event time from `start_ms`."""
    if scenario not in _MIXES:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if schema_version not in (1, 2):
        raise ValueError("schema_version must be 1 or 2")
    rng = random.Random(seed)
    makers = [maker for maker, _ in _MIXES[scenario]]
    weights = [weight for _, weight in _MIXES[scenario]]
    step_ms = 1000.0 / events_per_s
    active: list[tuple[Person, Journey, str]] = []
    clock = float(start_ms)
    last_time = start_ms - 1
    produced = 0
    while produced < count:
        while len(active) < concurrent_journeys:
            person, journey = rng.choices(makers, weights)[0](rng)
            active.append((person, journey, f"j-{rng.getrandbits(40):010x}"))
        slot = rng.randrange(len(active))
        person, journey, journey_id = active[slot]
        step = next(journey, None)
        if step is None:
            active[slot] = active[-1]
            active.pop()
            continue
        clock += step_ms * rng.uniform(0.5, 1.5)
        event_time = max(int(clock), last_time + 1)  # strictly increasing, so every person's order holds
        last_time = event_time
        event = {"event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "event_time": event_time,
                 "channel": step.pop("channel"), "event_type": step.pop("event_type"),
                 "tenant": tenant or person.tenant, "identifiers": person.identifiers(), **_V1_NULLS,
                 "journey_id": journey_id, "attributes": step.pop("attributes", {})}
        extras = {k: step.pop(k) for k in _V2_ONLY if k in step}
        event.update(step)
        if schema_version == 2:
            event["sentiment"] = extras.get("sentiment")
            event["app_version"] = "4.2.1" if event["channel"] == "MOBILE_APP" else None
            event["rage_clicks"] = extras.get("rage_clicks")
        produced += 1
        yield event
