"""Realistic multi-channel touchpoint traffic, as pure Python (no I/O): journeys of simulated persons across
channels, interleaved in event time. Each yielded dict has the exact shape of the Avro record (v1, or v2 with
its optional fields).

Journeys are time-compressed: 200 persons are mid-journey at once and take turns, so a whole journey (app
failures, the call, the survey) spans about its length x 200 / events_per_s seconds of event time, not hours;
that way one-minute windows see both the UX and the CX side of each scenario.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

SCENARIOS: dict[str, str] = {
    "banking_app": "A bank's mobile app fails intermittently on login and transfers; some users call the contact "
                   "centre, where a kind agent solves it (bad UX, good CX).",
    "hospital_booking": "A hospital's booking site works well, then the clinic visit goes badly: long waits, lost "
                        "appointments, low CSAT, complaints (good UX, bad CX).",
    "mixed": "Both of the above plus ordinary, healthy traffic on all ten channels for the bank, the hospital "
             "and a shop.",
    "conversion": "A shop's signed-in users browse and try tasks; half of them meet failures. Users with clean "
                  "sessions buy more often (true rates in TRUE_RATES).",
    "churn": "A streaming service's customers contact support; half of them get bad service (unresolved, "
             "repeat contacts, detractor scores). They cancel more often (true rates in TRUE_RATES).",
}
# The true rates behind the conversion and churn scenarios: P(buys | UX of the sessions) and P(cancels | service),
# which journeys and the conversion_by_ux / churn_by_service views are to recover.
TRUE_RATES: dict[str, dict[str, float]] = {
    "conversion": {"clean": 0.35, "failures": 0.12},
    "churn": {"good": 0.06, "bad": 0.30},
}

Step = dict[str, Any]  # fields one journey step sets; the driver adds id, time, tenant and identifiers
Journey = Iterator[Step]

# Channels that see the device or cookie id; the others (phone, in person, billing, email...) know a person with
# an account by that account.
_DIGITAL = frozenset({"WEB", "MOBILE_APP", "CHATBOT", "SOCIAL"})
_CONCURRENT_JOURNEYS = 200  # how many persons are mid-journey at once; sets how compressed journeys are
_LATE_SHARE = 0.03  # share of events delivered late (offline app batches, slow channel systems)
_LATE_MAX_MS = 1_000.0  # far below the pipeline's allowed lateness, so late events still count


class Ids:
    """Identifiers unique within a run, and across runs with different seeds (a seeded random run tag)."""

    def __init__(self, rng: random.Random) -> None:
        self.tag = f"{rng.getrandbits(32):08x}"
        self.serial = 0

    def new(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.tag}{self.serial:07x}"


class Person:
    """Who a journey is about. Identifiers appear as the person signs in (user) or buys (customer)."""

    __slots__ = ("anonymous_id", "customer_id", "last_ms", "tenant", "user_id")

    def __init__(self, tenant: str, anonymous_id: str, user_id: str | None = None,
                 customer_id: str | None = None) -> None:
        self.tenant = tenant
        self.anonymous_id = anonymous_id
        self.user_id = user_id
        self.customer_id = customer_id
        self.last_ms = -(2**62)  # time of this person's last event, to keep their own events strictly ordered

    def identifiers(self, channel: str) -> dict[str, str | None]:
        # Without an account, the cookie or device id is all any channel can link the person by (a guest order).
        anonymous = self.anonymous_id if self.user_id is None or channel in _DIGITAL else None
        return {"anonymous_id": anonymous, "user_id": self.user_id, "customer_id": self.customer_id}


def _survey(kind: str, score: int, about: str | None) -> dict[str, Any]:
    low, high = {"CSAT": (1, 5), "NPS": (0, 10), "CES": (1, 7)}[kind]
    return {"kind": kind, "score": max(low, min(high, score)), "scale_min": low, "scale_max": high,
            "about_channel": about}


def _contact(rng: random.Random, *, queue: tuple[int, int] | None, handle: tuple[int, int] | None,
             resolved: bool | None, agent: str | None, first_response: tuple[int, int] | None = None,
             escalated: float = 0.05) -> dict[str, Any]:
    return {"queue_ms": rng.randint(*queue) if queue else None,
            "handle_ms": rng.randint(*handle) if handle else None,
            "first_response_ms": rng.randint(*first_response) if first_response else None,
            "resolved": resolved, "escalated": rng.random() < escalated, "agent_id": agent}


def _timed(step: Step) -> Step:
    # A call or chat lasts its queue plus its handling time, so the figures agree with each other.
    contact = step["contact"]
    step["duration_ms"] = contact["queue_ms"] + contact["handle_ms"]
    return step


def _vitals(rng: random.Random, lcp: tuple[float, float]) -> dict[str, Any]:
    return {"lcp_ms": round(rng.uniform(*lcp), 1), "inp_ms": round(rng.uniform(40.0, 180.0), 1),
            "cls": round(rng.uniform(0.0, 0.06), 3)}


def _sentiment(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


# --- banking_app: intermittent app failures, a kind contact centre -------------------------------------------

_BANK_ERRORS = ("HTTP_503", "TIMEOUT", "HTTP_503", "HTTP_500", "TIMEOUT")
_BANK_APP_FAILURE = 0.3  # per attempt, independent of earlier attempts: that is what makes it intermittent


def banking_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    # An existing bank customer: the app knows only its installation id until a login names the account.
    person = Person("bank", ids.new("dev"))
    account_user, account_customer = ids.new("bank-u"), ids.new("bank-c")
    version = rng.choice(("7.4.2", "7.4.2", "7.5.0"))

    def sign_in() -> None:
        person.user_id, person.customer_id = account_user, account_customer

    def app_session() -> dict[str, Any]:
        return {"channel": "MOBILE_APP", "device_class": "MOBILE", "session_id": ids.new("app-s"),
                "app_version": version}

    def attempts(app: dict[str, Any], flow: str, tries: int, failed_flows: list[str],
                 errors: list[int]) -> Iterator[Step]:
        """Attempts at one task until one works or the person gives up (then the flow joins failed_flows)."""
        if flow == "login":
            person.user_id = account_user  # a login attempt carries the login name, failed or not
        for _ in range(tries):
            if rng.random() < _BANK_APP_FAILURE:
                errors[0] += 1
                error = rng.choice(_BANK_ERRORS)
                yield {**app, "event_type": "task", "flow": flow, "outcome": "FAILURE", "error_code": error,
                       "duration_ms": rng.randint(5_000, 30_000), "rage_clicks": rng.choice((0, 2, 3, 4, 6)),
                       "attributes": {"attempt_error": error}}
                if rng.random() < 0.35:
                    yield {**app, "event_type": rng.choice(("app_error", "app_error", "app_error", "app_crash")),
                           "flow": flow, "error_code": rng.choice(("E_GATEWAY", "E_SESSION_LOST", "E_UPSTREAM")),
                           "rage_clicks": 0}
                continue
            if flow == "login":
                sign_in()
            yield {**app, "event_type": "task", "flow": flow, "outcome": "SUCCESS",
                   "duration_ms": rng.randint(1_500, 8_000), "rage_clicks": 0}
            return
        failed_flows.append(flow)

    def steps() -> Journey:
        app = app_session()
        failed_flows: list[str] = []
        errors = [0]  # failed attempts so far, retried or not
        yield {**app, "event_type": "screen_view", "flow": "login", "rage_clicks": 0,
               "web_vitals": _vitals(rng, (700.0, 2_500.0)), "attributes": {"screen": "login"}}
        yield from attempts(app, "login", rng.randint(2, 3), failed_flows, errors)
        if not failed_flows:  # signed in
            yield {**app, "event_type": "screen_view", "flow": "accounts", "rage_clicks": 0,
                   "web_vitals": _vitals(rng, (700.0, 2_500.0)), "attributes": {"screen": "accounts"}}
            for flow in rng.sample(("transfer", "transfer", "pay_bill", "view_statement"), rng.randint(1, 2)):
                yield {**app, "event_type": "screen_view", "flow": flow, "rage_clicks": 0,
                       "attributes": {"screen": flow}}
                yield from attempts(app, flow, rng.randint(1, 3), failed_flows, errors)
        # Most who gave up on a task call; some who got there after errors do too, and a few others.
        if rng.random() >= (0.6 if failed_flows else 0.2 if errors[0] else 0.02):
            return
        sign_in()  # the agent verifies the caller against the CRM
        reason = f"{failed_flows[-1]}_failed" if failed_flows else "app_error"
        resolved = rng.random() < 0.92
        case = ids.new("case")
        yield _timed({"channel": "CONTACT_CENTRE", "event_type": "contact", "flow": "app_support", "journey_id": case,
                      "session_id": ids.new("call"), "outcome": "SUCCESS" if resolved else "FAILURE",
                      "contact": _contact(rng, queue=(10_000, 90_000), handle=(150_000, 480_000), resolved=resolved,
                                          agent=f"bank-agent-{rng.randint(1, 40):02d}"),
                      "sentiment": _sentiment(rng, 0.4, 0.95) if resolved else _sentiment(rng, -0.1, 0.4),
                      "attributes": {"ivr_menu": "app_support", "reason": reason}})
        if rng.random() < 0.75:
            score = rng.choice((5, 5, 5, 5, 4, 4, 4, 3)) if resolved else rng.choice((2, 3, 4))
            yield {"channel": "SURVEY", "event_type": "survey_response", "journey_id": case,
                   "survey": _survey("CSAT", score, "CONTACT_CENTRE"),
                   "sentiment": _sentiment(rng, 0.3, 0.9) if score >= 4 else _sentiment(rng, -0.4, 0.2),
                   "attributes": {"survey": "post_call", "via": rng.choice(("sms", "ivr"))}}
            if rng.random() < 0.35:
                yield {"channel": "SURVEY", "event_type": "survey_response", "journey_id": case,
                       "survey": _survey("NPS", rng.choice((10, 10, 9, 9, 8, 7, 6)), None),
                       "attributes": {"survey": "post_call"}}
        if resolved and failed_flows and rng.random() < 0.5:
            # Back in the app after the call; the fault is still intermittent, so the retry may fail again.
            app, retry_failed = app_session(), list[str]()
            yield from attempts(app, "login", 2, retry_failed, errors)
            if not retry_failed and failed_flows[-1] != "login":
                yield from attempts(app, failed_flows[-1], 2, retry_failed, errors)

    return person, steps()


# --- hospital_booking: a good booking site, a bad visit --------------------------------------------------------

_SPECIALTIES = ("cardiology", "dermatology", "orthopaedics", "paediatrics", "radiology", "ophthalmology")


def hospital_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    person = Person("hospital", ids.new("ck"))  # a visitor of the booking site until they sign in
    patient_id = ids.new("hosp-u")

    def steps() -> Journey:
        web = {"channel": "WEB", "device_class": rng.choice(("DESKTOP", "DESKTOP", "MOBILE", "TABLET")),
               "session_id": ids.new("web-s"), "flow": "book_appointment", "app_version": "portal-2026.01"}
        specialty = rng.choice(_SPECIALTIES)
        for path in ("/", f"/specialties/{specialty}", "/book"):
            yield {**web, "event_type": "page_view", "web_vitals": _vitals(rng, (1_200.0, 2_000.0)),
                   "duration_ms": rng.randint(250, 900), "rage_clicks": 0, "attributes": {"path": path}}
        person.user_id = patient_id  # signs in to the patient portal (or registers) to book
        yield {**web, "event_type": "identify", "attributes": {"method": rng.choice(("password", "sso"))}}
        booked = False
        for _ in range(2):  # a rare failure is retried once
            booked = rng.random() < 0.97
            yield {**web, "event_type": "task", "outcome": "SUCCESS" if booked else "FAILURE",
                   "error_code": None if booked else rng.choice(("HTTP_502", "SLOT_TAKEN")),
                   "duration_ms": rng.randint(20_000, 60_000), "rage_clicks": 0 if booked else rng.randint(0, 3),
                   "attributes": {"specialty": specialty}}
            if booked:
                break
        if not booked:
            return
        booking = ids.new("bk")
        if rng.random() < 0.5:
            yield {"channel": "EMAIL", "event_type": "email_open", "journey_id": booking,
                   "attributes": {"template": "appointment_reminder"}}
        roll = rng.random()
        outcome = "FAILURE" if roll < 0.2 else "ABANDONED" if roll < 0.28 else "SUCCESS"
        wait_min = rng.randint(55, 170)
        yield {"channel": "STORE", "event_type": "visit", "flow": "appointment", "journey_id": booking,
               "outcome": outcome, "error_code": "appointment_not_found" if outcome == "FAILURE" else None,
               "duration_ms": wait_min * 60_000 + (rng.randint(10, 40) * 60_000 if outcome == "SUCCESS" else 0),
               "attributes": {"site": rng.choice(("north", "central", "riverside")), "department": specialty,
                              "wait_minutes": str(wait_min)}}
        bad_visit = outcome != "SUCCESS"
        if rng.random() < 0.65:
            score = rng.choice((1, 1, 2)) if bad_visit else rng.choice((1, 2, 2, 3, 3, 3, 4, 5))
            yield {"channel": "EMAIL", "event_type": "survey_response", "journey_id": booking,
                   "survey": _survey("CSAT", score, "STORE"),
                   "sentiment": _sentiment(rng, -0.95, -0.4) if score <= 2 else _sentiment(rng, -0.5, 0.3),
                   "attributes": {"survey": "post_visit"}}
        if rng.random() < (0.5 if bad_visit else 0.12):
            ticket = ids.new("tkt")
            yield {"channel": "HELPDESK", "event_type": "ticket_opened", "flow": "complaint", "journey_id": ticket,
                   "contact": _contact(rng, queue=None, handle=None, resolved=None, agent=None,
                                       first_response=(3_600_000, 86_400_000), escalated=0.3),
                   "sentiment": _sentiment(rng, -0.95, -0.5),
                   "attributes": {"topic": "waiting_time" if not bad_visit else "appointment_lost"}}
            if rng.random() < 0.4:
                resolved = rng.random() < 0.6
                yield {"channel": "HELPDESK", "event_type": "ticket_resolved", "flow": "complaint",
                       "journey_id": ticket, "outcome": "SUCCESS" if resolved else "FAILURE",
                       "contact": _contact(rng, queue=None, handle=(600_000, 3_600_000), resolved=resolved,
                                           agent=f"hosp-desk-{rng.randint(1, 8)}", escalated=0.1),
                       "sentiment": _sentiment(rng, -0.6, 0.2)}

    return person, steps()


# --- background: ordinary, healthy traffic on every channel -----------------------------------------------------


def shop_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    """A retailer's shopper: new visitor, returning user or existing customer, across every channel."""
    kind = rng.random()
    person = Person("shop", ids.new("ck"), ids.new("shop-u") if kind >= 0.45 else None,
                    ids.new("shop-c") if kind >= 0.8 else None)

    def steps() -> Journey:
        if rng.random() < 0.35:
            yield {"channel": "SOCIAL", "event_type": "ad_click", "attributes": {"campaign": "winter_sale",
                                                                               "network": "instagram"}}
        elif person.user_id is not None and rng.random() < 0.4:
            yield {"channel": "EMAIL", "event_type": "email_click", "attributes": {"campaign": "newsletter"}}
        device = rng.choice(("DESKTOP", "MOBILE", "MOBILE", "TABLET"))
        channel = "MOBILE_APP" if device == "MOBILE" and rng.random() < 0.5 else "WEB"
        view = "screen_view" if channel == "MOBILE_APP" else "page_view"
        base = {"channel": channel, "device_class": device, "session_id": ids.new("s"),
                "app_version": "5.12.0" if channel == "MOBILE_APP" else "shop-web-88"}
        for _ in range(rng.randint(1, 4)):
            yield {**base, "event_type": view, "flow": "browse", "web_vitals": _vitals(rng, (900.0, 2_400.0)),
                   "duration_ms": rng.randint(200, 1_500), "rage_clicks": 0,
                   "attributes": {"path": rng.choice(("/", "/sale", "/c/shoes", "/c/coats", "/p/42"))}}
        if rng.random() < 0.3:
            return  # just browsing
        if person.user_id is None and rng.random() < 0.6:
            person.user_id = ids.new("shop-u")  # signs up at checkout; others check out as guests
            yield {**base, "event_type": "identify", "attributes": {"method": "signup"}}
        roll = rng.random()
        outcome = "SUCCESS" if roll < 0.94 else "ABANDONED" if roll < 0.98 else "FAILURE"
        yield {**base, "event_type": "task", "flow": "checkout", "outcome": outcome,
               "error_code": "HTTP_500" if outcome == "FAILURE" else None,
               "duration_ms": rng.randint(20_000, 90_000), "rage_clicks": 0}
        if outcome != "SUCCESS":
            return
        order = ids.new("ord")
        if person.customer_id is None:
            person.customer_id = ids.new("shop-c")  # the first purchase makes a customer
        amount = rng.randint(999, 25_000)
        yield {"channel": "BILLING", "event_type": "purchase", "journey_id": order,
               "amount": {"minor_units": amount, "currency": "EUR"}, "attributes": {"payment": "card"}}
        if rng.random() < 0.25:
            resolved = rng.random() < 0.88
            yield _timed({"channel": "CHATBOT", "event_type": "contact", "flow": "order_status", "journey_id": order,
                          "session_id": ids.new("chat"), "outcome": "SUCCESS" if resolved else "FAILURE",
                          "contact": _contact(rng, queue=(0, 2_000), handle=(30_000, 120_000), resolved=resolved,
                                              agent="shop-bot"),
                          "sentiment": _sentiment(rng, 0.0, 0.7)})
        if rng.random() < 0.06:
            yield _timed({"channel": "CONTACT_CENTRE", "event_type": "contact", "flow": "delivery", "journey_id": order,
                          "session_id": ids.new("call"), "outcome": "SUCCESS",
                          "contact": _contact(rng, queue=(15_000, 120_000), handle=(100_000, 360_000), resolved=True,
                                              agent=f"shop-agent-{rng.randint(1, 25):02d}"),
                          "sentiment": _sentiment(rng, 0.2, 0.8)})
        if rng.random() < 0.2:
            yield {"channel": "STORE", "event_type": "visit", "flow": "pickup", "journey_id": order,
                   "outcome": "SUCCESS", "duration_ms": rng.randint(120_000, 600_000),
                   "attributes": {"store": rng.choice(("amsterdam-01", "utrecht-02", "online-locker"))}}
        if rng.random() < 0.3:
            yield {"channel": "SURVEY", "event_type": "survey_response", "journey_id": order,
                   "survey": _survey("CSAT", rng.choice((5, 5, 4, 4, 5, 3)), channel),
                   "sentiment": _sentiment(rng, 0.1, 0.9)}
        if rng.random() < 0.15:
            yield {"channel": "SURVEY", "event_type": "survey_response",
                   "survey": _survey("NPS", rng.choice((10, 9, 9, 8, 7, 10, 6)), None)}
        if rng.random() < 0.05:
            ticket = ids.new("tkt")
            yield {"channel": "HELPDESK", "event_type": "ticket_opened", "flow": "returns", "journey_id": ticket,
                   "contact": _contact(rng, queue=None, handle=None, resolved=None, agent=None,
                                       first_response=(600_000, 7_200_000), escalated=0.02),
                   "sentiment": _sentiment(rng, -0.3, 0.3)}
            yield {"channel": "HELPDESK", "event_type": "ticket_resolved", "flow": "returns", "journey_id": ticket,
                   "outcome": "SUCCESS",
                   "contact": _contact(rng, queue=None, handle=(300_000, 1_200_000), resolved=True,
                                       agent=f"shop-desk-{rng.randint(1, 6)}", escalated=0.0)}
            yield {"channel": "BILLING", "event_type": "refund", "journey_id": order,
                   "amount": {"minor_units": amount, "currency": "EUR"}}
        if rng.random() < 0.04:
            yield {"channel": "BILLING", "event_type": "subscription_started", "flow": "membership",
                   "amount": {"minor_units": 499, "currency": "EUR"}, "attributes": {"plan": "plus_monthly"}}

    return person, steps()


