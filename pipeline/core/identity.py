"""Step 3, enrich: the identity graph. One person across every channel, and their role as of each event's time.

The state is a function of a *set* of operations (links between identifiers, timestamped facts, erasures), not
of the order they arrive in: links are replayed in a canonical order (event time, then identifiers) whenever one
arrives out of that order, and facts are grow-only sets or minimums. That is what lets every worker hold a full
replica fed by one shared log, with no coordination, and still agree on every person.

Merge safety, per kind and configurable: two persons holding different values of a unique kind (two customer ids)
are never merged; a person holds at most N values of a capped kind (one email hash by default, so two different
email hashes never fuse two persons unless configured); blocked values never link; per-kind daily limits stop
kiosks and shared devices fusing strangers. Each merge and refusal becomes an audit record.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

DAY_MS = 86_400_000

# Identifier kinds, strongest first: the strongest identifier a person holds names them.
KINDS: tuple[str, ...] = (
    "customer_id", "user_id", "email_sha256", "phone_sha256", "helpdesk_requester_id", "anonymous_id",
)
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}

USE_EVENTS = frozenset({"identify", "page_view", "screen_view", "task", "app_error", "app_crash"})
PURCHASE_EVENTS = frozenset({"purchase", "subscription_started", "subscription_renewed"})
CANCEL_EVENTS = frozenset({"subscription_cancelled"})
CONTACT_EVENTS = frozenset({"contact", "ticket_opened"})
LINK_EVENTS = frozenset({"identify", "alias", "link"})  # explicit links; any event with two identifiers links too


class Role(StrEnum):
    PROSPECT = "prospect"  # never used the product, never bought
    USER = "user"  # uses the product or service (free or paid), never bought or not a customer now
    CUSTOMER = "customer"  # has bought
    HABITUAL_CUSTOMER = "habitual_customer"  # repeat purchases within the habitual period
    FORMER_CUSTOMER = "former_customer"  # bought, then no purchase for the lapse period, or cancelled


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """The graph's merge-safety limits and role periods; their defaults are settings (pipeline/settings.py
    IdentitySettings.core())."""

    unique_kinds: frozenset[str]  # kinds a person holds one value of: two values never merge
    blocked_values: frozenset[str]  # lower-cased values that never identify anyone (blanks included)
    daily_limits: Mapping[str, int]  # kind -> at most this many identifiers of it join a person a day
    max_values: Mapping[str, int]  # kind -> at most this many distinct values of it per person
    habitual_purchases: int  # purchases within habitual_ms that make a habitual customer
    habitual_ms: int
    lapse_ms: int  # no purchase for this long: a former customer
    cancelled_ms: int  # a cancelled subscription this long ago: a former customer
    restate_horizon_ms: int = 0  # rows this far before a merge are restated to the merged person; 0: none


def kind_of(identifier: str) -> str:
    return identifier[:identifier.index(":")]


def strength(identifier: str) -> tuple[int, str]:
    return _RANK.get(kind_of(identifier), len(KINDS)), identifier


@functools.lru_cache(maxsize=1 << 16)  # the same persons recur from event to event
def person_id_of(person_key: str) -> str:
    """Opaque, stable id of the person named by their strongest identifier: no identifier leaks into it."""
    return "p-" + hashlib.blake2b(person_key.encode(), digest_size=8).hexdigest()


def identifier_hash(identifier: str) -> str:
    return hashlib.sha256(identifier.encode()).hexdigest()


# --- operations: what the shared identity log carries -------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class Link:
    at_ms: int
    a: str  # a < b: one link per pair
    b: str
    source: str = "co-occurrence"  # or the explicit event type: identify, alias, link
    event_id: str = ""

    @property
    def pair(self) -> tuple[str, str]:
        return self.a, self.b


def make_link(x: str, y: str, at_ms: int, source: str, event_id: str) -> Link:
    a, b = (x, y) if x < y else (y, x)
    return Link(at_ms, a, b, source, event_id)


class FactKind(StrEnum):
    SEEN = "seen"
    USE = "use"
    PURCHASE = "purchase"
    CANCEL = "cancel"
    CONTACT = "contact"


@dataclass(frozen=True, slots=True)
class Fact:
    identifier: str
    kind: FactKind
    at_ms: int
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class Forget:
    identifier: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Forgotten:
    """An erasure as the log keeps it once applied: the identifier's SHA-256 only, so replays stay blocked."""

    identifier_hash: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Unmerge:
    """An operator undoes the merge audited as `audit_id` (the merge of a and b): the two persons split as they
    were just before it."""

    a: str  # a < b, as in the merge's link
    b: str
    at_ms: int  # wall time of the operator's request: links between the two sides up to it are severed
    audit_id: str


