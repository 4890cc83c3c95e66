"""Journeys and person profiles: one person's episodes across channels, and what the stream knows of each person.

A journey is one person's touchpoints that share a `journey_id` (a case, a booking, an order), or, without a
shared one, that follow each other within an inactivity gap, on every channel (an app session, then a call, then
the survey about the call). It closes once the partition's closed horizon (aggregate.PartitionWindows) passes its
last touchpoint plus the gap (plus the longer case gap while it carries a journey_id), so no counted touchpoint can
still join it; then it becomes one `JourneyRow` and is folded into its person's profile (`ProfileRow`).

Only counted touchpoints are fed in (aggregate's fate ON_TIME): a duplicate or a late copy never reaches a journey,
so replays and duplicates never double anything. A journey's key is its first touchpoint's event id, so a journey
rebuilt by a replay is the same row (ReplacingMergeTree). Everything is a deterministic function of the counted
touchpoints in offset order and the horizon; `state()` / `restore()` carry open journeys and profiles through a
checkpoint snapshot.

The effort index (0-100) is defined once here, in the indicator registry's style (EFFORT_COMPONENTS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

from pipeline.core.aggregate import DUPLICATE, LATE, ON_TIME
from pipeline.core.indicators import CONTACT_TYPES, PRODUCT_INTERACTIONS, RAGE_CLICKS

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
SURVEY_CHANNEL = "SURVEY"  # answering a survey is feedback on the journey, not a switch of channel in it
PURCHASE_TYPES = frozenset({"purchase", "subscription_started"})
CANCEL_TYPES = frozenset({"subscription_cancelled"})
SERVICE_RESULTS = frozenset({"contact", "visit", "ticket_resolved", "delivery"})  # touchpoints with an outcome
NO_RESULT_KEEP = 20  # searches with no result kept per profile (the latest)
CUSTOMER_ROLES = frozenset({"customer", "habitual_customer"})


@dataclass(frozen=True, slots=True)
class EffortComponent:
    """One term of the effort index: min(value / cap, 1) x weight, summed and scaled to 0-100."""

    id: str
    name: str
    definition: str
    cap: float  # the value at which this term is at its full weight


EFFORT_COMPONENTS: tuple[EffortComponent, ...] = (
    EffortComponent("switches", "Channel switches", "changes of channel between consecutive touchpoints "
                    "(survey answers excluded)", 3),
    EffortComponent("contacts", "Contacts", "contacts and tickets the person opened", 3),
    EffortComponent("repeat_contacts", "Repeat contacts", "contacts after the first", 2),
    EffortComponent("wait_minutes", "Waiting", "queue time plus time to first response, in minutes", 30),
    EffortComponent("failures", "Failures", "failed tasks, app errors and crashes, failed or abandoned visits, "
                    "contacts and tickets", 5),
    EffortComponent("intermittent", "Intermittency", "1 if the product worked, failed and worked again", 1),
    EffortComponent("rage", "Rage clicks", f"touchpoints with {RAGE_CLICKS} or more rage clicks", 3),
    EffortComponent("unresolved", "Unresolved", "1 if the last contact or ticket with an answer was not resolved",
                    1),
)
DEFAULT_EFFORT_WEIGHTS: Mapping[str, float] = {
    "switches": 15, "contacts": 15, "repeat_contacts": 15, "wait_minutes": 15, "failures": 15, "intermittent": 5,
    "rage": 5, "unresolved": 15,
}
EFFORT_FORMULA = "effort = 100 x sum(weight_c x min(value_c / cap_c, 1)) / sum(weight_c)"


def effort_index(values: Mapping[str, float], weights: Mapping[str, float] = DEFAULT_EFFORT_WEIGHTS) -> float:
    """The journey effort index, 0 (effortless) to 100, rounded to one decimal."""
    total_weight = sum(weights.get(c.id, 0.0) for c in EFFORT_COMPONENTS)
    if total_weight <= 0:
        return 0.0
    score = sum(weights.get(c.id, 0.0) * min(values.get(c.id, 0.0) / c.cap, 1.0) for c in EFFORT_COMPONENTS)
    return round(100.0 * score / total_weight, 1)


def effort_markdown(weights: Mapping[str, float] = DEFAULT_EFFORT_WEIGHTS) -> str:
    lines = ["| component | definition | cap | default weight |", "| --- | --- | --- | --- |"]
    lines += [f"| `{c.id}` | {c.name}: {c.definition} | {c.cap:g} | {weights.get(c.id, 0):g} |"
              for c in EFFORT_COMPONENTS]
    return "\n".join(lines)


def nps_status(score: int, scale_max: int) -> str:
    """Detractor, passive or promoter, as the NPS indicator counts them (9-10, 7-8, 0-6 on 0-10)."""
    return "promoter" if score >= scale_max - 1 else "detractor" if score <= scale_max - 4 else "passive"


@dataclass(frozen=True, slots=True)
class JourneyConfig:
    gap_ms: int = 30 * 60_000  # a journey ends after this much inactivity...
    case_gap_ms: int = DAY_MS  # ...or this much, while it carries a journey_id that a later touchpoint may share
    effort_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EFFORT_WEIGHTS))


class JourneyRow(NamedTuple):
    """One closed journey, as stored in ClickHouse's `journeys` table (the fields are its columns)."""

    tenant: str
    person_id: str
    journey_key: str  # event id of its first touchpoint
    start_ms: int
    end_ms: int  # its last touchpoint
    role_start: str
    role_end: str
    channels: list[str]  # in order, a channel repeated only after another
    journey_ids: list[str]
    touchpoints: int
    channel_switches: int
    contacts: int
    repeat_contacts: int
    wait_ms: int
    failures: int
    product_failures: int
    service_failures: int
    intermittent: int
    rage_touchpoints: int
    resolved: int | None
    survey_kinds: list[str]
    survey_scores: list[int]
    ux_score: float | None  # share of product results that worked, 0-100
    cx_score: float | None  # mean survey score rescaled to 0-100
    nps_status: str
    purchases: int
    first_purchase_ms: int  # 0 when none
    cancellations: int
    effort: float
    source_partition: int