def bank_everyday_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    """The bank beyond its app: prospects on the public site who open an account, customers' emails and bills."""
    prospect = rng.random() < 0.4
    person = Person("bank", ids.new("ck"), None if prospect else ids.new("bank-u"),
                    None if prospect else ids.new("bank-c"))

    def steps() -> Journey:
        if rng.random() < 0.3:
            yield {"channel": "SOCIAL", "event_type": "social_mention", "sentiment": _sentiment(rng, -0.2, 0.8),
                   "attributes": {"network": rng.choice(("x", "linkedin", "facebook"))}}
        web = {"channel": "WEB", "device_class": rng.choice(("DESKTOP", "MOBILE")), "session_id": ids.new("web-s"),
               "app_version": "bank-web-3.9"}
        for path in ("/", rng.choice(("/savings", "/mortgages", "/cards"))):
            yield {**web, "event_type": "page_view", "flow": "explore", "web_vitals": _vitals(rng, (800.0, 2_200.0)),
                   "duration_ms": rng.randint(200, 1_200), "rage_clicks": 0, "attributes": {"path": path}}
        if prospect:
            if rng.random() < 0.5:
                return
            person.user_id = ids.new("bank-u")  # registers online
            yield {**web, "event_type": "identify", "attributes": {"method": "signup"}}
            ok = rng.random() < 0.95
            yield {**web, "event_type": "task", "flow": "open_account", "outcome": "SUCCESS" if ok else "ABANDONED",
                   "duration_ms": rng.randint(120_000, 480_000), "rage_clicks": 0}
            if not ok:
                return
            person.customer_id = ids.new("bank-c")  # the account is opened: now a customer
            yield {"channel": "BILLING", "event_type": "subscription_started", "flow": "current_account",
                   "amount": {"minor_units": 0, "currency": "EUR"}, "attributes": {"plan": "basic"}}
        else:
            yield {"channel": "EMAIL", "event_type": "email_open", "attributes": {"template": "monthly_statement"}}
            yield {"channel": "BILLING", "event_type": "purchase", "flow": "card_payment",
                   "amount": {"minor_units": rng.randint(300, 12_000), "currency": "EUR"},
                   "attributes": {"merchant_category": rng.choice(("grocery", "travel", "fuel"))}}
        if rng.random() < 0.3:
            yield _timed({"channel": "CHATBOT", "event_type": "contact", "flow": "faq", "session_id": ids.new("chat"),
                          "outcome": "SUCCESS",
                          "contact": _contact(rng, queue=(0, 1_000), handle=(20_000, 90_000), resolved=True,
                                              agent="bank-bot"),
                          "sentiment": _sentiment(rng, 0.1, 0.7)})
        if rng.random() < 0.1:
            yield {"channel": "SURVEY", "event_type": "survey_response",
                   "survey": _survey("NPS", rng.choice((9, 10, 8, 7, 9)), None)}

    return person, steps()