Operation = Link | Fact | Forget | Forgotten | Unmerge


def audit_id_of(action: str, identifier_a: str, identifier_b: str, at_ms: int, event_id: str) -> str:
    """A stable id of an audit row, for operators: its time in hex (so the row is found by time), then a hash of
    the rest. Computed from the row's columns, so rows written before ids existed have one too."""
    digest = hashlib.sha256(f"{action}|{identifier_a}|{identifier_b}|{at_ms}|{event_id}".encode()).hexdigest()
    return f"{at_ms:x}-{digest[:8]}"


def encode_operation(op: Operation) -> list[Any]:
    if isinstance(op, Link):
        return ["L", op.a, op.b, op.at_ms, op.source, op.event_id]
    if isinstance(op, Fact):
        return ["F", op.identifier, op.kind.value, op.at_ms, op.event_id]
    if isinstance(op, Forgotten):
        return ["H", op.identifier_hash, op.at_ms]
    if isinstance(op, Unmerge):
        return ["U", op.a, op.b, op.at_ms, op.audit_id]
    return ["X", op.identifier, op.at_ms]


def decode_operation(item: list[Any]) -> Operation:
    tag = item[0]
    if tag == "L":
        return Link(item[3], item[1], item[2], item[4], item[5])
    if tag == "F":
        return Fact(item[1], FactKind(item[2]), item[3], item[4])
    if tag == "X":
        return Forget(item[1], item[2])
    if tag == "H":
        return Forgotten(item[1], item[2])
    if tag == "U":
        return Unmerge(item[1], item[2], item[3], item[4])
    raise ValueError(f"unknown identity operation {tag!r}")


# --- what the graph reports -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuditRecord:
    at_ms: int
    action: str  # merge | refuse_conflict | refuse_max_values | refuse_limit | refuse_unmerged | unmerge | forget
    identifier_a: str
    identifier_b: str
    from_person_id: str
    into_person_id: str
    reason: str
    event_id: str

    @property
    def audit_id(self) -> str:
        return audit_id_of(self.action, self.identifier_a, self.identifier_b, self.at_ms, self.event_id)


@dataclass(frozen=True, slots=True)
class RoleTransition:
    person_id: str
    at_ms: int
    from_role: str
    to_role: str
    cause: str


@dataclass(slots=True)
class PersonFacts:
    """A person's facts, merged over every identifier they hold."""

    first_seen_ms: int | None = None
    first_use_ms: int | None = None
    purchases: list[int] = field(default_factory=list)  # sorted event times
    cancels: list[int] = field(default_factory=list)
    contacts: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RoleState:
    role: Role
    is_customer: bool
    is_user: bool
    customer_since_ms: int | None
    purchase_count: int


def role_at(facts: PersonFacts, at_ms: int, config: IdentityConfig) -> RoleState:
    """The role as of a moment, from facts up to that moment only (later facts never change the past)."""
    bought = bisect.bisect_right(facts.purchases, at_ms)
    is_user = facts.first_use_ms is not None and facts.first_use_ms <= at_ms
    if bought == 0:
        return RoleState(Role.USER if is_user else Role.PROSPECT, False, is_user, None, 0)
    last = facts.purchases[bought - 1]
    lapsed = at_ms - last >= config.lapse_ms
    cancelled = any(last <= c <= at_ms - config.cancelled_ms for c in facts.cancels)
    since = facts.purchases[0]
    if lapsed or cancelled:
        return RoleState(Role.FORMER_CUSTOMER, False, is_user, since, bought)
    recent = bought - bisect.bisect_right(facts.purchases, at_ms - config.habitual_ms)
    role = Role.HABITUAL_CUSTOMER if recent >= config.habitual_purchases else Role.CUSTOMER
    return RoleState(role, True, is_user, since, bought)