JOURNEY_COLUMNS: tuple[str, ...] = JourneyRow._fields


class ProfileRow(NamedTuple):
    """A person's profile as of their last closed journey (ClickHouse `person_profiles`)."""

    tenant: str
    person_id: str
    updated_ms: int  # end of the last journey folded in: the row's version
    journeys: int
    role: str
    role_path: list[str]
    role_since_ms: list[int]
    contact_channel: str  # preferred: most contacts started and surveys answered there ('' when none)
    contact_channel_n: int
    contact_hour: int | None  # UTC hour of day with most of them
    contact_hour_n: int
    contact_n: int  # contacts and surveys behind the two preferences
    last_touch_ms: int
    last_touch_channel: str
    last_touch_event_type: str
    last_touch_ok: int | None
    last_journey_effort: float
    last_journey_ux: float | None
    last_journey_cx: float | None
    pre_purchase_ux: float | None
    pre_purchase_ux_n: int
    pre_purchase_cx: float | None
    pre_purchase_cx_n: int
    post_purchase_ux: float | None
    post_purchase_ux_n: int
    post_purchase_cx: float | None
    post_purchase_cx_n: int
    nps_score: int | None
    nps_status: str
    nps_at_ms: int | None
    no_result_searches: list[str]
    source_partition: int


PROFILE_COLUMNS: tuple[str, ...] = ProfileRow._fields
# Rows are built once per closed journey: tuple.__new__ skips the named tuple's keyword-checking constructor.
_new_journey_row: Any = tuple.__new__
_new_profile_row: Any = tuple.__new__