def hospital_everyday_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    """The hospital beyond bookings: reminders, questions to the chatbot, paying the bill."""
    person = Person("hospital", ids.new("ck"), ids.new("hosp-u"), ids.new("hosp-c"))

    def steps() -> Journey:
        yield {"channel": "EMAIL", "event_type": "email_open", "attributes": {"template": "newsletter"}}
        if rng.random() < 0.4:
            yield _timed({"channel": "CHATBOT", "event_type": "contact", "flow": "opening_hours",
                          "session_id": ids.new("chat"), "outcome": "SUCCESS",
                          "contact": _contact(rng, queue=(0, 1_000), handle=(15_000, 60_000), resolved=True,
                                              agent="hosp-bot"),
                          "sentiment": _sentiment(rng, 0.0, 0.6)})
        if rng.random() < 0.5:
            yield {"channel": "BILLING", "event_type": "purchase", "flow": "invoice",
                   "amount": {"minor_units": rng.randint(2_500, 38_500), "currency": "EUR"}}
        if rng.random() < 0.1:
            yield _timed({"channel": "CONTACT_CENTRE", "event_type": "contact", "flow": "billing_question",
                          "session_id": ids.new("call"), "outcome": "SUCCESS",
                          "contact": _contact(rng, queue=(20_000, 100_000), handle=(80_000, 280_000), resolved=True,
                                              agent=f"hosp-agent-{rng.randint(1, 12):02d}"),
                          "sentiment": _sentiment(rng, 0.1, 0.6)})
        if rng.random() < 0.15:
            yield {"channel": "SOCIAL", "event_type": "social_mention", "sentiment": _sentiment(rng, -0.3, 0.6),
                   "attributes": {"network": "facebook"}}

    return person, steps()


