"""Follow-up cases for single experiences (no I/O, time injected): a detractor customer (NPS 0-6, CSAT in the
bottom two boxes, or an escalated contact) opens a case for a queue with an SLA; one open case per person and
reason; a case still open when its SLA passes escalates (once per SLA period)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

REASONS = ("nps_detractor", "csat_detractor", "escalated_contact")


@dataclass(frozen=True, slots=True)
class CaseConfig:
    sla_ms: int = 48 * 3_600_000
    queues: tuple[tuple[str, str], ...] = (("nps_detractor", "cx-follow-up"), ("csat_detractor", "cx-follow-up"),
                                           ("escalated_contact", "support-escalations"))
    reasons: tuple[str, ...] = REASONS

    def queue(self, reason: str) -> str:
        return dict(self.queues).get(reason, "cx-follow-up")


@dataclass(frozen=True, slots=True)
class TouchpointFact:
    """What the cases need of one stored touchpoint."""

    event_id: str
    event_time_ms: int
    tenant: str
    channel: str
    person_id: str
    is_customer: bool
    survey_kind: str | None = None
    survey_score: int | None = None
    survey_scale_min: int | None = None
    survey_scale_max: int | None = None
    escalated: bool = False


def reasons_of(fact: TouchpointFact) -> list[tuple[str, float | None]]:
    """(reason, score) for each reason this touchpoint is a detractor for; only customers count."""
    if not fact.is_customer or not fact.person_id:
        return []
    out: list[tuple[str, float | None]] = []
    score, low, high = fact.survey_score, fact.survey_scale_min, fact.survey_scale_max
    if fact.survey_kind == "NPS" and score is not None:
        # 0-6 of 0-10; on another scale, below the top four answers (as the NPS indicator reads it).
        if score <= (6 if (low, high) in ((0, 10), (None, None)) else (high or 10) - 4):
            out.append(("nps_detractor", float(score)))
    if fact.survey_kind == "CSAT" and score is not None and score <= (low if low is not None else 1) + 1:
        out.append(("csat_detractor", float(score)))
    if fact.escalated:
        out.append(("escalated_contact", None))
    return out


@dataclass(frozen=True, slots=True)
class Case:
    case_id: str
    tenant: str
    person_id: str
    reason: str
    queue: str
    status: str  # open, escalated, closed
    opened_at_ms: int
    sla_due_ms: int
    source_event_id: str
    source_channel: str
    score: float | None = None
    escalation_level: int = 0
    closed_at_ms: int = 0
    closed_by: str = ""
    updated_at_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class CaseChange:
    case: Case
    action: str  # opened, escalated, closed
    detail: str
    actor: str = "alerter"


def case_id(tenant: str, person_id: str, reason: str, source_event_id: str) -> str:
    return hashlib.sha1(f"{tenant}|{person_id}|{reason}|{source_event_id}".encode()).hexdigest()[:20]


class CaseBook:
    """The open cases, keyed by (tenant, person, reason); known ids make re-reading a touchpoint harmless."""

    def __init__(self, config: CaseConfig) -> None:
        self.config = config
        self.open: dict[tuple[str, str, str], Case] = {}
        self.known: set[str] = set()

    def restore(self, cases: Iterable[Case]) -> None:
        for case in cases:
            self.known.add(case.case_id)
            if case.status != "closed":
                self.open[(case.tenant, case.person_id, case.reason)] = case

    def observe(self, facts: Iterable[TouchpointFact], now_ms: int) -> list[CaseChange]:
        changes = []
        for fact in sorted(facts, key=lambda f: (f.event_time_ms, f.event_id)):
            for reason, score in reasons_of(fact):
                if reason not in self.config.reasons:
                    continue
                cid = case_id(fact.tenant, fact.person_id, reason, fact.event_id)
                key = (fact.tenant, fact.person_id, reason)
                if cid in self.known or key in self.open:
                    continue
                case = Case(cid, fact.tenant, fact.person_id, reason, self.config.queue(reason), "open",
                            fact.event_time_ms, fact.event_time_ms + self.config.sla_ms, fact.event_id,
                            fact.channel, score, updated_at_ms=now_ms)
                self.known.add(cid)
                self.open[key] = case
                shown = "" if score is None else f" (score {score:g})"
                changes.append(CaseChange(case, "opened", f"{reason}{shown} on {fact.channel}"))
        return changes

    def tick(self, now_ms: int) -> list[CaseChange]:
        """Escalate open cases past their SLA, then again every SLA period they stay open (one level at a time)."""
        changes = []
        for key, case in sorted(self.open.items()):
            due = case.sla_due_ms if case.escalation_level == 0 else case.updated_at_ms + self.config.sla_ms
            if now_ms < due:
                continue
            level = case.escalation_level + 1
            case = replace(case, status="escalated", escalation_level=level, updated_at_ms=now_ms)
            self.open[key] = case
            overdue = (now_ms - case.sla_due_ms) / 3_600_000
            changes.append(CaseChange(case, "escalated", f"SLA passed {overdue:.1f} h ago (level {level})"))
        return changes

    def close(self, cid: str, actor: str, now_ms: int) -> CaseChange | None:
        for key, case in self.open.items():
            if case.case_id == cid:
                del self.open[key]
                closed = replace(case, status="closed", closed_at_ms=now_ms, closed_by=actor, updated_at_ms=now_ms)
                return CaseChange(closed, "closed", "closed by hand", actor)
        return None


def case_labels(case: Case) -> Mapping[str, str]:
    return {"alertname": "case_sla_breach", "rule": "case_sla_breach", "tenant": case.tenant,
            "channel": case.source_channel, "severity": "warning", "family": "CX", "queue": case.queue,
            "reason": case.reason, "kind": "case"}