class _Journey:
    """One open journey, folded touchpoint by touchpoint. Its containers exist only once needed (most journeys keep
    one channel, one role and no case): fewer objects to allocate, and fewer for the garbage collector to walk."""

    __slots__ = ("anchor", "cancellations", "cases", "channel", "channels", "contact_hours", "contact_places",
                 "contacts", "failures", "first_purchase", "key", "last", "nps", "owner", "person", "product_bad",
                 "product_ok", "purchases", "rage", "resolved", "role", "role_at", "roles", "searches",
                 "service_failures", "since", "start", "state", "surveys", "switches", "tenant", "touch_at",
                 "touch_channel", "touch_ok", "touch_type", "touchpoints", "wait")

    def __init__(self, owner: tuple[str, str], key: str, event_time: int) -> None:
        self.owner = owner  # (tenant, person): the key of its person's open journeys and profile
        self.tenant, self.person = owner
        self.key = key
        self.start = self.last = event_time
        self.cases: list[str] | None = None
        self.channel: str | None = None  # the last channel of `channels`
        self.channels: list[str] | None = None  # in order, a channel repeated only after another; None: [channel]
        self.anchor: str | None = None  # the last channel of `channels` that is not the survey channel
        self.role: str | None = None  # the role as of its last touchpoint...
        self.role_at = event_time  # ...since then, while it has had one role
        self.roles: list[tuple[str, int]] | None = None  # (role, since) each time it changes; None: one role
        self.touchpoints = self.switches = self.contacts = self.wait = self.failures = 0
        self.service_failures = self.rage = self.purchases = self.cancellations = 0
        self.product_ok = self.product_bad = 0
        self.state = 0  # product results: 0 none yet, 1 worked, 2 worked then failed, 3 intermittent
        self.resolved: int | None = None
        self.surveys: list[tuple[str, int, int, int]] | None = None  # (kind, score, scale min, scale max)
        self.nps: tuple[int, int, int] | None = None  # (time, score, scale max) of the latest NPS
        self.contact_places: dict[str, int] | None = None  # channel -> contacts started and surveys answered
        self.contact_hours: dict[int, int] | None = None
        # the last touch: time, channel, event type, whether it went well
        self.touch_at, self.touch_channel, self.touch_type = event_time, "", ""
        self.touch_ok: int | None = None
        self.searches: list[str] | None = None
        self.since: int | None = None  # customer since, as of its last touchpoint
        self.first_purchase: int | None = None

    def add(self, event: dict[str, Any], event_time: int) -> None:  # noqa: C901 (one pass over the fields)
        self.touchpoints += 1
        if event_time > self.last:
            self.last = event_time
        elif event_time < self.start:
            self.start = event_time
        channel, event_type = event["channel"], event["event_type"]
        role = event.get("role") or ""
        if role != self.role:
            if self.role is None:
                self.role_at = event_time
            elif self.roles is None:
                self.roles = [(self.role, self.role_at), (role, event_time)]
            else:
                self.roles.append((role, event_time))
            self.role = role
        since = event.get("customer_since_ms")
        if since is not None:
            self.since = since
        if channel != self.channel:
            if channel != SURVEY_CHANNEL:
                if self.anchor is not None and self.anchor != channel:
                    self.switches += 1
                self.anchor = channel
            if self.channel is not None:
                if self.channels is None:
                    self.channels = [self.channel, channel]
                else:
                    self.channels.append(channel)
            self.channel = channel
        outcome = event.get("outcome")
        ok: int | None = None if outcome is None else 1 if outcome == "SUCCESS" else 0
        rage = event.get("rage_clicks")
        if rage is not None and rage >= RAGE_CLICKS:
            self.rage += 1
        if event_type in PRODUCT_INTERACTIONS:
            if event_type == "task":
                if outcome == "SUCCESS":
                    self._product(True)
                elif outcome == "FAILURE":
                    self._product(False)
            elif event_type == "app_error" or event_type == "app_crash":
                ok = 0
                self._product(False)
            attributes = event.get("attributes")
            if attributes:
                results = attributes.get("results")
                if results is not None and results.strip() == "0":
                    query = attributes.get("query") or event.get("flow") or ""
                    if query:
                        if self.searches is None:
                            self.searches = []
                        self.searches.append(query)
        else:
            contact = event.get("contact")
            if contact is not None:
                for wait in (contact.get("queue_ms"), contact.get("first_response_ms")):
                    if wait is not None:
                        self.wait += wait
                resolved = contact.get("resolved")
                if resolved is not None:
                    self.resolved = ok = int(resolved)
            if event_type in SERVICE_RESULTS and (outcome == "FAILURE" or outcome == "ABANDONED"):
                self.failures += 1
                self.service_failures += 1
            if event_type in CONTACT_TYPES:
                self.contacts += 1
                self._place(channel, event_time)
            elif event_type == "survey_response":
                survey = event.get("survey")
                if survey is not None:
                    score, low, high = survey["score"], survey["scale_min"], survey["scale_max"]
                    if self.surveys is None:
                        self.surveys = []
                    self.surveys.append((survey["kind"], score, low, high))
                    ok = int(score >= high - 1) if survey["kind"] != "CES" else int(score >= high - 2)
                    if survey["kind"] == "NPS" and (self.nps is None or event_time >= self.nps[0]):
                        self.nps = (event_time, score, high)
                    self._place(channel, event_time)
            elif event_type in PURCHASE_TYPES:
                self.purchases += 1
                if self.first_purchase is None or event_time < self.first_purchase:
                    self.first_purchase = event_time
            elif event_type in CANCEL_TYPES:
                self.cancellations += 1
        if event_time >= self.touch_at:
            self.touch_at, self.touch_channel, self.touch_type, self.touch_ok = event_time, channel, event_type, ok
        journey_id = event.get("journey_id")
        if journey_id is not None:
            if self.cases is None:
                self.cases = [journey_id]
            elif journey_id not in self.cases:
                self.cases.append(journey_id)

    def role_changes(self) -> list[tuple[str, int]]:
        """(role, since) each time it changed, the first since the journey's first touchpoint."""
        if self.roles is not None:
            return self.roles
        return [] if self.role is None else [(self.role, self.role_at)]

    def channel_list(self) -> list[str]:
        if self.channels is not None:
            return self.channels
        return [] if self.channel is None else [self.channel]

    def _product(self, worked: bool) -> None:
        if worked:
            self.product_ok += 1
            if self.state == 2:
                self.state = 3
            elif self.state == 0:
                self.state = 1
        else:
            self.product_bad += 1
            self.failures += 1
            if self.state == 1:
                self.state = 2

    def _place(self, channel: str, event_time: int) -> None:
        places, hours = self.contact_places, self.contact_hours
        if places is None or hours is None:
            places, hours = self.contact_places, self.contact_hours = {}, {}
        places[channel] = places.get(channel, 0) + 1
        hour = event_time % DAY_MS // HOUR_MS
        hours[hour] = hours.get(hour, 0) + 1

    def row(self, partition: int, terms: list[tuple[float, float]], total_weight: float) -> JourneyRow:
        """The closed journey's row; it takes over the journey's lists (a closed journey is not used again)."""
        contacts, wait, failures, rage = self.contacts, self.wait / 60_000, self.failures, self.rage
        repeat = contacts - 1 if contacts > 1 else 0
        effort = 0.0
        if total_weight > 0:  # effort_index, unrolled over EFFORT_COMPONENTS in order (the hot path of closing)
            (w0, c0), (w1, c1), (w2, c2), (w3, c3), (w4, c4), (w5, _), (w6, c6), (w7, _) = terms
            switches = self.switches
            score = (w0 * (switches / c0 if switches < c0 else 1.0) + w1 * (contacts / c1 if contacts < c1 else 1.0)
                     + w2 * (repeat / c2 if repeat < c2 else 1.0) + w3 * (wait / c3 if wait < c3 else 1.0)
                     + w4 * (failures / c4 if failures < c4 else 1.0) + (w5 if self.state == 3 else 0.0)
                     + w6 * (rage / c6 if rage < c6 else 1.0) + (w7 if self.resolved == 0 else 0.0))
            effort = round(100.0 * score / total_weight, 1)
        results = self.product_ok + self.product_bad
        ux = round(100.0 * self.product_ok / results, 1) if results else None
        surveys = self.surveys
        if surveys:
            kinds, scores, cx = [s[0] for s in surveys], [s[1] for s in surveys], self.cx_score()
        else:
            kinds, scores, cx = [], [], None
        nps = "" if self.nps is None else nps_status(self.nps[1], self.nps[2])
        role = self.role or ""
        return _new_journey_row(JourneyRow, (
            self.tenant, self.person, self.key, self.start, self.last,
            role if self.roles is None else self.roles[0][0], role,
            self.channel_list(),
            self.cases or [],
            self.touchpoints, self.switches, contacts, repeat, self.wait,
            failures, self.product_bad, self.service_failures, int(self.state == 3), rage, self.resolved,
            kinds, scores, ux, cx, nps, self.purchases, self.first_purchase or 0, self.cancellations, effort,
            partition))

    def ux_score(self) -> float | None:
        results = self.product_ok + self.product_bad
        return None if not results else round(100.0 * self.product_ok / results, 1)

    def cx_score(self) -> float | None:
        scaled = [100.0 * (score - low) / (high - low) for _, score, low, high in self.surveys or () if high > low]
        return None if not scaled else round(sum(scaled) / len(scaled), 1)


