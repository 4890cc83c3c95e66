"""The identity graph and role rules, without servers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.enrich import Enricher, identifiers_of
from pipeline.core.identity import (
    DAY_MS,
    Fact,
    FactKind,
    Forget,
    IdentityConfig,
    IdentityGraph,
    Link,
    Role,
    decode_operation,
    encode_operation,
    make_link,
    person_id_of,
)
from tests.factories import identity_config, touchpoint

T0 = 1_760_000_000_000

_identifiers = st.sampled_from(
    [f"anonymous_id:a{i}" for i in range(6)] + [f"user_id:u{i}" for i in range(3)]
    + [f"customer_id:c{i}" for i in range(3)] + [f"email_sha256:e{i}" for i in range(3)]
    + ["phone_sha256:p0", "phone_sha256:p1", "helpdesk_requester_id:h0", "helpdesk_requester_id:h1"]
)
_links = st.lists(
    st.tuples(_identifiers, _identifiers, st.integers(0, 3 * DAY_MS)).filter(lambda t: t[0] != t[1])
    .map(lambda t: make_link(t[0], t[1], T0 + t[2], "co-occurrence", "")),
    max_size=25,
)
_facts = st.lists(
    st.builds(Fact, _identifiers, st.sampled_from(list(FactKind)), st.integers(T0, T0 + 400 * DAY_MS)),
    max_size=15,
)
_tight = identity_config(daily_limits={"anonymous_id": 2})  # the default caps: one email, phone, helpdesk id
_loose = identity_config(daily_limits={"anonymous_id": 2}, max_values={"email_sha256": 2, "anonymous_id": 3})
_configs = st.sampled_from([_tight, _loose])


def _state(graph: IdentityGraph) -> tuple:
    persons = graph.persons()
    return (
        sorted((key, tuple(sorted(ids))) for key, ids in persons.items()),
        sorted((key, graph.facts(key).first_seen_ms, graph.facts(key).first_use_ms,
                tuple(graph.facts(key).purchases), tuple(graph.facts(key).contacts)) for key in persons),
    )


@settings(max_examples=300, deadline=None)
@given(_links, _facts, st.randoms(use_true_random=False), _configs)
def test_the_same_links_and_facts_in_any_order_give_the_same_persons(links: list[Link], facts: list[Fact],
                                                                    rnd: random.Random,
                                                                    config: IdentityConfig) -> None:
    ops = [*links, *facts]
    in_order = IdentityGraph(config)
    in_order.apply(sorted(links) + facts)
    shuffled = ops[:]
    rnd.shuffle(shuffled)
    other = IdentityGraph(config)
    other.apply(shuffled)
    assert _state(other) == _state(in_order)
    assert _refused(other) == _refused(in_order)  # the same links refused, for the same reason


@settings(max_examples=200, deadline=None)
@given(_links, _facts, _configs)
def test_applying_operations_twice_changes_nothing(links: list[Link], facts: list[Fact],
                                                   config: IdentityConfig) -> None:
    once = IdentityGraph(config)
    once.apply([*links, *facts])
    twice = IdentityGraph(config)
    twice.apply([*links, *facts, *links, *facts])
    assert _state(twice) == _state(once)


def _held(identifiers: frozenset[str], kind: str) -> int:
    return sum(i.startswith(kind + ":") for i in identifiers)


def _refused(graph: IdentityGraph) -> dict[tuple[str, str], tuple[str, str]]:
    """Each link the graph leaves apart -> the action of its refusal, as of the graph's final state: a link that
    arrived out of order may be refused, then merged by the replay, and the replay's verdict stands."""
    verdicts = {(a.identifier_a, a.identifier_b): (a.action, a.reason) for a in graph.take_changes().audit
                if a.action == "merge" or a.action.startswith("refuse")}
    return {pair: verdict for pair, verdict in verdicts.items()
            if verdict[0] != "merge" and graph.person_key(pair[0]) != graph.person_key(pair[1])}


@settings(max_examples=300, deadline=None)
@given(_links, _configs)
def test_no_person_ever_holds_more_values_of_a_kind_than_the_policy_allows_and_every_link_left_apart_was_refused(
        links: list[Link], config: IdentityConfig) -> None:
    graph = IdentityGraph(config)
    graph.apply(links)
    for identifiers in graph.persons().values():
        for kind in config.unique_kinds:
            assert _held(identifiers, kind) <= 1
        for kind, most in config.max_values.items():
            assert _held(identifiers, kind) <= most
    refused = {(a.identifier_a, a.identifier_b) for a in graph.take_changes().audit if a.action.startswith("refuse")}
    for link in links:
        if graph.person_key(link.a) != graph.person_key(link.b):
            assert link.pair in refused