_CAUSES = {
    (Role.PROSPECT, Role.USER): "first_use",
    (Role.FORMER_CUSTOMER, Role.CUSTOMER): "returned",
    (Role.FORMER_CUSTOMER, Role.HABITUAL_CUSTOMER): "returned",
    (Role.CUSTOMER, Role.HABITUAL_CUSTOMER): "repeat_purchase",
    (Role.HABITUAL_CUSTOMER, Role.CUSTOMER): "habit_lapsed",
}


def role_timeline(facts: PersonFacts, config: IdentityConfig) -> list[tuple[int, Role, Role, str]]:
    """Every role change the facts imply, in time order: (at, from, to, cause). Roles change only at a fact or
    when a purchase leaves the habitual period, the lapse period ends or a cancellation's grace ends."""
    moments = set(facts.purchases)
    if facts.first_use_ms is not None:
        moments.add(facts.first_use_ms)
    for p in facts.purchases:
        moments.add(p + config.habitual_ms)
        moments.add(p + config.lapse_ms)
    for c in facts.cancels:
        moments.add(c + config.cancelled_ms)
    changes = []
    previous = Role.PROSPECT
    for moment in sorted(moments):
        current = role_at(facts, moment, config).role
        if current != previous:
            cause = _CAUSES.get((previous, current))
            if cause is None:
                if current in (Role.CUSTOMER, Role.HABITUAL_CUSTOMER):
                    cause = "purchase"
                elif current == Role.FORMER_CUSTOMER:
                    lapsed = any(moment == p + config.lapse_ms for p in facts.purchases)
                    cause = "lapsed" if lapsed else "cancelled"
                else:
                    cause = "changed"
            changes.append((moment, previous, current, cause))
            previous = current
    return changes


@dataclass(frozen=True, slots=True)
class Resolution:
    """What enrichment adds to a touchpoint."""

    person_id: str
    role: Role
    is_customer: bool
    is_user: bool
    first_seen_ms: int
    customer_since_ms: int | None
    purchase_count: int
    previous_contact_ms: int | None


# --- the graph ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Changes:
    """What applying operations changed, for the adapters to store."""

    audit: list[AuditRecord] = field(default_factory=list)
    moved: set[str] = field(default_factory=set)  # identifiers whose person changed
    touched: set[str] = field(default_factory=set)  # person keys whose facts or members changed
    erased: list[Operation] = field(default_factory=list)  # operations an erasure removed (the log drops them)
    # Identifiers whose earlier rows now name the wrong person -> the time of the change: merged with rows from
    # before the merge (late identify, when restating is on), split by an unmerge (the merge's time).
    merged_late: dict[str, int] = field(default_factory=dict)
    merged_into: dict[str, int] = field(default_factory=dict)  # the side that kept its person: roles may change
    unmerged: dict[str, int] = field(default_factory=dict)


class GraphState(Protocol):
    """Where a graph keeps its state: one mutable mapping (string keys) per name. In memory for tests and small
    graphs (`MemoryState`); on disk with a bounded cache in production (pipeline/adapters/identity_store.py). The
    graph assigns every value it changes (never mutates one in place), so a store may copy values."""

    def mapping(self, name: str) -> MutableMapping[str, Any]: ...


class AbsenceHint(Protocol):
    """Optional on a store's mapping: told that a key is certainly absent (an identifier seen for the first time
    is in no other map), it can answer the next look-ups without reading the store."""

    def note_absent(self, key: str) -> None: ...


class MemoryState:
    """Plain dicts, one per name: graphs made over the same MemoryState share its state."""

    def __init__(self) -> None:
        self._mappings: dict[str, dict[str, Any]] = {}

    def mapping(self, name: str) -> MutableMapping[str, Any]:
        return self._mappings.setdefault(name, {})


def pair_key(a: str, b: str) -> str:
    return a + "\x00" + b


