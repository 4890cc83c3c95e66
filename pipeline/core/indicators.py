"""The indicator registry: one place defines each CX, CS and UX indicator, and the stream (aggregate), the batch
reference (tests/reference.py) and the documentation (docs/indicators.md) all read it.

Every observation has weight 1: a cell's `count` is the number of observations and its `total` the sum of the
observed values, so value = total / count for ratios (values 0 or 1) and means; a quantile indicator also counts
its values into a mergeable sketch (pipeline/core/sketch.py). Per-partition and per-window cells therefore add
up exactly.

Event indicators observe one counted event at a time (`observe(event) -> value | None`) and are computed in
"1m" panes and "15m" hopping windows. Session indicators observe one closed per-person session
(`observe(session) -> values`) and are computed in "session" windows.

`python -m pipeline.core.indicators --markdown` prints the catalogue as docs/indicators.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Event = dict[str, Any]


class Family(StrEnum):
    CX = "CX"  # the whole journey across touchpoints
    CS = "CS"  # customer support: single interactions where someone has a problem (part of CX)
    UX = "UX"  # the interaction with the product itself


class Kind(StrEnum):
    RATIO = "ratio"  # share of observations with value 1
    MEAN = "mean"  # mean of the observed values
    QUANTILE = "quantile"  # a quantile of the observed values, from the sketch


DIMENSIONS: tuple[str, ...] = ("channel", "tenant", "role", "flow", "device_class")
EVENT_WINDOWS: tuple[str, ...] = ("1m", "15m")
SESSION_WINDOWS: tuple[str, ...] = ("session",)
SESSION_DIMENSIONS: tuple[str, ...] = ("tenant", "role")
ALL_CHANNELS = "ALL"  # the channel of session cells: a session spans channels

PRODUCT_INTERACTIONS = frozenset({"page_view", "screen_view", "task", "app_error", "app_crash"})
CONTACT_TYPES = frozenset({"contact", "ticket_opened"})  # a person reaching out to support
REPEAT_WINDOW_MS = 7 * 24 * 3_600_000
RAGE_CLICKS = 3  # clicks on one element within one second that count as rage
APDEX_DEFAULT_T_MS = 500
# Apdex T per flow (time on task a person is satisfied with); flows not listed use APDEX_DEFAULT_T_MS.
DEFAULT_APDEX_T_MS: Mapping[str, int] = {
    "login": 4_000, "transfer": 10_000, "pay_bill": 10_000, "view_statement": 5_000, "checkout": 60_000,
    "book_appointment": 45_000, "open_account": 300_000,
}
# Service level targets when an event carries no attributes["sla_target_ms"]: wait (first_response_ms, else
# queue_ms) allowed per channel.
DEFAULT_SLA_TARGET_MS: Mapping[str, int] = {
    "CONTACT_CENTRE": 60_000, "CHATBOT": 30_000, "EMAIL": 86_400_000, "HELPDESK": 86_400_000,
    "SOCIAL": 3_600_000, "STORE": 900_000,
}
WEB_VITAL_BANDS: Mapping[str, tuple[float, float]] = {  # (good at most, poor above), per web.dev
    "lcp_ms": (2_500.0, 4_000.0), "inp_ms": (200.0, 500.0), "cls": (0.1, 0.25),
}


@dataclass(slots=True)
class SessionSummary:
    """What a closed per-person session tells the session indicators (built by aggregate and by the reference)."""

    channels: set[str] = field(default_factory=set)
    issues: dict[str, int] = field(default_factory=dict)  # journey_id -> contacts in it (contact, ticket_opened)
    outcomes: list[tuple[int, str, bool]] = field(default_factory=list)  # (time, event id, ok) of product results
    crashed: bool = False
    product: bool = False  # had a product interaction


@dataclass(frozen=True, slots=True)
class Indicator:
    id: str
    family: Family
    name: str
    definition: str
    formula: str
    unit: str
    kind: Kind
    fed_by: tuple[str, ...]  # event types that feed it
    observe: Callable[[Event], float | None] | None = None  # event indicators
    observe_session: Callable[[SessionSummary], list[float]] | None = None  # session indicators
    q: float = 0.0  # the quantile of a quantile indicator
    group: str = ""  # indicators of one group are observed together by GROUPS[group] in the stream (speed)
    dimensions: tuple[str, ...] = DIMENSIONS
    windows: tuple[str, ...] = EVENT_WINDOWS

    @property
    def per_session(self) -> bool:
        return self.observe_session is not None


def note_in_session(session: SessionSummary, event: Event) -> None:
    """Fold one counted event into its person's session (stream and reference share this)."""
    event_type = event["event_type"]
    session.channels.add(event["channel"])
    if event_type in CONTACT_TYPES:
        journey = event.get("journey_id")
        if journey is not None:
            session.issues[journey] = session.issues.get(journey, 0) + 1
    elif event_type in PRODUCT_INTERACTIONS:
        session.product = True
        if event_type == "task":
            outcome = event.get("outcome")
            if outcome == "SUCCESS" or outcome == "FAILURE":  # an abandoned attempt says nothing of the product
                session.outcomes.append((event["event_time"], event["event_id"], outcome == "SUCCESS"))
        elif event_type != "page_view" and event_type != "screen_view":  # app_error, app_crash
            session.outcomes.append((event["event_time"], event["event_id"], False))
            if event_type == "app_crash":
                session.crashed = True


