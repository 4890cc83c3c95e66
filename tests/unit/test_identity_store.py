"""The identity graph on its on-disk state and the identity log's keys, without servers."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings

from pipeline.adapters.identity_log import decode_record, log_records
from pipeline.adapters.identity_store import open_graph_state, seed_graph_state
from pipeline.core.enrich import Enricher
from pipeline.core.identity import (
    Fact,
    FactKind,
    Forget,
    IdentityGraph,
    Link,
    Operation,
    Unmerge,
    identifier_hash,
    make_link,
)
from tests.factories import identity_config, touchpoint
from tests.unit.test_identity import T0, _facts, _links, _state, _tight


@settings(max_examples=40, deadline=None)
@given(_links, _facts)
def test_the_graph_on_disk_with_a_tiny_cache_holds_the_same_persons_as_in_memory(
        tmp_path_factory: object, links: list[Link], facts: list[Fact]) -> None:
    directory = tmp_path_factory.mktemp("store")  # type: ignore[attr-defined]
    state = open_graph_state(directory, 3)  # evictions on almost every access
    on_disk, in_memory = IdentityGraph(_tight, state), IdentityGraph(_tight)
    ops: list[Operation] = [*links, *facts]
    on_disk.apply(ops)
    in_memory.apply(ops)
    assert _state(on_disk) == _state(in_memory)
    assert len(on_disk) == len(in_memory)
    on_disk.take_changes()
    state.close()
    reopened = IdentityGraph(_tight, open_graph_state(directory, 1_000))
    assert _state(reopened) == _state(in_memory)
    assert len(reopened) == len(in_memory)


def _visits(count: int) -> list[dict[str, object]]:
    """Sign-ins, app use, purchases and contacts over a few devices and users, so persons merge and hold facts."""
    events = []
    for n in range(count):
        kind = ("page_view", "identify", "purchase", "ticket_opened", "screen_view")[n % 5]
        events.append(touchpoint(f"v{n}", T0 + n * 1_000, event_type=kind, anonymous_id=f"dev-{n % 7}",
                                 user_id=f"u-{n % 5}" if kind != "page_view" else None,
                                 channel="MOBILE_APP" if kind == "screen_view" else "WEB"))
    return events


def test_enriching_against_the_store_in_batches_gives_what_the_memory_graph_gives(tmp_path: Path) -> None:
    """Batches read ahead with one multi-get and written back once each, with a cache smaller than a batch: the
    same enriched events and output as the in-memory graph, and the same graph once the store is reopened."""
    state = open_graph_state(tmp_path, 4)
    on_disk, in_memory = Enricher(identity_config(), state=state), Enricher(identity_config())
    for first in range(0, 60, 20):
        batch = _visits(60)[first:first + 20]
        on_disk.enrich(batch_on_disk := [dict(e) for e in batch])
        in_memory.enrich(batch_in_memory := [dict(e) for e in batch])
        assert batch_on_disk == batch_in_memory
        assert on_disk.take_output() == in_memory.take_output()
    assert on_disk.graph is not None and in_memory.graph is not None
    expected = _state(in_memory.graph)
    assert len(expected[0]) < 12  # persons merged
    state.close()
    assert _state(IdentityGraph(identity_config(), open_graph_state(tmp_path, 4))) == expected


def test_a_seeded_store_holds_the_graph_and_the_log_offset_of_its_source(tmp_path: Path) -> None:
    source = open_graph_state(tmp_path / "source", 100)
    graph = IdentityGraph(identity_config(), source)
    graph.apply([make_link("user_id:s", "anonymous_id:d", T0, "identify", "e"),
                 Fact("user_id:s", FactKind.PURCHASE, T0 + 1)])
    source.mapping("meta")["log_offset"] = 42
    graph.take_changes()
    expected = _state(graph)
    source.close()
    slot = seed_graph_state(tmp_path / "source" / "slot-0", tmp_path / "worker")
    seeded = open_graph_state(tmp_path / "worker", 100)
    assert seeded.path == slot
    assert _state(IdentityGraph(identity_config(), seeded)) == expected
    assert seeded.mapping("meta")["log_offset"] == 42


def test_a_second_process_slot_is_taken_when_the_first_is_held(tmp_path: Path) -> None:
    first = open_graph_state(tmp_path, 1_000)
    second = open_graph_state(tmp_path, 1_000)
    assert first.path != second.path
    first.close()
    second.close()
    assert open_graph_state(tmp_path, 1_000).path == first.path


def _compacted(records: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
    """What a compacted log keeps: the last value of each key, tombstoned keys gone."""
    latest: dict[bytes, bytes | None] = {}
    for key, value in records:
        latest[key] = value
    return {key: value for key, value in latest.items() if value is not None}


def test_a_compacted_log_keeps_one_record_per_key_and_nothing_of_an_erased_person() -> None:
    graph = IdentityGraph(identity_config())
    ops: list[Operation] = [
        Fact("user_id:erase-me", FactKind.SEEN, T0), Fact("anonymous_id:dev-x", FactKind.SEEN, T0),
        make_link("user_id:erase-me", "anonymous_id:dev-x", T0, "identify", "e1"),
        Fact("user_id:erase-me", FactKind.PURCHASE, T0 + 5), Fact("user_id:erase-me", FactKind.USE, T0 + 1),
        Fact("user_id:someone", FactKind.SEEN, T0 + 9),
    ]
    replayed = ops + ops  # the same operations written twice (a replay) cost one record each once compacted
    graph.apply(replayed)
    records = log_records(replayed)
    assert len(_compacted(records)) == len(ops)
    graph.take_changes()
    graph.apply([Forget("user_id:erase-me", T0 + 100)])
    records += log_records([Forget("user_id:erase-me", T0 + 100)])  # the erasure as the CLI writes it
    records += log_records([], graph.take_changes().erased)  # what a worker writes once it applied it
    kept = _compacted(records)
    text = b"".join(kept) + b"".join(kept.values())
    assert b"erase-me" not in text and b"dev-x" not in text
    survivors = [decode_record(value) for value in kept.values()]
    assert Fact("user_id:someone", FactKind.SEEN, T0 + 9) in survivors
    rebuilt = IdentityGraph(identity_config())
    rebuilt.apply(survivors)  # a new worker built from the compacted log
    assert "user_id:erase-me" not in rebuilt.first_seen
    assert rebuilt.is_forgotten("user_id:erase-me", T0 + 50)
    marker = kept[log_records([Forget("user_id:erase-me", 0)])[0][0]]  # the erasure's key: SHA-256 only
    assert json.loads(marker) == ["H", identifier_hash("user_id:erase-me"), T0 + 100]


def test_a_later_first_seen_from_the_log_makes_the_earlier_one_republished() -> None:
    enricher = Enricher(identity_config())
    assert enricher.graph is not None
    link = make_link("user_id:u", "anonymous_id:a", T0, "", "")
    enricher.graph.apply([Fact("user_id:u", FactKind.SEEN, T0), link])
    enricher.take_output()
    later = make_link("user_id:u", "anonymous_id:a", T0 + 9, "", "")
    enricher.apply([Fact("user_id:u", FactKind.SEEN, T0 + 50), later])
    republished = enricher.take_output().operations
    assert Fact("user_id:u", FactKind.SEEN, T0) in republished
    assert link in republished
    assert enricher.graph.first_seen["user_id:u"] == T0


def test_an_unmerge_on_the_store_splits_as_in_memory_and_its_cut_survives_reopening(tmp_path: Path) -> None:
    sign_in = make_link("user_id:um", "anonymous_id:um-d", T0, "identify", "e1")
    ops: list[Operation] = [sign_in, make_link("user_id:um", "anonymous_id:um-e", T0 + 1, "identify", "e2"),
                            Unmerge(sign_in.a, sign_in.b, T0 + 10, "id")]
    state = open_graph_state(tmp_path, 1_000)
    on_disk, in_memory = IdentityGraph(identity_config(), state), IdentityGraph(identity_config())
    on_disk.apply(ops)
    in_memory.apply(ops)
    on_disk.take_changes()
    assert _state(on_disk) == _state(in_memory)
    assert on_disk.person_key("anonymous_id:um-d") == "anonymous_id:um-d"
    state.close()
    reopened = IdentityGraph(identity_config(), open_graph_state(tmp_path, 1_000))
    reopened.apply([sign_in])  # the sign-in's event replayed after a restart: still cut
    assert reopened.person_key("anonymous_id:um-d") == "anonymous_id:um-d"
    assert [a.action for a in reopened.take_changes().audit] == ["refuse_unmerged"]


def test_erasing_an_unmerged_person_tombstones_the_unmerge_in_the_log() -> None:
    graph = IdentityGraph(identity_config())
    sign_in = make_link("user_id:gone", "anonymous_id:gone-d", T0, "identify", "e1")
    written: list[Operation] = [Fact("anonymous_id:gone-d", FactKind.SEEN, T0), sign_in,
                                Unmerge(sign_in.a, sign_in.b, T0 + 10, "id")]
    graph.apply(written)
    graph.take_changes()
    graph.forget("user_id:gone", T0 + 20)
    kept = _compacted(log_records(written, graph.take_changes().erased))
    assert not any(b"user_id:gone" in value for value in kept.values())
    assert b"anonymous_id:gone-d" in b" ".join(kept.values())  # the device is another person since the unmerge
    assert graph.severed == {}