def test_two_customer_ids_are_never_merged_and_the_refusal_is_audited() -> None:
    graph = IdentityGraph(identity_config())
    graph.apply([make_link("customer_id:c1", "anonymous_id:shared", T0, "co-occurrence", "e1"),
                 make_link("customer_id:c2", "anonymous_id:shared", T0 + 1, "co-occurrence", "e2")])
    assert graph.person_key("anonymous_id:shared") == "customer_id:c1"  # the earlier link wins
    assert graph.person_key("customer_id:c2") == "customer_id:c2"
    audit = graph.take_changes().audit
    assert [(a.action, a.event_id) for a in audit] == [("merge", "e1"), ("refuse_conflict", "e2")]
    assert "customer_id" in audit[1].reason


def test_the_canonical_order_decides_even_when_the_later_link_arrives_first() -> None:
    graph = IdentityGraph(identity_config())
    graph.apply([make_link("customer_id:c2", "anonymous_id:shared", T0 + 1, "co-occurrence", "e2"),
                 make_link("customer_id:c1", "anonymous_id:shared", T0, "co-occurrence", "e1")])
    assert graph.person_key("anonymous_id:shared") == "customer_id:c1"
    assert graph.person_key("customer_id:c2") == "customer_id:c2"


def test_a_kiosk_device_cannot_fuse_a_person_with_more_anonymous_ids_than_the_daily_limit() -> None:
    graph = IdentityGraph(identity_config(daily_limits={"anonymous_id": 3}))
    graph.apply([make_link("user_id:u", f"anonymous_id:d{i}", T0 + i, "co-occurrence", f"e{i}") for i in range(5)])
    assert len(graph.members("user_id:u")) == 1 + 3
    assert [a.action for a in graph.take_changes().audit].count("refuse_limit") == 2
    # The next day the person may attach new devices again.
    graph.apply([make_link("user_id:u", "anonymous_id:next", T0 + DAY_MS, "co-occurrence", "e9")])
    assert graph.person_key("anonymous_id:next") == "user_id:u"


def test_blocked_values_never_identify_anyone() -> None:
    config = identity_config()
    ids = identifiers_of({"anonymous_id": "a1", "user_id": "NULL", "customer_id": "0", "email_sha256": " "},
                         config.blocked_values)
    assert ids == ["anonymous_id:a1"]


def test_operations_survive_the_log_encoding() -> None:
    ops = [make_link("user_id:u", "anonymous_id:a", T0, "identify", "e1"), Fact("user_id:u", FactKind.USE, T0, "e1"),
           Forget("user_id:u", T0 + 5)]
    assert [decode_operation(encode_operation(op)) for op in ops] == ops


def test_forget_erases_every_identifier_of_the_person_and_blocks_their_replays() -> None:
    graph = IdentityGraph(identity_config())
    graph.apply([make_link("user_id:u", "anonymous_id:a", T0, "identify", "e1"),
                 Fact("user_id:u", FactKind.PURCHASE, T0 + 10, "e2"),
                 make_link("customer_id:c9", "anonymous_id:b", T0, "co-occurrence", "e3")])
    erased = graph.forget("anonymous_id:a", T0 + 100)
    assert sorted(erased) == ["anonymous_id:a", "user_id:u"]
    assert "user_id:u" not in graph.first_seen and "anonymous_id:a" not in graph.first_seen
    assert graph.person_key("anonymous_id:b") == "customer_id:c9"  # others untouched
    assert graph.forget("anonymous_id:a", T0 + 100) == ["anonymous_id:a"]  # idempotent: nothing left
    # A replay of their old events links nothing again.
    assert not graph.add_link(make_link("user_id:u", "anonymous_id:a", T0, "identify", "e1"))
    assert "user_id:u" not in graph.first_seen


def _journey_event(at: int, event_type: str, channel: str, **ids: str | None) -> dict:
    return touchpoint(event_time=at, event_type=event_type, channel=channel, identifiers=ids)


