"""Step 3, enrich: who each touchpoint belongs to, and their role as of its time.

Each event's identifiers are linked to one another and resolved to one person in the identity graph
(pipeline/core/identity.py); the facts the event implies (seen, uses the product, bought, cancelled, contacted
support) are added to that person. What changed is collected as operations for the shared identity log, so the
other workers' replicas learn it too, and as audit records, person aliases and role transitions for storage.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.identity import (
    CANCEL_EVENTS,
    CONTACT_EVENTS,
    KINDS,
    LINK_EVENTS,
    PURCHASE_EVENTS,
    USE_EVENTS,
    AuditRecord,
    BatchedState,
    Fact,
    FactKind,
    Forget,
    Forgotten,
    GraphState,
    IdentityConfig,
    IdentityGraph,
    Operation,
    Role,
    RoleTransition,
    Unmerge,
    make_link,
    person_id_of,
    role_timeline,
)


def identifiers_of(ids: dict[str, Any], blocked: frozenset[str]) -> list[str]:
    """The event's usable identifiers as "kind:value", strongest first; blocked values never identify anyone."""
    found = []
    for kind in KINDS:
        value = ids.get(kind)
        if value is not None and value.strip().lower() not in blocked:
            found.append(kind + ":" + value)
    return found


def _fact_kind(event_type: str, channel: str, identifiers: list[str]) -> FactKind | None:
    if event_type in PURCHASE_EVENTS:
        return FactKind.PURCHASE
    if event_type in CANCEL_EVENTS:
        return FactKind.CANCEL
    if event_type in CONTACT_EVENTS:
        return FactKind.CONTACT
    # Using the product: a signed-in interaction anywhere, or any interaction in the app (installed = used).
    if event_type in USE_EVENTS and (channel == "MOBILE_APP" or any(i.startswith("user_id:") for i in identifiers)):
        return FactKind.USE
    return None


@dataclass(slots=True)
class IdentityOutput:
    operations: list[Operation] = field(default_factory=list)  # for the shared identity log
    erased: list[Operation] = field(default_factory=list)  # operations an erasure removed: the log drops them
    audit: list[AuditRecord] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (former person id, person id now)
    transitions: list[RoleTransition] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.operations or self.erased or self.audit or self.aliases or self.transitions)