@runtime_checkable
class AbsenceHintMapping(AbsenceHint, Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...


@runtime_checkable
class BatchedState(Protocol):
    """Optional on a GraphState: it holds changes back and writes them at once when flushed (once a batch, in
    `take_changes`), and reads a batch's identifiers at once before the batch is enriched."""

    def flush(self) -> None: ...

    def prefetch(self, identifiers: Iterable[str]) -> None: ...


SUMMARY_CACHE = 100_000  # merged facts of recently resolved persons; cleared when full


class IdentityGraph:
    """Identifiers -> persons, with each identifier's facts, in the mappings of a GraphState: a singleton
    identifier costs one entry in `first_seen` and nothing else."""

    def __init__(self, config: IdentityConfig, state: GraphState | None = None) -> None:
        self.config = config
        state = state or MemoryState()
        self.first_seen: MutableMapping[str, int] = state.mapping("first_seen")
        self._facts: MutableMapping[str, PersonFacts] = state.mapping("facts")  # identifier -> its own facts
        # identifier -> person key; absent: the identifier is its own person
        self._person: MutableMapping[str, str] = state.mapping("person")
        # person key -> identifiers, for persons of two or more
        self._members: MutableMapping[str, list[str]] = state.mapping("members")
        # pair_key(person key, limited kind) -> (day, identifiers of that kind attached that day). Only the latest
        # day matters: links are applied in canonical (time) order, so no later link falls on an earlier day.
        self._attached: MutableMapping[str, tuple[int, int]] = state.mapping("attached")
        self._links: MutableMapping[str, Link] = state.mapping("links")  # pair_key -> its earliest link
        self._cluster: MutableMapping[str, str] = state.mapping("cluster")  # union-find over every link
        # cluster root -> links in canonical order
        self._cluster_links: MutableMapping[str, list[Link]] = state.mapping("cluster_links")
        self._meta: MutableMapping[str, Any] = state.mapping("meta")
        self._summaries: dict[str, PersonFacts] = {}  # person key -> merged facts (cache)
        self.forgotten: MutableMapping[str, int] = state.mapping("forgotten")  # sha256 -> erased at
        self.has_forgotten = next(iter(self.forgotten), None) is not None
        self._count: int = self._meta.get("identifiers", 0)
        # Maps that hold only identifiers already in first_seen: a new identifier is absent from each.
        self._absent_hints = [m.note_absent for m in (self._person, self._facts, self._members, self._cluster)
                              if isinstance(m, AbsenceHintMapping)]
        # pair_key of pairs an operator's unmerge cut -> its time: a link between them up to then (a replay) never
        # joins them again.
        self.severed: MutableMapping[str, int] = state.mapping("severed")
        self.has_severed = next(iter(self.severed), None) is not None
        self.changes = _Changes()
        self._flush_state = state.flush if isinstance(state, BatchedState) else None

    # queries -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def person_key(self, identifier: str) -> str:
        return self._person.get(identifier, identifier)

    def members(self, person_key: str) -> list[str]:
        return self._members.get(person_key) or ([person_key] if person_key in self.first_seen else [])

    def persons(self) -> dict[str, frozenset[str]]:
        """Person key -> identifiers, for every known identifier."""
        result: dict[str, set[str]] = {}
        for identifier in self.first_seen:
            result.setdefault(self.person_key(identifier), set()).add(identifier)
        return {key: frozenset(ids) for key, ids in result.items()}

    def facts(self, person_key: str) -> PersonFacts:
        summary = self._summaries.get(person_key)
        if summary is not None:
            return summary
        members = self._members.get(person_key)
        if members is None:  # a singleton: its own facts, no need to cache
            own = self._facts.get(person_key)
            seen = self.first_seen.get(person_key)
            if own is None:
                return PersonFacts(first_seen_ms=seen)
            own.first_seen_ms = seen
            return own
        merged = PersonFacts()
        seen_times = [self.first_seen[m] for m in members if m in self.first_seen]
        merged.first_seen_ms = min(seen_times) if seen_times else None
        uses = []
        for member in members:
            own = self._facts.get(member)
            if own is None:
                continue
            if own.first_use_ms is not None:
                uses.append(own.first_use_ms)
            merged.purchases.extend(own.purchases)
            merged.cancels.extend(own.cancels)
            merged.contacts.extend(own.contacts)
        merged.first_use_ms = min(uses) if uses else None
        merged.purchases.sort()
        merged.cancels.sort()
        merged.contacts.sort()
        self._summaries[person_key] = merged
        return merged

    def resolve(self, identifiers: list[str], at_ms: int) -> Resolution:
        """The person the (strongest-first) identifiers belong to, as of at_ms."""
        key = self._person.get(identifiers[0], identifiers[0])
        if key not in self._facts and key not in self._members:  # most events: a lone identifier, no facts
            seen = self.first_seen.get(key)
            return Resolution(person_id_of(key), Role.PROSPECT, False, False, at_ms if seen is None else seen,
                              None, 0, None)
        facts = self.facts(key)
        state = role_at(facts, at_ms, self.config)
        contacts = facts.contacts
        before = bisect.bisect_left(contacts, at_ms)
        return Resolution(
            person_id_of(key), state.role, state.is_customer, state.is_user,
            facts.first_seen_ms if facts.first_seen_ms is not None else at_ms, state.customer_since_ms,
            state.purchase_count, contacts[before - 1] if before else None,
        )

    def superseding(self, op: Operation) -> Operation | None:
        """The operation this graph holds under the same log key as `op` when it wins over it (an earlier
        first-seen, first use or link): republished, so the compacted log keeps the winner whoever wrote last."""
        if isinstance(op, Link):
            known = self._links.get(pair_key(op.a, op.b))
            return known if known is not None and known < op else None
        if isinstance(op, Fact) and op.kind == FactKind.SEEN:
            seen = self.first_seen.get(op.identifier)
            return Fact(op.identifier, op.kind, seen) if seen is not None and seen < op.at_ms else None
        if isinstance(op, Fact) and op.kind == FactKind.USE:
            own = self._facts.get(op.identifier)
            first = None if own is None else own.first_use_ms
            return Fact(op.identifier, op.kind, first) if first is not None and first < op.at_ms else None
        return None

    def is_forgotten(self, identifier: str, at_ms: int) -> bool:
        erased_at = self.forgotten.get(identifier_hash(identifier))
        return erased_at is not None and at_ms <= erased_at

    # operations ------------------------------------------------------------------------------------------------

    def apply(self, ops: Iterable[Operation]) -> None:
        for op in ops:
            if isinstance(op, Link):
                self.add_link(op)
            elif isinstance(op, Fact):
                self.add_fact(op)
            elif isinstance(op, Forgotten):
                if self.forgotten.get(op.identifier_hash, -1) < op.at_ms:
                    self.forgotten[op.identifier_hash] = op.at_ms
                    self.has_forgotten = True
            elif isinstance(op, Unmerge):
                self.unmerge(op)
            else:
                self.forget(op.identifier, op.at_ms)

    def observe(self, identifier: str, at_ms: int) -> bool:
        """Record that an identifier was seen; True if its first-seen time changed (so it is news to share)."""
        seen = self.first_seen.get(identifier)
        if seen is not None and seen <= at_ms:
            return False
        if self.has_forgotten and self.is_forgotten(identifier, at_ms):
            return False
        if seen is None:
            self._count += 1
            for hint in self._absent_hints:
                hint(identifier)
        self.first_seen[identifier] = at_ms
        key = self.person_key(identifier)
        if key in self._summaries:
            del self._summaries[key]
        return True

    def add_fact(self, fact: Fact) -> bool:
        """Add a fact; True if it is new."""
        identifier = fact.identifier
        if self.has_forgotten and self.is_forgotten(identifier, fact.at_ms):
            return False
        if fact.kind == FactKind.SEEN:
            return self.observe(identifier, fact.at_ms)
        self.observe(identifier, fact.at_ms)
        own = self._facts.get(identifier)
        if own is None:
            own = self._facts[identifier] = PersonFacts()
        if fact.kind == FactKind.USE:
            if own.first_use_ms is not None and own.first_use_ms <= fact.at_ms:
                return False
            own.first_use_ms = fact.at_ms
        else:
            times = {FactKind.PURCHASE: own.purchases, FactKind.CANCEL: own.cancels,
                     FactKind.CONTACT: own.contacts}[fact.kind]
            at = bisect.bisect_left(times, fact.at_ms)
            if at < len(times) and times[at] == fact.at_ms:
                return False  # the same fact again (a replay): never counted twice
            times.insert(at, fact.at_ms)
        self._facts[identifier] = own  # assigned, not only mutated: the state may be a store
        key = self.person_key(identifier)
        self._summaries.pop(key, None)
        self.changes.touched.add(key)
        return True

    def add_link(self, link: Link) -> bool:
        """Add a link; True if it is new. Replays in canonical order when it arrives out of that order."""
        if link.a == link.b:
            return False
        if self.has_forgotten and (self.is_forgotten(link.a, link.at_ms) or self.is_forgotten(link.b, link.at_ms)):
            return False
        pair = pair_key(link.a, link.b)
        known = self._links.get(pair)
        if known is not None and known <= link:
            return False
        if self.has_severed and self._severed(link):
            return False
        for identifier in link.pair:
            self.observe(identifier, link.at_ms)
        root_a, root_b = self._cluster_root(link.a), self._cluster_root(link.b)
        links = self._cluster_links.pop(root_a, [])
        if root_b != root_a:
            self._cluster[root_b] = root_a
            links = sorted(links + self._cluster_links.pop(root_b, []))
        if known is not None:
            links.remove(known)
        self._links[pair] = link
        in_order = known is None and (not links or links[-1] < link)
        bisect.insort(links, link)
        self._cluster_links[root_a] = links
        if in_order:
            self._union(link)
        else:
            self._replay(links)
        return True

    def forget(self, identifier: str, at_ms: int) -> list[str]:
        """Erase the person holding this identifier: every identifier, link and fact of theirs. Returns the
        identifiers erased. Idempotent; later activity of the same identifiers starts a new person. What was
        erased is reported (changes.erased) so the log can drop it too."""
        key = self.person_key(identifier)
        erased = self.members(key) or [identifier]
        gone = set(erased)
        removed = self.changes.erased
        root = self._cluster_root(identifier) if identifier in self._cluster else None
        cluster_links = [] if root is None else self._cluster_links.pop(root, [])
        for member in erased:
            hashed = identifier_hash(member)
            self.forgotten[hashed] = at_ms
            removed.append(Forgotten(hashed, at_ms))
            seen = self.first_seen.pop(member, None)
            if seen is not None:
                self._count -= 1
                removed.append(Fact(member, FactKind.SEEN, seen))
            own = self._facts.pop(member, None)
            if own is not None:
                removed.extend(_facts_as_operations(member, own))
            self._person.pop(member, None)
        self.has_forgotten = True
        self._drop_person(key)
        if root is not None:
            cluster = {root} | {i for link in cluster_links for i in link.pair}
            for link in cluster_links:  # the whole cluster is rebuilt below, without the erased identifiers
                self._links.pop(pair_key(link.a, link.b), None)
                if link.a in gone or link.b in gone:
                    removed.append(link)
            for member in cluster:
                self._cluster.pop(member, None)
            for link in cluster_links:
                if link.a not in gone and link.b not in gone:
                    self.add_link(link)
        if self.has_severed:
            for pair in [pair for pair in self.severed if not gone.isdisjoint(pair.split("\x00"))]:
                a, b = pair.split("\x00")
                cut_at = self.severed.pop(pair)
                removed += (Unmerge(a, b, cut_at, ""), Link(cut_at, a, b, "", ""))  # the cut link is in the log too
        self.changes.audit.append(AuditRecord(at_ms, "forget", identifier_hash(identifier), "", person_id_of(key),
                                              "", f"{len(erased)} identifiers erased", ""))
        return erased

    def unmerge(self, op: Unmerge) -> list[Link]:
        """Split the persons the audited merge of a and b joined, as they were just before it: every link between
        the two sides up to the operator's request is cut (and recorded, so a replay of it does not join them
        again); later merges through other identifiers stay (each has its own audit id). Returns the links cut."""
        pair = pair_key(op.a, op.b)
        merge = self._links.get(pair)
        self.severed[pair] = max(op.at_ms, self.severed.get(pair, 0))
        self.has_severed = True
        if merge is None or merge.at_ms > op.at_ms:
            self.changes.audit.append(AuditRecord(op.at_ms, "unmerge", op.a, op.b, "", "",
                                                  "no such link: nothing to split", op.audit_id))
            return []
        root = self._cluster_root(op.a)
        links = self._cluster_links[root]
        before = IdentityGraph(self.config)  # the persons just before the merge
        for link in links:
            if link < merge:
                before.add_link(link)
        side_a = set(before.members(before.person_key(op.a)) or [op.a])
        side_b = set(before.members(before.person_key(op.b)) or [op.b])
        cut = [link for link in links if link.at_ms <= op.at_ms
               and ((link.a in side_a and link.b in side_b) or (link.a in side_b and link.b in side_a))]
        merged_key = self.person_key(op.a)
        for link in cut:
            cut_pair = pair_key(link.a, link.b)
            self.severed[cut_pair] = max(op.at_ms, self.severed.get(cut_pair, 0))
            del self._links[cut_pair]
        kept = [link for link in links if link not in cut]
        self._cluster_links[root] = kept
        identifiers = {i for link in links for i in link.pair}
        self._replay(kept, identifiers)
        for identifier in identifiers:
            self.changes.unmerged[identifier] = min(merge.at_ms, self.changes.unmerged.get(identifier, merge.at_ms))
        self.changes.audit.append(AuditRecord(
            op.at_ms, "unmerge", op.a, op.b, person_id_of(merged_key), person_id_of(self.person_key(op.b)),
            f"{len(cut)} links cut; {op.a} is {person_id_of(self.person_key(op.a))} again", op.audit_id))
        return cut

    def _severed(self, link: Link) -> bool:
        """A link an unmerge cut, arriving again (a replayed event): refused and audited."""
        cut_at = self.severed.get(pair_key(link.a, link.b))
        if cut_at is None or link.at_ms > cut_at:
            return False
        self.changes.audit.append(AuditRecord(link.at_ms, "refuse_unmerged", link.a, link.b,
                                              person_id_of(self.person_key(link.b)),
                                              person_id_of(self.person_key(link.a)),
                                              "an operator unmerged this pair", link.event_id))
        return True

    # internals -------------------------------------------------------------------------------------------------

    def _cluster_root(self, identifier: str) -> str:
        parent = self._cluster.get(identifier)
        if parent is None:
            self._cluster[identifier] = identifier
            return identifier
        root = identifier
        while parent != root:
            grand = self._cluster[parent]
            self._cluster[root] = grand  # path halving
            root, parent = parent, grand
        return root

    def _replay(self, links: list[Link], identifiers: set[str] | None = None) -> None:
        """Rebuild the persons of one cluster (these identifiers; default: the links') from its links in canonical
        order."""
        if identifiers is None:
            identifiers = {i for link in links for i in link.pair}
        before = {i: self.person_key(i) for i in identifiers}
        for identifier in identifiers:
            old = self._person.pop(identifier, None)
            if old is not None:
                self._drop_person(old)
        for link in links:
            self._union(link, record_moves=False)
        for identifier in identifiers:
            self.changes.moved.add(identifier)
            self.changes.touched.add(self.person_key(identifier))
            self.changes.touched.add(before[identifier])

    def _union(self, link: Link, *, record_moves: bool = True) -> None:
        key_a, key_b = self.person_key(link.a), self.person_key(link.b)
        if key_a == key_b:
            return
        members_a, members_b = self.members(key_a) or [key_a], self.members(key_b) or [key_b]
        refusal = self._refusal(link, members_a, members_b)
        if refusal is not None:
            action, reason = refusal
            self.changes.audit.append(AuditRecord(link.at_ms, action, link.a, link.b, person_id_of(key_b),
                                                  person_id_of(key_a), reason, link.event_id))
            return
        into, other = (key_a, key_b) if strength(key_a) < strength(key_b) else (key_b, key_a)
        into_members, other_members = (members_a, members_b) if into == key_a else (members_b, members_a)
        merged = into_members + other_members
        day = link.at_ms // DAY_MS
        for kind in self.config.daily_limits:
            count = 0
            for key, side in ((into, into_members), (other, other_members)):
                if len(side) == 1:  # a lone identifier attaches to a person today
                    count += side[0].startswith(kind + ":")
                else:
                    latest = self._attached.pop(pair_key(key, kind), None)
                    if latest is not None and latest[0] == day:
                        count += latest[1]
            if count:
                self._attached[pair_key(into, kind)] = (day, count)
        if other in self._members:
            del self._members[other]
        self._members[into] = merged
        for member in merged:
            self._person[member] = into
        self._summaries.pop(into, None)
        self._summaries.pop(other, None)
        if record_moves:
            self.changes.moved.update(other_members if other_members else [other])
            self.changes.touched.update((into, other))
            if self.config.restate_horizon_ms:  # rows from before the merge (first seen before it) may change:
                first_seen, at = self.first_seen, link.at_ms  # the moved side's person, either side's role
                for members, late in ((other_members, self.changes.merged_late),
                                      (into_members, self.changes.merged_into)):
                    for member in members:
                        if first_seen.get(member, at) < at:
                            late[member] = min(at, late.get(member, at))
        self.changes.audit.append(AuditRecord(link.at_ms, "merge", link.a, link.b, person_id_of(other),
                                              person_id_of(into), link.source, link.event_id))

    def _drop_person(self, key: str) -> None:
        self._members.pop(key, None)
        self._summaries.pop(key, None)
        for kind in self.config.daily_limits:
            self._attached.pop(pair_key(key, kind), None)

    def _refusal(self, link: Link, members_a: list[str], members_b: list[str]) -> tuple[str, str] | None:
        config = self.config
        for kind in config.unique_kinds:
            prefix = kind + ":"
            held_a = {m for m in members_a if m.startswith(prefix)}
            if held_a:
                held_b = {m for m in members_b if m.startswith(prefix)}
                if held_b and held_a != held_b:
                    return "refuse_conflict", f"both persons hold a different {kind}"
        caps = config.max_values
        if caps:
            # Each person already keeps within the caps, so only a kind the smaller one holds can overflow.
            fewer, more = (members_a, members_b) if len(members_a) <= len(members_b) else (members_b, members_a)
            held: dict[str, int] = {}
            for member in fewer:
                kind = kind_of(member)
                if kind in caps:
                    held[kind] = held.get(kind, 0) + 1
            for kind, count in held.items():
                prefix = kind + ":"
                for member in more:  # the two persons' identifiers are distinct, so the counts add up
                    if member.startswith(prefix):
                        count += 1
                if count > caps[kind]:
                    return "refuse_max_values", f"the merged person would hold {count} {kind} (at most {caps[kind]})"
        day = link.at_ms // DAY_MS
        for kind, limit in config.daily_limits.items():
            count = 0
            for members in (members_a, members_b):
                if len(members) == 1:
                    count += members[0].startswith(kind + ":")
                else:
                    latest = self._attached.get(pair_key(self._person[members[0]], kind))
                    count += latest[1] if latest is not None and latest[0] == day else 0
            if count > limit:
                return "refuse_limit", f"more than {limit} {kind} linked to one person on one day"
        return None

    def take_changes(self) -> _Changes:
        changes, self.changes = self.changes, _Changes()
        if self._meta.get("identifiers") != self._count:
            self._meta["identifiers"] = self._count
        if len(self._summaries) > SUMMARY_CACHE:
            self._summaries.clear()
        if self._flush_state is not None:
            self._flush_state()
        return changes


def _facts_as_operations(identifier: str, own: PersonFacts) -> list[Operation]:
    ops: list[Operation] = []
    if own.first_use_ms is not None:
        ops.append(Fact(identifier, FactKind.USE, own.first_use_ms))
    for kind, times in ((FactKind.PURCHASE, own.purchases), (FactKind.CANCEL, own.cancels),
                        (FactKind.CONTACT, own.contacts)):
        ops.extend(Fact(identifier, kind, at) for at in times)
    return ops