_NO_SCORES: tuple[float, ...] = (0.0, 0, 0.0, 0, 0.0, 0, 0.0, 0)  # a profile's scores before any UX or CX score


class _Profile:
    # Immutable tuples of numbers and strings where possible: the garbage collector stops tracking those, and
    # profiles live as long as the worker.
    __slots__ = ("hours", "journeys", "last", "nps", "places", "roles", "scores", "searches", "updated")

    def __init__(self) -> None:
        self.journeys = 0
        self.updated = 0
        self.roles: tuple[tuple[str, int], ...] = ()
        self.places: dict[str, int] | None = None
        self.hours: dict[int, int] | None = None
        self.last: tuple[int, str, str, int | None, float, float | None, float | None] = (0, "", "", None, 0.0, None,
                                                                                         None)
        # before the first purchase: ux sum, ux n, cx sum, cx n; then the same after it
        self.scores: tuple[float, ...] = _NO_SCORES
        self.nps: tuple[int, int, int] | None = None
        self.searches: list[str] | None = None

    def fold(self, journey: _Journey, row: JourneyRow) -> None:
        self.journeys += 1
        if journey.last > self.updated:
            self.updated = journey.last
        if journey.roles is None:  # the usual journey, with one role
            if journey.role is not None and (not self.roles or self.roles[-1][0] != journey.role):
                self.roles = (*self.roles, (journey.role, journey.role_at))
        else:
            for role, at in journey.roles:
                if not self.roles or self.roles[-1][0] != role:
                    self.roles = (*self.roles, (role, at))
        if journey.contact_places and journey.contact_hours:
            places = self.places if self.places is not None else {}
            hours = self.hours if self.hours is not None else {}
            for channel, n in journey.contact_places.items():
                places[channel] = places.get(channel, 0) + n
            for hour, n in journey.contact_hours.items():
                hours[hour] = hours.get(hour, 0) + n
            self.places, self.hours = places, hours
        if journey.touch_at >= self.last[0]:
            self.last = (journey.touch_at, journey.touch_channel, journey.touch_type, journey.touch_ok, row.effort,
                         row.ux_score, row.cx_score)
        since = journey.since
        ux, cx = row.ux_score, row.cx_score
        if ux is not None or cx is not None:
            scores = list(self.scores)
            side = 0 if since is None or journey.start < since else 4
            if ux is not None:
                scores[side] += ux
                scores[side + 1] += 1
            if cx is not None:
                scores[side + 2] += cx
                scores[side + 3] += 1
            self.scores = tuple(scores)
        if journey.nps is not None and (self.nps is None or journey.nps[0] >= self.nps[0]):
            self.nps = journey.nps
        if journey.searches:
            self.searches = ((self.searches or []) + journey.searches)[-NO_RESULT_KEEP:]

    def row(self, tenant: str, person: str, partition: int) -> ProfileRow:
        places = self.places
        if places:
            channel, channel_n = _preferred(places)
            hour, hour_n = _preferred(self.hours or {})
            contact_n = sum(places.values())
        else:
            channel, channel_n, hour, hour_n, contact_n = "", 0, None, 0, 0
        at, last_channel, last_type, last_ok, effort, ux, cx = self.last
        scores: tuple[Any, ...] = self.scores
        if scores is _NO_SCORES:  # no journey with a UX or CX score yet
            scores = (None, 0, None, 0, None, 0, None, 0)
        else:
            pre_ux, pre_ux_n, pre_cx, pre_cx_n, post_ux, post_ux_n, post_cx, post_cx_n = scores
            scores = (round(pre_ux / pre_ux_n, 1) if pre_ux_n else None, int(pre_ux_n),
                      round(pre_cx / pre_cx_n, 1) if pre_cx_n else None, int(pre_cx_n),
                      round(post_ux / post_ux_n, 1) if post_ux_n else None, int(post_ux_n),
                      round(post_cx / post_cx_n, 1) if post_cx_n else None, int(post_cx_n))
        roles, nps = self.roles, self.nps
        if len(roles) == 1:
            role, since = roles[0]
            role_path, role_since = [role], [since]
        else:
            role = roles[-1][0] if roles else ""
            role_path, role_since = [r for r, _ in roles], [t for _, t in roles]
        if nps is None:
            nps_score, status, nps_at = None, "", None
        else:
            nps_score, status, nps_at = nps[1], nps_status(nps[1], nps[2]), nps[0]
        return _new_profile_row(ProfileRow, (
            tenant, person, self.updated, self.journeys, role, role_path, role_since, channel, channel_n, hour,
            hour_n, contact_n, at, last_channel, last_type, last_ok, effort, ux, cx, *scores,
            nps_score, status, nps_at, list(self.searches) if self.searches else [], partition))