# --- conversion and churn: experience that changes what people do ---------------------------------------------


def conversion_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    """A signed-in shop user: a web session whose tasks all work (clean) or meet at least one failure; then a
    purchase with the true rate of its class."""
    person = Person("shop", ids.new("ck"), ids.new("shop-u"))
    clean = rng.random() < 0.5

    def steps() -> Journey:
        web = {"channel": "WEB", "device_class": rng.choice(("DESKTOP", "MOBILE")), "session_id": ids.new("s"),
               "app_version": "shop-web-88"}
        for _ in range(rng.randint(1, 3)):
            yield {**web, "event_type": "page_view", "flow": "browse", "duration_ms": rng.randint(200, 1_500),
                   "web_vitals": _vitals(rng, (900.0, 2_400.0)), "rage_clicks": 0,
                   "attributes": {"path": rng.choice(("/", "/sale", "/c/shoes", "/p/42"))}}
        flows = rng.sample(("search", "add_to_cart", "wishlist"), 2)
        failing = -1 if clean else rng.randrange(len(flows))
        for n, flow in enumerate(flows):
            failed = n == failing
            yield {**web, "event_type": "task", "flow": flow, "outcome": "FAILURE" if failed else "SUCCESS",
                   "error_code": "HTTP_500" if failed else None, "duration_ms": rng.randint(1_000, 20_000),
                   "rage_clicks": rng.choice((0, 3, 5)) if failed else 0}
        if rng.random() >= TRUE_RATES["conversion"]["clean" if clean else "failures"]:
            return
        yield {**web, "event_type": "task", "flow": "checkout", "outcome": "SUCCESS",
               "duration_ms": rng.randint(20_000, 90_000), "rage_clicks": 0}
        person.customer_id = ids.new("shop-c")  # the first purchase makes a customer
        order = ids.new("ord")
        yield {"channel": "BILLING", "event_type": "purchase", "journey_id": order,
               "amount": {"minor_units": rng.randint(999, 25_000), "currency": "EUR"}}
        if rng.random() < 0.2:
            yield _timed({"channel": "CHATBOT", "event_type": "contact", "flow": "order_status", "journey_id": order,
                          "session_id": ids.new("chat"), "outcome": "SUCCESS",
                          "contact": _contact(rng, queue=(0, 2_000), handle=(30_000, 120_000), resolved=True,
                                              agent="shop-bot"),
                          "sentiment": _sentiment(rng, 0.0, 0.7)})
        if rng.random() < 0.3:
            yield {"channel": "SURVEY", "event_type": "survey_response", "journey_id": order,
                   "survey": _survey("CSAT", rng.choice((5, 4, 4, 3)), "WEB"), "sentiment": _sentiment(rng, 0.0, 0.9)}

    return person, steps()


