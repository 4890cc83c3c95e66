"""Notification planning (no I/O, time injected): routes, silences, grouping, repeat interval, escalation, and the
webhook payload (Alertmanager's webhook format, version 4, plus a `touchpoint` block).

Planning is deterministic: the same transitions, states and clock give the same notification ids, so an alerter
that takes over re-plans what its predecessor planned and the delivery log tells it what was already sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.core.alerting import AlertEvent, Series, State

NOTIFIED_STATES = (State.FIRING.value, State.RESOLVED.value, State.NO_DATA.value)
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


class RouteError(ValueError):
    """A route, receiver or silence that cannot be used; the message names it and the field."""


@dataclass(frozen=True, slots=True)
class Receiver:
    name: str
    kind: str = "log"  # log or webhook
    url: str = ""
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Escalation:
    after_s: float
    receiver: str


@dataclass(frozen=True, slots=True)
class Route:
    receiver: str
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> accepted values (all labels must match)
    group_by: tuple[str, ...] = ("rule", "tenant")
    repeat_interval_s: float = 4 * 3600.0
    escalate: tuple[Escalation, ...] = ()
    continue_matching: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(name, "") in accepted for name, accepted in self.match)


@dataclass(frozen=True, slots=True)
class Silence:
    silence_id: str
    matchers: tuple[tuple[str, str], ...]
    starts_at_ms: int
    ends_at_ms: int
    created_by: str = ""
    comment: str = ""

    def mutes(self, labels: Mapping[str, str], now_ms: int) -> bool:
        return (self.starts_at_ms <= now_ms < self.ends_at_ms
                and all(labels.get(name) == value for name, value in self.matchers))


@dataclass(frozen=True, slots=True)
class Notification:
    notification_id: str
    receiver: str
    group_key: str
    reason: str  # transition, repeat, escalation, case
    payload: dict[str, Any]
    silenced_by: str = ""
    event_ids: tuple[str, ...] = ()


def parse_receivers(raws: Iterable[Mapping[str, Any]]) -> dict[str, Receiver]:
    receivers: dict[str, Receiver] = {}
    for raw in raws:
        name = str(raw.get("name", ""))
        if not name:
            raise RouteError(f"receiver {dict(raw)!r}: field 'name' is required")
        kind = raw.get("kind", "log")
        if kind not in ("log", "webhook"):
            raise RouteError(f"receiver {name!r}, field 'kind': {kind!r} is not log or webhook")
        url = str(raw.get("url", ""))
        if kind == "webhook" and not url.startswith(("http://", "https://")):
            raise RouteError(f"receiver {name!r}, field 'url': a webhook needs an http(s) URL, got {url!r}")
        unknown = set(raw) - {"name", "kind", "url", "timeout_s"}
        if unknown:
            raise RouteError(f"receiver {name!r}, field {sorted(unknown)[0]!r}: unknown field")
        receivers[name] = Receiver(name, kind, url, float(raw.get("timeout_s", 5.0)))
    return receivers


def parse_routes(raws: Iterable[Mapping[str, Any]], receivers: Mapping[str, Receiver]) -> list[Route]:
    routes = []
    for n, raw in enumerate(raws):
        receiver = str(raw.get("receiver", ""))
        where = f"route {n} ({receiver or 'no receiver'})"
        if receiver not in receivers:
            raise RouteError(f"{where}, field 'receiver': no receiver named {receiver!r}")
        unknown = set(raw) - {"receiver", "match", "group_by", "repeat_interval_s", "escalate", "continue"}
        if unknown:
            raise RouteError(f"{where}, field {sorted(unknown)[0]!r}: unknown field")
        match = raw.get("match", {})
        if not isinstance(match, Mapping):
            raise RouteError(f"{where}, field 'match': must be a table of label = value or [values]")
        escalate = []
        for level in raw.get("escalate", []):
            if level.get("receiver") not in receivers:
                raise RouteError(f"{where}, field 'escalate': no receiver named {level.get('receiver')!r}")
            escalate.append(Escalation(float(level.get("after_s", 900)), str(level["receiver"])))
        routes.append(Route(
            receiver=receiver,
            match=tuple(sorted((str(k), tuple(v) if isinstance(v, list | tuple) else (str(v),))
                               for k, v in match.items())),
            group_by=tuple(raw.get("group_by", ("rule", "tenant"))),
            repeat_interval_s=float(raw.get("repeat_interval_s", 4 * 3600.0)),
            escalate=tuple(sorted(escalate, key=lambda e: e.after_s)),
            continue_matching=bool(raw.get("continue", False)),
        ))
    return routes


def routes_for(labels: Mapping[str, str], routes: Sequence[Route]) -> list[Route]:
    """The routes an alert goes to: the first that matches, and the next ones while a match says continue."""
    chosen = []
    for route in routes:
        if route.matches(labels):
            chosen.append(route)
            if not route.continue_matching:
                break
    return chosen


def _digest(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:24]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def group_key(route: Route, labels: Mapping[str, str]) -> str:
    return "{}:{{{}}}".format(route.receiver, ",".join(f'{k}="{labels.get(k, "")}"' for k in route.group_by))


def alert_of(event: AlertEvent) -> dict[str, Any]:
    """One alert of the webhook payload, as Alertmanager shapes it."""
    status = "resolved" if event.to_state in (State.RESOLVED, State.INACTIVE) else "firing"
    labels = {**event.label_map(), "alertstate": event.to_state}
    return {
        "status": status,
        "labels": labels,
        "annotations": {"summary": event.message, "description": event.message,
                        "values": ", ".join(f"{k}={v:.6g}" for k, v in event.values)},
        "startsAt": iso(event.active_since_ms or event.window_end_ms),
        "endsAt": iso(event.window_end_ms) if status == "resolved" else ZERO_TIME,
        "generatorURL": "",
        "fingerprint": event.fingerprint,
        "touchpoint": {
            "event_id": event.event_id, "from_state": event.from_state, "to_state": event.to_state,
            "cause": event.cause, "window_kind": event.window_kind, "window_start": iso(event.window_start_ms),
            "window_end": iso(event.window_end_ms), "value": event.value, "threshold": event.threshold,
            "values": dict(event.values), "completeness": event.completeness.as_dict(),
        },
    }


def payload(receiver: str, key: str, group_labels: Mapping[str, str], alerts: Sequence[dict[str, Any]],
            reason: str, notification_id: str) -> dict[str, Any]:
    common = dict(alerts[0]["labels"]) if alerts else {}
    for alert in alerts[1:]:
        common = {k: v for k, v in common.items() if alert["labels"].get(k) == v}
    return {
        "version": "4", "groupKey": key, "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver, "groupLabels": dict(group_labels), "commonLabels": common,
        "commonAnnotations": {}, "externalURL": "", "alerts": list(alerts),
        "touchpoint": {"notification_id": notification_id, "reason": reason},
    }


@dataclass(slots=True)
class Planner:
    """Turns transitions and the state of firing series into notifications."""

    routes: Sequence[Route]
    last_sent_ms: dict[str, int]  # group key -> when its last notification was planned (for repeats)

    def transitions(self, events: Sequence[AlertEvent], silences: Sequence[Silence],
                    now_ms: int) -> list[Notification]:
        """One notification per receiver and group for the transitions of a cycle (pending is never sent)."""
        groups: dict[str, tuple[Route, dict[str, str], list[AlertEvent]]] = {}
        for event in events:
            if event.to_state not in NOTIFIED_STATES and not (
                    event.to_state == State.INACTIVE and event.from_state == State.NO_DATA):
                continue
            labels = event.label_map()
            for route in routes_for(labels, self.routes):
                key = group_key(route, labels)
                groups.setdefault(key, (route, {k: labels.get(k, "") for k in route.group_by}, []))[2].append(event)
        out = []
        for key, (route, group_labels, members) in sorted(groups.items()):
            ids = tuple(sorted(e.event_id for e in members))
            nid = _digest(key, *ids)
            loud = [e for e in members if _muted(e.label_map(), silences, now_ms) is None]
            silenced = "" if loud else (_muted(members[0].label_map(), silences, now_ms) or "")
            shown = loud or members
            out.append(Notification(nid, route.receiver, key, "transition",
                                    payload(route.receiver, key, group_labels, [alert_of(e) for e in shown],
                                            "transition", nid), silenced, ids))
            if not silenced:
                self.last_sent_ms[key] = now_ms
        return out

    def follow_ups(self, series: Iterable[Series], last_events: Mapping[str, AlertEvent],
                   silences: Sequence[Silence], now_ms: int) -> list[Notification]:
        """Repeats of groups still firing after their repeat interval, and escalations of firing alerts nobody
        acknowledged in time (each level once per firing spell). Updates the series' escalation levels."""
        out: list[Notification] = []
        repeat: dict[str, tuple[Route, dict[str, str], list[AlertEvent]]] = {}
        for s in series:
            if s.state != State.FIRING or s.fingerprint not in last_events:
                continue
            event = last_events[s.fingerprint]
            labels = event.label_map()
            if _muted(labels, silences, now_ms) is not None:
                continue
            for route in routes_for(labels, self.routes):
                key = group_key(route, labels)
                if not s.acked_by and now_ms - self.last_sent_ms.get(key, now_ms) >= route.repeat_interval_s * 1000:
                    repeat.setdefault(key, (route, {k: labels.get(k, "") for k in route.group_by}, []))[2].append(
                        event)
                for level, escalation in enumerate(route.escalate, start=1):
                    if s.acked_by or s.escalation_level >= level or now_ms - s.since_ms < escalation.after_s * 1000:
                        continue
                    s.escalation_level = level
                    nid = _digest(s.fingerprint, s.since_ms, "escalation", level, escalation.receiver)
                    ekey = f"{escalation.receiver}:escalation:{s.fingerprint}"
                    alert = alert_of(event)
                    alert["labels"]["escalation_level"] = str(level)
                    alert["annotations"]["summary"] = (f"not acknowledged after {escalation.after_s / 60:g} min: "
                                                       f"{event.message}")
                    out.append(Notification(nid, escalation.receiver, ekey, "escalation",
                                            payload(escalation.receiver, ekey, {"fingerprint": s.fingerprint},
                                                    [alert], "escalation", nid), "", (event.event_id,)))
        for key, (route, group_labels, members) in sorted(repeat.items()):
            nid = _digest(key, "repeat", now_ms)
            out.append(Notification(nid, route.receiver, key, "repeat",
                                    payload(route.receiver, key, group_labels, [alert_of(e) for e in members],
                                            "repeat", nid), "", tuple(e.event_id for e in members)))
            self.last_sent_ms[key] = now_ms
        return out


def _muted(labels: Mapping[str, str], silences: Sequence[Silence], now_ms: int) -> str | None:
    for silence in silences:
        if silence.mutes(labels, now_ms):
            return silence.silence_id
    return None


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before retry number `attempt` (1-based): doubling from initial_s, capped at max_s."""
    return float(min(max_s, initial_s * 2 ** max(0, attempt - 1)))