def _preferred(counts: Mapping[Any, int]) -> tuple[Any, int]:
    """The most frequent key and its count; ties go to the smallest key, so the choice is deterministic."""
    if not counts:
        return None, 0
    if len(counts) == 1:
        return next(iter(counts.items()))
    key = min(counts, key=lambda k: (-counts[k], k))
    return key, counts[key]


def _mean(total: float, n: float) -> float | None:
    return None if not n else round(total / n, 1)


class PartitionJourneys:
    """Open journeys and profiles of the persons seen on one partition.

    It follows the partition's event time as aggregate.PartitionWindows does (watermark = max event time - allowed
    lateness over the touchpoints that are not late; closed horizon = the watermark rounded down to a pane start),
    touchpoint by touchpoint, so journeys close at the same point of the stream whatever the batches."""

    def __init__(self, partition: int, config: JourneyConfig, window_ms: int, lateness_ms: int,
                 watermark_ms: int = -(2**62)) -> None:
        self.partition = partition
        self.config = config
        self.window_ms, self.lateness_ms = window_ms, lateness_ms
        self.gap_ms = config.gap_ms
        self.watermark = watermark_ms
        # (tenant, person) -> the person's open journey, or their open journeys (oldest first) when more than one
        self.open: dict[tuple[str, str], _Journey | list[_Journey]] = {}
        self.cases: dict[tuple[str, str], _Journey] = {}  # (tenant, journey_id) -> the open journey carrying it
        self.profiles: dict[tuple[str, str], _Profile] = {}
        self._closed_before = watermark_ms - watermark_ms % window_ms
        self.rows: list[JourneyRow] = []  # closed since the last drain
        self.changed: set[tuple[str, str]] = set()  # persons whose profile changed since the last drain
        weights = config.effort_weights
        self._terms = [(float(weights.get(c.id, 0.0)), c.cap) for c in EFFORT_COMPONENTS]
        self._total_weight = sum(weight for weight, _ in self._terms)

    def add(self, event: dict[str, Any], counted: bool = True) -> None:
        """One touchpoint that is not late (in offset order): folded into its person's journey when counted (a
        duplicate is not), and its time moves the watermark."""
        self.add_all((event,), (ON_TIME if counted else DUPLICATE,))

    def add_all(self, events: Sequence[dict[str, Any]], fates: Sequence[int]) -> None:
        """Touchpoints in offset order with their fates in the windows (aggregate's ON_TIME, LATE, DUPLICATE): a
        counted one is folded into its person's journey, a duplicate only moves the watermark, a late one is
        skipped (the windows did not count it, nor move their watermark)."""
        open_journeys, cases, gap, lateness = self.open, self.cases, self.gap_ms, self.lateness_ms
        watermark = self.watermark
        for event, fate in zip(events, fates, strict=True):
            if fate == LATE:
                continue
            event_time = event["event_time"]
            if fate == ON_TIME:
                tenant = event["tenant"]
                journey_id = event.get("journey_id")
                case = None if journey_id is None else (tenant, journey_id)
                journey = None if case is None else cases.get(case)
                if journey is None:
                    key = (tenant, event["person_id"])
                    found = open_journeys.get(key)
                    if type(found) is _Journey and event_time - found.last < gap and found.start - event_time < gap:
                        journey = found  # the usual case: the person's one open journey goes on
                    else:
                        journey = self._journey_of(key, found, event_time, event["event_id"])
                    if case is not None:  # (a journey found by its case already carries it)
                        cases[case] = journey
                journey.add(event, event_time)
            if event_time - lateness > watermark:
                self.advance(event_time - lateness)
                watermark = self.watermark

    def advance(self, watermark_ms: int) -> None:
        """Event time moves on (a touchpoint, or an idle partition): close what the new horizon passes."""
        if watermark_ms > self.watermark:
            self.watermark = watermark_ms
            horizon = watermark_ms - watermark_ms % self.window_ms
            if horizon > self._closed_before:
                self.close(horizon)

    def drain(self) -> tuple[list[JourneyRow], dict[tuple[str, str], ProfileRow]]:
        """Journeys closed since the last drain, and the current rows of the profiles they changed."""
        rows, self.rows = self.rows, []
        profiles = {person: self.profiles[person].row(person[0], person[1], self.partition)
                    for person in self.changed if person in self.profiles}
        self.changed = set()
        return rows, profiles

    def _journey_of(self, key: tuple[str, str], found: _Journey | list[_Journey] | None, event_time: int,
                    event_id: str) -> _Journey:
        """The person's latest open journey within a gap of the touchpoint, or a new one it starts."""
        gap = self.gap_ms
        if found is not None:
            for candidate in reversed(_journeys_in(found)):
                if event_time - candidate.last < gap and candidate.start - event_time < gap:
                    return candidate
        journey = _Journey(key, event_id, event_time)
        if found is None:
            self.open[key] = journey
        elif isinstance(found, _Journey):
            self.open[key] = [found, journey]
        else:
            found.append(journey)
        return journey

    def close(self, horizon_ms: int) -> None:
        """Journeys whose last touchpoint plus gap the closed horizon reached become rows and are folded into their
        persons' profiles."""
        if horizon_ms <= self._closed_before:
            return
        self._closed_before = horizon_ms
        gap, case_gap = self.config.gap_ms, max(self.config.case_gap_ms, self.config.gap_ms)
        open_journeys = self.open
        closing: list[_Journey] = []
        ended: list[tuple[str, str]] = []  # persons without an open journey any more
        for key, found in open_journeys.items():
            if isinstance(found, _Journey):
                if found.last + (case_gap if found.cases else gap) <= horizon_ms:
                    closing.append(found)
                    ended.append(key)
                continue
            still = [j for j in found if j.last + (case_gap if j.cases else gap) > horizon_ms]
            if len(still) == len(found):
                continue
            closing += [j for j in found if j.last + (case_gap if j.cases else gap) <= horizon_ms]
            if still:
                open_journeys[key] = still[0] if len(still) == 1 else still
            else:
                ended.append(key)
        for key in ended:
            del open_journeys[key]
        # Profiles fold journeys in the order they ended: by (last, key), as two stable sorts (no tuple per journey).
        closing.sort(key=_key_of)
        closing.sort(key=_last_of)
        terms, total_weight, rows, changed = self._terms, self._total_weight, self.rows, self.changed
        cases, profiles, partition = self.cases, self.profiles, self.partition
        for journey in closing:
            if journey.cases is not None:
                for case in journey.cases:
                    if cases.get((journey.tenant, case)) is journey:
                        del cases[(journey.tenant, case)]
            row = journey.row(partition, terms, total_weight)
            rows.append(row)
            person = journey.owner
            profile = profiles.get(person)
            if profile is None:
                profile = profiles[person] = _Profile()
            profile.fold(journey, row)
            changed.add(person)

    def forget(self, person_ids: Iterable[str]) -> None:
        """Erasure: drop the persons' open journeys and profiles."""
        gone = set(person_ids)
        for key in [k for k in self.open if k[1] in gone]:
            found = self.open.pop(key)
            for journey in _journeys_in(found):
                for case in journey.cases or ():
                    self.cases.pop((journey.tenant, case), None)
        for key in [k for k in self.profiles if k[1] in gone]:
            del self.profiles[key]

    def state(self) -> dict[str, Any]:
        """Open journeys and profiles as plain lists and dicts (for a checkpoint snapshot)."""
        journeys = [[_journey_state(j) for j in _journeys_in(found)]
                    for found in self.open.values()]
        profiles = [[tenant, person, _profile_state(p)] for (tenant, person), p in self.profiles.items()]
        return {"clock": [self.watermark, self._closed_before], "journeys": journeys, "profiles": profiles}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.watermark, self._closed_before = state["clock"]
        self.open.clear()
        self.cases.clear()
        for found in state["journeys"]:
            journeys = [_journey_from(s) for s in found]
            self.open[journeys[0].owner] = journeys[0] if len(journeys) == 1 else journeys
            for journey in journeys:
                for case in journey.cases or ():
                    self.cases[(journey.tenant, case)] = journey
        self.profiles = {(tenant, person): _profile_from(s) for tenant, person, s in state["profiles"]}

    def __len__(self) -> int:
        return sum(1 if isinstance(found, _Journey) else len(found) for found in self.open.values())