def merge_sessions(into: SessionSummary, other: SessionSummary) -> None:
    """Two open sessions of a person that an event bridges become one."""
    into.channels |= other.channels
    for journey, n in other.issues.items():
        into.issues[journey] = into.issues.get(journey, 0) + n
    into.outcomes += other.outcomes
    into.crashed = into.crashed or other.crashed
    into.product = into.product or other.product


def observation(indicator: Indicator, event: Event) -> tuple[str, float] | None:
    """(channel, value) an event indicator takes from an event, or None: the registry's meaning, one at a time."""
    if indicator.observe is None or event["event_type"] not in indicator.fed_by:
        return None
    value = indicator.observe(event)
    return None if value is None else (channel_of(event), value)


def channel_of(event: Event) -> str:
    """The channel an event's observations are about: a survey answer counts for the channel it was about."""
    if event["event_type"] == "survey_response":
        survey = event.get("survey")
        if survey is not None and survey.get("about_channel"):
            return survey["about_channel"]
    return event["channel"]


# --- CX: surveys and sentiment -----------------------------------------------------------------------------


def _survey(event: Event, kind: str) -> dict[str, Any] | None:
    survey = event.get("survey")
    return survey if survey is not None and survey["kind"] == kind else None


def _csat(event: Event) -> float | None:
    survey = _survey(event, "CSAT")
    # Top-two-box: 4-5 on the usual 1-5 scale, the two best answers on any other scale.
    return None if survey is None else float(survey["score"] >= survey["scale_max"] - 1)


def _nps(event: Event) -> float | None:
    survey = _survey(event, "NPS")
    if survey is None:
        return None
    score, top = survey["score"], survey["scale_max"]
    # On 0-10: promoters 9-10 count +100, detractors 0-6 count -100, so the mean is the NPS in points.
    return 100.0 if score >= top - 1 else -100.0 if score <= top - 4 else 0.0


def _ces_mean(event: Event) -> float | None:
    survey = _survey(event, "CES")
    return None if survey is None else float(survey["score"])


def _ces_easy(event: Event) -> float | None:
    survey = _survey(event, "CES")
    # 5-7 on the 1-7 scale: the top three answers, on any scale.
    return None if survey is None else float(survey["score"] >= survey["scale_max"] - 2)


def _sentiment(event: Event) -> float | None:
    return event.get("sentiment")


# --- CS: contacts and tickets ------------------------------------------------------------------------------


def _contact(event: Event) -> dict[str, Any] | None:
    return event.get("contact")