def churn_journey(rng: random.Random, ids: Ids) -> tuple[Person, Journey]:
    """A subscriber who contacts support: good service (resolved at once, a good score) or bad (unresolved, a
    repeat contact, a detractor score); then a cancellation with the true rate of its class."""
    person = Person("streaming", ids.new("dev"), ids.new("tv-u"), ids.new("tv-c"))
    good = rng.random() < 0.5

    def steps() -> Journey:
        yield {"channel": "BILLING", "event_type": "subscription_renewed", "flow": "monthly",
               "amount": {"minor_units": 1_299, "currency": "EUR"}}
        app = {"channel": "MOBILE_APP", "device_class": "MOBILE", "session_id": ids.new("app-s"),
               "app_version": "tv-9.1.0"}
        yield {**app, "event_type": "screen_view", "flow": "watch", "rage_clicks": 0,
               "web_vitals": _vitals(rng, (600.0, 1_800.0))}
        yield {**app, "event_type": "task", "flow": "watch", "outcome": "FAILURE", "error_code": "PLAYBACK_ERROR",
               "duration_ms": rng.randint(2_000, 20_000), "rage_clicks": rng.choice((0, 3, 4))}
        case = ids.new("case")
        tries = 1 if good else rng.randint(2, 3)
        for n in range(tries):
            resolved = good or (n == tries - 1 and rng.random() < 0.3)
            yield _timed({"channel": rng.choice(("CONTACT_CENTRE", "CHATBOT")), "event_type": "contact",
                          "flow": "playback_issue", "journey_id": case, "session_id": ids.new("call"),
                          "outcome": "SUCCESS" if resolved else "FAILURE",
                          "contact": _contact(rng, queue=(5_000, 60_000) if good else (120_000, 900_000),
                                              handle=(60_000, 300_000), resolved=resolved,
                                              agent=f"tv-agent-{rng.randint(1, 30):02d}"),
                          "sentiment": _sentiment(rng, 0.2, 0.9) if resolved else _sentiment(rng, -0.9, 0.0)})
        if rng.random() < 0.7:
            score = rng.choice((9, 10, 10)) if good else rng.randint(0, 6)
            yield {"channel": "SURVEY", "event_type": "survey_response", "journey_id": case,
                   "survey": _survey("NPS", score, None)}
        if rng.random() < TRUE_RATES["churn"]["good" if good else "bad"]:
            yield {"channel": "BILLING", "event_type": "subscription_cancelled", "flow": "monthly",
                   "attributes": {"reason": "service" if not good else "price"}}

    return person, steps()