def _journeys_in(found: _Journey | list[_Journey]) -> list[_Journey]:
    """A person's open journeys, oldest first, from what PartitionJourneys.open holds for them."""
    return [found] if isinstance(found, _Journey) else found


# A journey in a snapshot: these fields in this order (the layout of the first snapshots with journeys).
_JOURNEY_FIELDS = ("cancellations", "cases", "channels", "contact_hours", "contact_places", "contacts", "failures",
                   "first_purchase", "last", "last_touch", "nps", "product_bad", "product_ok", "purchases", "rage",
                   "resolved", "roles", "searches", "service_failures", "since", "state", "surveys", "switches",
                   "touchpoints", "wait")
_PROFILE_FIELDS = _Profile.__slots__
_key_of, _last_of = attrgetter("key"), attrgetter("last")


def _journey_state(journey: _Journey) -> list[Any]:
    values = []
    for name in _JOURNEY_FIELDS:
        if name == "channels":
            value: Any = journey.channel_list()
        elif name == "roles":
            value = journey.role_changes()
        elif name == "last_touch":
            value = (journey.touch_at, journey.touch_channel, journey.touch_type, journey.touch_ok)
        else:
            value = getattr(journey, name)
        if isinstance(value, dict):
            value = [[k, v] for k, v in value.items()]  # JSON keys are strings; hours are ints
        values.append(value)
    return [journey.tenant, journey.person, journey.key, journey.start, values]