def _fcr(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None or contact["resolved"] is None:
        return None
    previous = event.get("previous_contact_ms")
    first = previous is None or event["event_time"] - previous > REPEAT_WINDOW_MS
    return float(contact["resolved"] and first)


def _first_response(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None or contact["first_response_ms"] is None:
        return None
    return float(contact["first_response_ms"])


def _resolution_time(event: Event) -> float | None:
    duration = event.get("duration_ms")
    if duration is not None:
        return float(duration)
    contact = event.get("contact")
    if contact is None or contact["handle_ms"] is None:
        return None
    return float(contact["handle_ms"])


def _handle_time(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None or contact["handle_ms"] is None:
        return None
    return float(contact["handle_ms"])


def _sla_breach(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None:
        return None
    wait = contact["first_response_ms"]
    if wait is None:
        wait = contact["queue_ms"]
        if wait is None:
            return None
    target = (event.get("attributes") or {}).get("sla_target_ms")
    if target is None:
        default = DEFAULT_SLA_TARGET_MS.get(event["channel"])
        if default is None:
            return None
        return float(wait > default)
    try:
        return float(wait > int(target))
    except ValueError:
        return None  # a malformed target says nothing about the service level


def _escalated(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None or contact["escalated"] is None:
        return None
    return float(contact["escalated"])


def _repeat_contact(event: Event) -> float | None:
    previous = event.get("previous_contact_ms")
    return float(previous is not None and event["event_time"] - previous <= REPEAT_WINDOW_MS)


def _queue_abandoned(event: Event) -> float | None:
    contact = event.get("contact")
    if contact is None or contact["queue_ms"] is None:
        return None
    return float(event.get("outcome") == "ABANDONED")


# --- UX: the product ----------------------------------------------------------------------------------------


def _task_success(event: Event) -> float | None:
    outcome = event.get("outcome")
    return None if outcome is None else float(outcome == "SUCCESS")


def _time_on_task(event: Event) -> float | None:
    duration = event.get("duration_ms")
    if duration is None or event.get("outcome") != "SUCCESS":
        return None
    return float(duration)


_ERROR_TYPES = frozenset({"app_error", "app_crash"})


def _error(event: Event) -> float | None:
    return float(event["event_type"] in _ERROR_TYPES or event.get("error_code") is not None
                 or event.get("outcome") == "FAILURE")


def _apdex(t_ms: Mapping[str, int], default_t_ms: int) -> Callable[[Event], float | None]:
    def apdex(event: Event) -> float | None:
        duration, outcome = event.get("duration_ms"), event.get("outcome")
        if duration is None or outcome is None:
            return None
        if outcome != "SUCCESS":
            return 0.0  # a failed or abandoned attempt frustrates whatever it took
        t = t_ms.get(event.get("flow") or "", default_t_ms)
        return 1.0 if duration <= t else 0.5 if duration <= 4 * t else 0.0

    return apdex


def _vital(name: str) -> Callable[[Event], float | None]:
    def vital(event: Event) -> float | None:
        vitals = event.get("web_vitals")
        return None if vitals is None else vitals[name]

    return vital


def _vital_band(name: str, good: bool) -> Callable[[Event], float | None]:
    good_max, poor_above = WEB_VITAL_BANDS[name]

    def band(event: Event) -> float | None:
        vitals = event.get("web_vitals")
        if vitals is None:
            return None
        value = vitals[name]
        if value is None:
            return None
        return float(value <= good_max) if good else float(value > poor_above)

    return band


def _rage(event: Event) -> float | None:
    clicks = event.get("rage_clicks")
    return None if clicks is None else float(clicks >= RAGE_CLICKS)


def _abandoned(event: Event) -> float | None:
    outcome = event.get("outcome")
    return None if outcome is None else float(outcome == "ABANDONED")


def _no_result(event: Event) -> float | None:
    results = (event.get("attributes") or {}).get("results")
    if results is None:
        return None
    return float(results.strip() == "0")


# --- per-person sessions ------------------------------------------------------------------------------------


def _channels_used(session: SessionSummary) -> list[float]:
    return [float(len(session.channels))]


def _contacts_per_issue(session: SessionSummary) -> list[float]:
    return [float(n) for _, n in sorted(session.issues.items())]


def _crash_free(session: SessionSummary) -> list[float]:
    return [float(not session.crashed)] if session.product else []


def _intermittent(session: SessionSummary) -> list[float]:
    if not session.outcomes:
        return []
    seen_success = failed_after = False
    for _, _, ok in sorted(session.outcomes):
        if ok and failed_after:
            return [1.0]  # success, failure(s), success: the product failed and then worked again
        if ok:
            seen_success = True
        elif seen_success:
            failed_after = True
    return [0.0]


_TASK = ("task",)
_VIEWS = ("page_view", "screen_view")
_PRODUCT = tuple(sorted(PRODUCT_INTERACTIONS))
_CONTACTS = ("contact", "ticket_opened", "ticket_resolved")
_SENTIMENT = ("contact", "social_mention", "survey_response", "ticket_opened", "ticket_resolved")


_LCP_GOOD, _LCP_POOR = WEB_VITAL_BANDS["lcp_ms"]
_INP_GOOD, _INP_POOR = WEB_VITAL_BANDS["inp_ms"]
_CLS_GOOD, _CLS_POOR = WEB_VITAL_BANDS["cls"]


def _web_vitals(event: Event) -> tuple[float | None, ...] | None:
    """The nine web-vital indicators at once, in GROUPS order: the same values as their own observers."""
    vitals = event.get("web_vitals")
    if vitals is None:
        return None
    lcp, inp, cls = vitals["lcp_ms"], vitals["inp_ms"], vitals["cls"]
    return (
        *((None, None, None) if lcp is None else (lcp, float(lcp <= _LCP_GOOD), float(lcp > _LCP_POOR))),
        *((None, None, None) if inp is None else (inp, float(inp <= _INP_GOOD), float(inp > _INP_POOR))),
        *((None, None, None) if cls is None else (cls, float(cls <= _CLS_GOOD), float(cls > _CLS_POOR))),
    )


# group -> (member ids in the order the group's observer returns their values, the observer)
GROUPS: dict[str, tuple[tuple[str, ...], Callable[[Event], tuple[float | None, ...] | None]]] = {
    "web_vitals": (tuple(f"{short}_{what}" for short in ("lcp", "inp", "cls")
                         for what in ("p75", "good_share", "poor_share")), _web_vitals),
}


def _vital_indicators(name: str, label: str, unit: str) -> tuple[Indicator, ...]:
    good, poor = WEB_VITAL_BANDS[name]
    field_name = f"web_vitals.{name}"
    short = name.split("_")[0]
    return (
        Indicator(
            id=f"{short}_p75", family=Family.UX, name=f"{label} p75",
            definition=f"75th percentile of {label} ({field_name}) of page and screen views that measured it.",
            formula=f"quantile(0.75)({field_name})", unit=unit, kind=Kind.QUANTILE, q=0.75, fed_by=_VIEWS,
            observe=_vital(name), group="web_vitals",
        ),
        Indicator(
            id=f"{short}_good_share", family=Family.UX, name=f"{label} good share",
            definition=f"Share of measured page and screen views whose {label} is in the good band "
                       f"(at most {good:g} {unit}).",
            formula=f"count({field_name} <= {good:g}) / count({field_name})", unit="ratio", kind=Kind.RATIO,
            fed_by=_VIEWS, observe=_vital_band(name, good=True), group="web_vitals",
        ),
        Indicator(
            id=f"{short}_poor_share", family=Family.UX, name=f"{label} poor share",
            definition=f"Share of measured page and screen views whose {label} is in the poor band "
                       f"(above {poor:g} {unit}).",
            formula=f"count({field_name} > {poor:g}) / count({field_name})", unit="ratio", kind=Kind.RATIO,
            fed_by=_VIEWS, observe=_vital_band(name, good=False), group="web_vitals",
        ),
    )


def catalogue(apdex_t_ms: Mapping[str, int] = DEFAULT_APDEX_T_MS,
              apdex_default_t_ms: int = APDEX_DEFAULT_T_MS) -> tuple[Indicator, ...]:
    """Every indicator, with Apdex thresholds per flow from the settings."""
    apdex_flows = ", ".join(f"{flow} {t:g} ms" for flow, t in sorted(apdex_t_ms.items()))
    return (
        # CX
        Indicator(
            id="nps", family=Family.CX, name="Net Promoter Score (NPS)",
            definition="Promoters (9-10 on 0-10) minus detractors (0-6), in points, over NPS answers; on another "
                       "scale the top two answers promote and all below the top four detract. Counted for the "
                       "channel the question was about.",
            formula="100 * (count(score >= 9) - count(score <= 6)) / count(*)", unit="points", kind=Kind.MEAN,
            fed_by=("survey_response",), observe=_nps,
        ),
        Indicator(
            id="csat", family=Family.CX, name="Customer satisfaction (CSAT)",
            definition="Share of CSAT answers in the top two boxes (4-5 on a 1-5 scale), attributed to the "
                       "channel the question was about.",
            formula="count(score >= scale_max - 1) / count(*)", unit="ratio", kind=Kind.RATIO,
            fed_by=("survey_response",), observe=_csat,
        ),
        Indicator(
            id="ces_mean", family=Family.CX, name="Customer effort score (CES), mean",
            definition="Mean CES answer (1-7, 7 = very easy), for the channel the question was about.",
            formula="sum(score) / count(*)", unit="score", kind=Kind.MEAN,
            fed_by=("survey_response",), observe=_ces_mean,
        ),
        Indicator(
            id="ces_easy_share", family=Family.CX, name="Customer effort score (CES), % 5-7",
            definition="Share of CES answers in the top three boxes (5-7 on a 1-7 scale).",
            formula="count(score >= scale_max - 2) / count(*)", unit="ratio", kind=Kind.RATIO,
            fed_by=("survey_response",), observe=_ces_easy,
        ),
        Indicator(
            id="sentiment", family=Family.CX, name="Sentiment",
            definition="Mean sentiment (-1 negative to 1 positive) of conversations, tickets, social mentions and "
                       "survey answers that carry one (v2 events).",
            formula="sum(sentiment) / count(sentiment)", unit="score", kind=Kind.MEAN,
            fed_by=_SENTIMENT, observe=_sentiment,
        ),
        # CS
        Indicator(
            id="fcr", family=Family.CS, name="First contact resolution (FCR)",
            definition="Share of contacts and tickets with a known resolution that were resolved by that contact "
                       "and had no earlier contact by the same person (any channel) in the 7 days before.",
            formula="count(resolved and no contact in the previous 7 days) / count(resolved is not null)",
            unit="ratio", kind=Kind.RATIO, fed_by=_CONTACTS, observe=_fcr,
        ),
        Indicator(
            id="first_response_time", family=Family.CS, name="First response time, median",
            definition="Median time to first reply (contact.first_response_ms) on asynchronous channels.",
            formula="quantile(0.5)(first_response_ms)", unit="ms", kind=Kind.QUANTILE, q=0.5,
            fed_by=_CONTACTS, observe=_first_response,
        ),
        Indicator(
            id="resolution_time", family=Family.CS, name="Resolution time, median",
            definition="Median time to resolve a ticket: duration_ms of ticket_resolved events (opened to "
                       "resolved), or contact.handle_ms when the channel does not send a duration.",
            formula="quantile(0.5)(coalesce(duration_ms, handle_ms))", unit="ms", kind=Kind.QUANTILE, q=0.5,
            fed_by=("ticket_resolved",), observe=_resolution_time,
        ),
        Indicator(
            id="aht", family=Family.CS, name="Average handle time (AHT)",
            definition="Mean agent handling time (talk plus after-contact work, contact.handle_ms) of contacts.",
            formula="sum(handle_ms) / count(handle_ms)", unit="ms", kind=Kind.MEAN,
            fed_by=("contact",), observe=_handle_time,
        ),
        Indicator(
            id="sla_breach_rate", family=Family.CS, name="SLA breach rate",
            definition="Share of contacts and opened tickets whose wait (first_response_ms, else queue_ms) exceeds "
                       "the service level target: attributes['sla_target_ms'] when the channel sends it, else a "
                       "default per channel (" + ", ".join(
                           f"{c} {t / 1000:g} s" for c, t in sorted(DEFAULT_SLA_TARGET_MS.items())) + ").",
            formula="count(wait > target) / count(wait is not null)", unit="ratio", kind=Kind.RATIO,
            fed_by=("contact", "ticket_opened"), observe=_sla_breach,
        ),
        Indicator(
            id="escalation_rate", family=Family.CS, name="Escalation rate",
            definition="Share of contacts and tickets escalated to another tier or team (contact.escalated).",
            formula="count(escalated) / count(escalated is not null)", unit="ratio", kind=Kind.RATIO,
            fed_by=_CONTACTS, observe=_escalated,
        ),
        Indicator(
            id="repeat_contact_rate", family=Family.CS, name="Repeat contact rate",
            definition="Share of contacts and opened tickets whose person had contacted support before, on any "
                       "channel, within the 7 days before (previous_contact_ms, from the enrich step).",
            formula="count(event_time - previous_contact_ms <= 7 d) / count(*)", unit="ratio", kind=Kind.RATIO,
            fed_by=("contact", "ticket_opened"), observe=_repeat_contact,
        ),
        Indicator(
            id="queue_abandonment", family=Family.CS, name="Queue abandonment",
            definition="Share of queued contacts (contact.queue_ms present: contact centre, chat) the person "
                       "abandoned before being served (outcome ABANDONED).",
            formula="count(outcome = 'ABANDONED') / count(queue_ms is not null)", unit="ratio", kind=Kind.RATIO,
            fed_by=("contact",), observe=_queue_abandoned,
        ),
        # UX
        Indicator(
            id="task_success_rate", family=Family.UX, name="Task success rate",
            definition="Share of product task attempts whose outcome is SUCCESS.",
            formula="count(outcome = 'SUCCESS') / count(outcome is not null)", unit="ratio", kind=Kind.RATIO,
            fed_by=_TASK, observe=_task_success,
        ),
        Indicator(
            id="time_on_task", family=Family.UX, name="Time on task, median",
            definition="Median duration_ms of successful task attempts.",
            formula="quantile(0.5)(duration_ms) where outcome = 'SUCCESS'", unit="ms", kind=Kind.QUANTILE,
            q=0.5, fed_by=_TASK, observe=_time_on_task,
        ),
        Indicator(
            id="error_rate", family=Family.UX, name="Error rate",
            definition="Share of product interactions (page/screen views, tasks, app errors and crashes) that "
                       "met an error: an error_code, a FAILURE outcome, or an app_error/app_crash event.",
            formula="count(error) / count(*)", unit="ratio", kind=Kind.RATIO, fed_by=_PRODUCT, observe=_error,
        ),
        Indicator(
            id="apdex", family=Family.UX, name="Apdex",
            definition="Apdex of task attempts with a duration: satisfied (successful within T) count 1, "
                       "tolerating (successful within 4T) 0.5, frustrated (slower, failed or abandoned) 0. T per "
                       f"flow: {apdex_flows}; other flows {apdex_default_t_ms} ms.",
            formula="(satisfied + tolerating / 2) / count(*)", unit="ratio", kind=Kind.MEAN,
            fed_by=_TASK, observe=_apdex(dict(apdex_t_ms), apdex_default_t_ms),
        ),
        *_vital_indicators("lcp_ms", "Largest Contentful Paint (LCP)", "ms"),
        *_vital_indicators("inp_ms", "Interaction to Next Paint (INP)", "ms"),
        *_vital_indicators("cls", "Cumulative Layout Shift (CLS)", "score"),
        Indicator(
            id="rage_click_rate", family=Family.UX, name="Rage clicks",
            definition=f"Share of product interactions that report rage_clicks (v2) with {RAGE_CLICKS} or more "
                       "clicks on one element within one second.",
            formula=f"count(rage_clicks >= {RAGE_CLICKS}) / count(rage_clicks is not null)", unit="ratio",
            kind=Kind.RATIO, fed_by=_PRODUCT, observe=_rage,
        ),
        Indicator(
            id="funnel_abandonment", family=Family.UX, name="Funnel and form abandonment",
            definition="Share of task attempts (a funnel or form: checkout, booking, sign-up) the person "
                       "abandoned (outcome ABANDONED).",
            formula="count(outcome = 'ABANDONED') / count(outcome is not null)", unit="ratio", kind=Kind.RATIO,
            fed_by=_TASK, observe=_abandoned,
        ),
        Indicator(
            id="search_no_result_rate", family=Family.UX, name="Searches with no result",
            definition="Share of `search` events with no result; the contract has no field for it, so channels "
                       "send the number of results as attributes['results'].",
            formula="count(attributes['results'] = '0') / count(attributes['results'])", unit="ratio",
            kind=Kind.RATIO, fed_by=("search",), observe=_no_result,
        ),
        # per-person sessions
        Indicator(
            id="channels_per_session", family=Family.CX, name="Channels used per session",
            definition="Mean number of distinct channels a person used in one session (events of one person "
                       "without an inactivity gap).",
            formula="sum(distinct channels) / count(sessions)", unit="channels", kind=Kind.MEAN,
            fed_by=("*",), observe_session=_channels_used, dimensions=SESSION_DIMENSIONS,
            windows=SESSION_WINDOWS,
        ),
        Indicator(
            id="contacts_per_issue", family=Family.CS, name="Contacts per issue",
            definition="Mean number of support contacts (contact, ticket_opened) per issue, an issue being a "
                       "journey_id with contacts in the session; contacts without a journey_id are not counted.",
            formula="count(contacts) / count(distinct journey_id)", unit="contacts", kind=Kind.MEAN,
            fed_by=("contact", "ticket_opened"), observe_session=_contacts_per_issue,
            dimensions=SESSION_DIMENSIONS, windows=SESSION_WINDOWS,
        ),
        Indicator(
            id="crash_free_sessions", family=Family.UX, name="Crash-free sessions",
            definition="Share of sessions with a product interaction in which the app never crashed (no "
                       "app_crash event).",
            formula="count(sessions without app_crash) / count(sessions with product interactions)",
            unit="ratio", kind=Kind.RATIO, fed_by=_PRODUCT, observe_session=_crash_free,
            dimensions=SESSION_DIMENSIONS, windows=SESSION_WINDOWS,
        ),
        Indicator(
            id="intermittency", family=Family.UX, name="Intermittency",
            definition="Share of sessions with product results (task outcomes, app errors and crashes) in which "
                       "a failure came between two successes, in event time: the product failed, then worked.",
            formula="count(sessions with success, failure, success) / count(sessions with product results)",
            unit="ratio", kind=Kind.RATIO, fed_by=("app_crash", "app_error", "task"),
            observe_session=_intermittent, dimensions=SESSION_DIMENSIONS, windows=SESSION_WINDOWS,
        ),
    )


REGISTRY: tuple[Indicator, ...] = catalogue()
BY_ID: dict[str, Indicator] = {indicator.id: indicator for indicator in REGISTRY}


def markdown(indicators: tuple[Indicator, ...] = REGISTRY) -> str:
    """The catalogue as a Markdown page (docs/indicators.md is this text)."""
    lines = [
        "# Indicators",
        "",
        "Generated from `pipeline/core/indicators.py` by `python -m pipeline.core.indicators --markdown`; "
        "do not edit by hand.",
        "",
        "Every observation has weight 1: a cell holds `count` (observations) and `total` (sum of the observed "
        "values), so value = total / count for ratios and means; quantile indicators also carry a mergeable "
        "sketch (relative error 1 %). Event indicators are computed in 1-minute panes and 15-minute hopping "
        "windows per channel, tenant, role, flow and device class; session indicators per tenant and role in "
        "per-person session windows (channel `ALL`).",
        "",
    ]
    for family in Family:
        members = [i for i in indicators if i.family == family]
        lines += [f"## {family.value}", ""]
        for i in members:
            kind = f"quantile q={i.q:g}" if i.kind == Kind.QUANTILE else i.kind.value
            lines += [
                f"### `{i.id}`: {i.name}", "",
                i.definition, "",
                f"- formula: `{i.formula}`",
                f"- unit: {i.unit}; kind: {kind}",
                f"- fed by: {', '.join(f'`{t}`' for t in i.fed_by)}",
                f"- dimensions: {', '.join(i.dimensions)}",
                f"- windows: {', '.join(i.windows)}",
                "",
            ]
    from pipeline.core.journeys import EFFORT_FORMULA, effort_markdown  # journeys builds on this registry

    lines += [
        "## Journey effort index", "",
        "How hard one journey (a person's touchpoints across channels, see docs/clickhouse.md) was for the person, "
        "0 (effortless) to 100, in `journeys.effort`. Each component counts up to its cap; the weights are "
        "settings (`[journeys] effort_weights`).", "",
        f"- formula: `{EFFORT_FORMULA}`, rounded to one decimal",
        "- unit: points 0-100; kind: per journey", "",
        effort_markdown(), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m pipeline.core.indicators --markdown")
    sys.stdout.write(markdown())