class Enricher:
    """Adds person_id, role, is_customer, is_user, first_seen_ms, customer_since_ms, purchase_count,
    resolved_from and previous_contact_ms to each event. With no graph (identity off) the strongest identifier
    names the person and the role is what the identifiers alone imply."""

    def __init__(self, config: IdentityConfig, *, enabled: bool = True,
                 state: GraphState | None = None) -> None:
        self.config = config
        self.graph = IdentityGraph(self.config, state) if enabled else None
        self._prefetch = state.prefetch if enabled and isinstance(state, BatchedState) else None
        self.output = IdentityOutput()
        self.clock_ms = 0  # the latest event time seen: role changes up to it are due
        self._due: list[tuple[int, str]] = []  # (at, person key) of role changes still in the future

    def enrich(self, events: Iterable[dict[str, Any]]) -> None:
        graph = self.graph
        blocked = self.config.blocked_values
        if graph is None:
            for event in events:
                self._enrich_without_graph(event, identifiers_of(event["identifiers"], blocked))
            return
        operations = self.output.operations
        observe, add_link, add_fact, person_key = graph.observe, graph.add_link, graph.add_fact, graph.person_key
        clock = self.clock_ms
        events = list(events)
        batch_ids = [identifiers_of(event["identifiers"], blocked) for event in events]
        if self._prefetch is not None:
            self._prefetch([i for ids in batch_ids for i in ids])
        for event, ids in zip(events, batch_ids, strict=True):
            at = event["event_time"]
            if at > clock:
                clock = at
            if graph.has_forgotten and any(graph.is_forgotten(i, at) for i in ids):
                # An erased person's old event (a replay): it is kept for the counts, without who it was.
                raw = event["identifiers"] = dict(event["identifiers"])
                for identifier in ids:
                    if graph.is_forgotten(identifier, at):
                        raw[identifier[:identifier.index(":")]] = None
                ids = [i for i in ids if not graph.is_forgotten(i, at)] or ["event_id:" + event["event_id"]]
            for identifier in ids:
                if observe(identifier, at):
                    operations.append(Fact(identifier, FactKind.SEEN, at))
            event_type = event["event_type"]
            if len(ids) > 1:
                first = ids[0]
                source = event_type if event_type in LINK_EVENTS else "co-occurrence"
                for other in ids[1:]:
                    if person_key(other) != person_key(first):
                        link = make_link(first, other, at, source, event["event_id"])
                        if add_link(link):
                            operations.append(link)
            kind = _fact_kind(event_type, event["channel"], ids)
            if kind is not None:
                fact = Fact(ids[0], kind, at, event["event_id"])
                if add_fact(fact):
                    operations.append(fact)
            who = graph.resolve(ids, at)
            event["person_id"] = who.person_id
            event["role"] = who.role.value
            event["is_customer"] = who.is_customer
            event["is_user"] = who.is_user
            event["first_seen_ms"] = who.first_seen_ms
            event["customer_since_ms"] = who.customer_since_ms
            event["purchase_count"] = who.purchase_count
            event["previous_contact_ms"] = who.previous_contact_ms
            event["resolved_from"] = ids
        self.clock_ms = clock

    def _enrich_without_graph(self, event: dict[str, Any], ids: list[str]) -> None:
        strongest = ids[0] if ids else "event_id:" + event["event_id"]
        customer, user = strongest.startswith("customer_id:"), strongest.startswith("user_id:")
        event["person_id"] = person_id_of(strongest)
        event["role"] = (Role.CUSTOMER if customer else Role.USER if user else Role.PROSPECT).value
        event["is_customer"] = customer
        event["is_user"] = customer or user
        event["first_seen_ms"] = event["event_time"]
        event["customer_since_ms"] = None
        event["purchase_count"] = 0
        event["previous_contact_ms"] = None
        event["resolved_from"] = ids

    def apply(self, operations: Iterable[Operation], *, replay: bool = False) -> None:
        """Operations from the shared log, written by other workers. A replay (a restart reading the whole log)
        rebuilds the graph only: its audit records and aliases were stored when the operations were new."""
        graph = self.graph
        if graph is None:
            return
        republish = self.output.operations
        for op in operations:
            winner = graph.superseding(op)
            if winner is not None:  # the log keeps one value per key: the winner must be written last
                republish.append(winner)
                continue
            graph.apply((op,))
            if not isinstance(op, Forget | Forgotten | Unmerge) and op.at_ms > self.clock_ms:  # operators: wall time
                self.clock_ms = op.at_ms
            if replay and len(graph.changes.audit) > 10_000:
                graph.take_changes()
        if replay:
            graph.take_changes()

    def take_output(self) -> IdentityOutput:
        """What changed since the last call: operations to share, audit records, aliases and the role changes
        now due (up to the latest event time)."""
        out, self.output = self.output, IdentityOutput()
        graph = self.graph
        if graph is None:
            return out
        changes = graph.take_changes()
        out.audit = changes.audit
        out.erased = changes.erased
        seen_aliases = set()
        for identifier in changes.moved:
            alias = person_id_of(identifier), person_id_of(graph.person_key(identifier))
            if alias not in seen_aliases:
                seen_aliases.add(alias)
                out.aliases.append(alias)
        persons = {graph.person_key(key) for key in changes.touched}
        while self._due and self._due[0][0] <= self.clock_ms:
            persons.add(graph.person_key(heapq.heappop(self._due)[1]))
        for person in persons:
            timeline = role_timeline(graph.facts(person), self.config)
            person_id = person_id_of(person)
            for at, before, after, cause in timeline:
                if at <= self.clock_ms:
                    out.transitions.append(RoleTransition(person_id, at, before.value, after.value, cause))
                else:  # a lapse or a habit ending later: emitted when event time gets there
                    heapq.heappush(self._due, (at, person))
                    break
        return out