def _journey_from(state: list[Any]) -> _Journey:
    tenant, person, key, start, values = state
    journey = _Journey((tenant, person), key, start)
    for name, value in zip(_JOURNEY_FIELDS, values, strict=True):
        if name == "channels":
            channels = list(value)
            journey.channel = channels[-1] if channels else None
            journey.channels = channels if len(channels) > 1 else None
            journey.anchor = next((c for c in reversed(channels) if c != SURVEY_CHANNEL), None)
        elif name == "roles":
            roles = [(r, t) for r, t in value]
            if roles:
                journey.role, journey.role_at = roles[-1][0], roles[0][1]
            journey.roles = roles if len(roles) > 1 else None
        elif name == "last_touch":
            journey.touch_at, journey.touch_channel, journey.touch_type, journey.touch_ok = value
        else:
            if name in ("contact_places", "contact_hours") and value is not None:
                value = {k: v for k, v in value}
            elif name == "surveys" and value is not None:
                value = [tuple(s) for s in value]
            elif name == "nps" and value is not None:
                value = tuple(value)
            setattr(journey, name, value)
    return journey


def _profile_state(profile: _Profile) -> list[Any]:
    values = []
    for name in _PROFILE_FIELDS:
        value = getattr(profile, name)
        if isinstance(value, dict):
            value = [[k, v] for k, v in value.items()]
        values.append(value)
    return values


def _profile_from(values: list[Any]) -> _Profile:
    profile = _Profile()
    for name, value in zip(_PROFILE_FIELDS, values, strict=True):
        if name in ("places", "hours") and value is not None:
            value = {k: v for k, v in value}
        elif name == "roles":
            value = tuple((r, t) for r, t in value)
        elif name in ("nps", "last", "scores") and value is not None:
            value = tuple(value)
        setattr(profile, name, value)
    return profile