def test_the_journey_visitor_signs_up_buys_buys_again_and_lapses() -> None:
    config = identity_config(habitual_ms=30 * DAY_MS, lapse_ms=90 * DAY_MS)
    enricher = Enricher(config)
    journey = [
        _journey_event(T0, "page_view", "WEB", anonymous_id="cookie-1"),
        _journey_event(T0 + 60_000, "identify", "WEB", anonymous_id="cookie-1", user_id="u-1"),
        _journey_event(T0 + DAY_MS, "purchase", "BILLING", user_id="u-1", customer_id="c-1"),
        _journey_event(T0 + 10 * DAY_MS, "purchase", "STORE", customer_id="c-1"),
        _journey_event(T0 + 11 * DAY_MS, "screen_view", "MOBILE_APP", user_id="u-1"),
        _journey_event(T0 + 200 * DAY_MS, "page_view", "WEB", anonymous_id="cookie-1"),
    ]
    enricher.enrich(journey)
    assert [e["role"] for e in journey] == ["prospect", "user", "customer", "habitual_customer",
                                            "habitual_customer", "former_customer"]
    assert len({e["person_id"] for e in journey[2:]}) == 1
    assert [e["purchase_count"] for e in journey] == [0, 0, 1, 2, 2, 2]
    assert journey[-1]["first_seen_ms"] == T0 and journey[-1]["customer_since_ms"] == T0 + DAY_MS
    assert journey[-1]["is_user"] and not journey[-1]["is_customer"]
    out = enricher.take_output()
    person = person_id_of("customer_id:c-1")
    transitions = sorted((t.at_ms, t.from_role, t.to_role, t.cause) for t in out.transitions if t.person_id == person)
    assert transitions == [
        (T0 + 60_000, "prospect", "user", "first_use"),
        (T0 + DAY_MS, "user", "customer", "purchase"),
        (T0 + 10 * DAY_MS, "customer", "habitual_customer", "repeat_purchase"),
        (T0 + 31 * DAY_MS, "habitual_customer", "customer", "habit_lapsed"),
        (T0 + 100 * DAY_MS, "customer", "former_customer", "lapsed"),
    ]
    # Earlier persons' ids now map to the merged person, for BI over rows written before the merge.
    assert (person_id_of("anonymous_id:cookie-1"), person) in out.aliases
    assert Role(journey[0]["role"]) == Role.PROSPECT


def test_repeat_contacts_see_the_previous_contact_on_any_channel() -> None:
    enricher = Enricher(identity_config())
    events = [
        _journey_event(T0, "contact", "CONTACT_CENTRE", customer_id="c-7"),
        _journey_event(T0 + 3 * DAY_MS, "ticket_opened", "HELPDESK", customer_id="c-7", anonymous_id="x"),
        _journey_event(T0 + 4 * DAY_MS, "contact", "CHATBOT", anonymous_id="x"),
    ]
    enricher.enrich(events)
    assert [e["previous_contact_ms"] for e in events] == [None, T0, T0 + 3 * DAY_MS]


def test_another_workers_operations_resolve_the_same_person() -> None:
    worker_a, worker_b = Enricher(identity_config()), Enricher(identity_config())
    login = _journey_event(T0, "identify", "WEB", anonymous_id="dev-1", user_id="u-5")
    worker_a.enrich([login])
    worker_b.apply(worker_a.take_output().operations)
    later = _journey_event(T0 + 5_000, "screen_view", "MOBILE_APP", anonymous_id="dev-1")
    worker_b.enrich([later])
    assert later["person_id"] == login["person_id"] == person_id_of("user_id:u-5")
    assert later["role"] == "user"


def test_an_erased_persons_replayed_events_keep_no_identifier() -> None:
    enricher = Enricher(identity_config())
    login = _journey_event(T0, "identify", "WEB", anonymous_id="dev-9", user_id="u-9")
    enricher.enrich([login])
    enricher.apply([Forget("user_id:u-9", T0 + 1_000)])
    replay = _journey_event(T0, "identify", "WEB", anonymous_id="dev-9", user_id="u-9")
    enricher.enrich([replay])
    assert replay["identifiers"]["user_id"] is None and replay["identifiers"]["anonymous_id"] is None
    assert replay["resolved_from"] == [f"event_id:{replay['event_id']}"]
    assert replay["person_id"] != login["person_id"]
    later = _journey_event(T0 + 2_000, "identify", "WEB", anonymous_id="dev-9", user_id="u-9")
    enricher.enrich([later])  # the same person coming back later is a new person, not resurrected state
    assert later["resolved_from"] == ["user_id:u-9", "anonymous_id:dev-9"] and later["first_seen_ms"] == T0 + 2_000