# --- the driver ---------------------------------------------------------------------------------------------

JourneyMaker = Callable[[random.Random, Ids], tuple[Person, Journey]]
_MIXES: dict[str, tuple[tuple[JourneyMaker, float], ...]] = {
    "banking_app": ((banking_journey, 1.0),),
    "hospital_booking": ((hospital_journey, 1.0),),
    "mixed": ((banking_journey, 0.25), (hospital_journey, 0.25), (shop_journey, 0.3),
              (bank_everyday_journey, 0.1), (hospital_everyday_journey, 0.1)),
    "conversion": ((conversion_journey, 1.0),),
    "churn": ((churn_journey, 1.0),),
}
_V1_NULLS: dict[str, Any] = {
    "session_id": None, "journey_id": None, "flow": None, "device_class": None, "outcome": None,
    "error_code": None, "duration_ms": None, "survey": None, "contact": None, "web_vitals": None, "amount": None,
}
_V2_NULLS: dict[str, Any] = {**_V1_NULLS, "sentiment": None, "app_version": None, "rage_clicks": None}
_V2_ONLY = ("sentiment", "app_version", "rage_clicks")
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # version and variant bits of a UUID as an int
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def generate(scenario: str, count: int, *, seed: int = 0, start_ms: int, events_per_s: float = 1000.0,
             tenant: str | None = None, schema_version: int = 1) -> Iterator[dict]:
    """Exactly `count` events of the scenario, about `events_per_s` per second of event time from `start_ms`.

    Deterministic for a seed. Event times rise by 1000/events_per_s ms on average; a few events arrive up to a
    second late, but each person's own events are strictly in time order. `tenant` overrides the tenant of
    every event; `schema_version` 2 adds sentiment, app_version and rage_clicks (3 writes the same with v3).
    """
    if scenario not in _MIXES:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if schema_version not in (1, 2, 3):
        raise ValueError(f"schema_version must be 1, 2 or 3, not {schema_version!r}")
    if count < 0 or not events_per_s > 0:
        raise ValueError("count must be >= 0 and events_per_s > 0")
    rng = random.Random(seed)
    ids = Ids(rng)
    makers = [maker for maker, _ in _MIXES[scenario]]
    weights = [weight for _, weight in _MIXES[scenario]]
    nulls = _V2_NULLS if schema_version >= 2 else _V1_NULLS
    v1 = schema_version == 1
    step_ms = 1000.0 / events_per_s
    random_ = rng.random
    getrandbits = rng.getrandbits
    active: list[tuple[Person, Journey]] = []
    clock = float(start_ms)
    produced = 0
    while produced < count:
        while len(active) < _CONCURRENT_JOURNEYS:
            maker = makers[0] if len(makers) == 1 else rng.choices(makers, weights)[0]
            active.append(maker(rng, ids))
        slot = int(random_() * len(active))
        person, journey = active[slot]
        step = next(journey, None)
        if step is None:  # journey over: the last active one takes its slot
            active[slot] = active[-1]
            active.pop()
            continue
        event_time = int(clock)
        if random_() < _LATE_SHARE:
            event_time = max(start_ms, int(clock - random_() * _LATE_MAX_MS))
        if event_time <= person.last_ms:
            event_time = person.last_ms + 1
        person.last_ms = event_time
        clock += step_ms * (0.5 + random_())  # uniform jitter around the mean gap
        bits = (getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET
        hexa = f"{bits:032x}"
        channel = step["channel"]
        event = {"event_id": f"{hexa[:8]}-{hexa[8:12]}-{hexa[12:16]}-{hexa[16:20]}-{hexa[20:]}",
                 "event_time": event_time, "channel": channel, "event_type": step["event_type"],
                 "tenant": tenant or person.tenant, "identifiers": person.identifiers(channel), **nulls}
        event.update(step)
        if "attributes" not in step:
            event["attributes"] = {}
        if v1:
            for key in _V2_ONLY:
                event.pop(key, None)
        produced += 1
        yield event