def test_two_persons_each_holding_an_email_hash_are_not_merged_by_one_event_and_the_refusal_says_why() -> None:
    enricher = Enricher(identity_config())
    signed_in = touchpoint(event_id="x1", event_time=T0, identifiers={"user_id": "u1", "email_sha256": "e1"})
    newsletter = touchpoint(event_id="x2", event_time=T0 + 1, identifiers={"anonymous_id": "a2", "email_sha256": "e2"})
    shared_device = touchpoint(event_id="x3", event_time=T0 + 2, identifiers={"user_id": "u1", "anonymous_id": "a2"})
    enricher.enrich([signed_in, newsletter, shared_device])
    assert signed_in["person_id"] == shared_device["person_id"] != newsletter["person_id"]
    refusals = [a for a in enricher.take_output().audit if a.action != "merge"]
    assert [(a.action, a.event_id, a.identifier_a, a.identifier_b) for a in refusals] == [
        ("refuse_max_values", "x3", "anonymous_id:a2", "user_id:u1")]
    assert refusals[0].reason == "the merged person would hold 2 email_sha256 (at most 1)"
    assert {refusals[0].from_person_id, refusals[0].into_person_id} == {signed_in["person_id"],
                                                                         newsletter["person_id"]}


def test_a_higher_configured_cap_lets_two_email_hashes_join_one_person_up_to_the_cap() -> None:
    graph = IdentityGraph(identity_config(max_values={"email_sha256": 2}))
    graph.apply([make_link("user_id:u1", f"email_sha256:e{i}", T0 + i, "co-occurrence", f"ev{i}") for i in range(4)])
    assert sorted(i for i in graph.members("user_id:u1") if i.startswith("email_sha256:")) == [
        "email_sha256:e0", "email_sha256:e1"]
    refusals = [(a.action, a.event_id) for a in graph.take_changes().audit if a.action != "merge"]
    assert refusals == [("refuse_max_values", "ev2"), ("refuse_max_values", "ev3")]


def test_uncapping_a_kind_lets_any_number_of_its_values_join() -> None:
    graph = IdentityGraph(identity_config(max_values={}))
    graph.apply([make_link("user_id:u1", f"phone_sha256:p{i}", T0 + i, "co-occurrence", f"ev{i}") for i in range(3)])
    assert len(graph.members("user_id:u1")) == 4
    assert {a.action for a in graph.take_changes().audit} == {"merge"}


def test_unique_kinds_still_conflict_whatever_the_caps() -> None:
    for caps in ({}, {"email_sha256": 5}):
        graph = IdentityGraph(identity_config(max_values=caps))
        graph.apply([make_link("customer_id:c1", "email_sha256:shared", T0, "co-occurrence", "e1"),
                     make_link("customer_id:c2", "email_sha256:shared", T0 + 1, "co-occurrence", "e2")])
        assert graph.person_key("customer_id:c2") == "customer_id:c2"
        assert [a.action for a in graph.take_changes().audit] == ["merge", "refuse_conflict"]


def test_a_blocked_email_hash_never_links_whatever_the_caps() -> None:
    for caps in ({"email_sha256": 1}, {"email_sha256": 5}):
        enricher = Enricher(identity_config(max_values=caps))
        events = [touchpoint(event_id=f"x{i}", event_time=T0 + i, identifiers={"user_id": f"u{i}", "email_sha256": v})
                  for i, v in enumerate(["NULL", "guest", " "])]
        enricher.enrich(events)
        assert len({e["person_id"] for e in events}) == 3
        assert enricher.take_output().audit == []  # nothing was linked, so nothing was merged or refused
        assert enricher.graph is not None and not any(i.startswith("email_sha256:") for i in enricher.graph.first_seen)


@pytest.mark.parametrize("cap", [1, 2])
def test_the_cap_decides_by_event_time_whatever_order_the_links_arrive_in(cap: int) -> None:
    links = [make_link("user_id:u1", f"email_sha256:e{i}", T0 + i, "co-occurrence", f"ev{i}") for i in range(3)]
    states = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        graph = IdentityGraph(identity_config(max_values={"email_sha256": cap}))
        graph.apply(links[i] for i in order)
        states.append(_state(graph))
        # the earliest links win the person's email slots, whichever arrived first
        kept = sorted(["user_id:u1"] + [f"email_sha256:e{i}" for i in range(cap)])
        assert sorted(graph.members("user_id:u1")) == kept
    assert states[0] == states[1] == states[2]
