"""Reversible merges and late identify: the graph splits the persons again, and stored rows and role-split
indicator cells are restated to what the same events give when the graph knew it from the start."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.core.aggregate import SESSION, WindowCell, add_cells
from pipeline.core.identity import (
    DAY_MS,
    IdentityGraph,
    Link,
    Unmerge,
    audit_id_of,
    decode_operation,
    encode_operation,
    make_link,
    person_id_of,
)
from pipeline.core.processor import Output, TouchpointProcessor, TouchpointRow
from tests.factories import BASE_MS, encode, identity_config, schema_for, task, touchpoint, window_config
from tests.unit.test_runner import Record

MINUTE = 60_000
T0 = BASE_MS + 10 * MINUTE


def _unmerge_of(audit: Any, at_ms: int) -> Unmerge:
    return Unmerge(audit.identifier_a, audit.identifier_b, at_ms,
                   audit_id_of(audit.action, audit.identifier_a, audit.identifier_b, audit.at_ms, audit.event_id))


# --- the graph ---------------------------------------------------------------------------------------------------

def test_an_unmerge_splits_the_persons_as_they_were_before_the_merge_and_a_replay_does_not_join_them_again():
    graph = IdentityGraph(identity_config())
    graph.add_link(make_link("anonymous_id:a", "anonymous_id:b", T0, "co-occurrence", "e0"))  # a's side before
    graph.add_link(make_link("anonymous_id:a", "user_id:u", T0 + 1, "identify", "e1"))  # the merge to undo
    graph.add_link(make_link("anonymous_id:b", "user_id:u", T0 + 2, "co-occurrence", "e2"))  # between the sides too
    graph.add_link(make_link("email_sha256:e", "user_id:u", T0 + 3, "identify", "e3"))  # u's side, later
    merge = next(a for a in graph.take_changes().audit if a.event_id == "e1")
    assert len(graph.persons()) == 1

    graph.unmerge(_unmerge_of(merge, T0 + MINUTE))

    changes = graph.take_changes()
    assert sorted(graph.persons().values(), key=sorted) == [
        frozenset({"anonymous_id:a", "anonymous_id:b"}), frozenset({"email_sha256:e", "user_id:u"})]
    [audit] = [a for a in changes.audit if a.action == "unmerge"]
    assert audit.from_person_id == person_id_of("user_id:u") and audit.reason.startswith("2 links cut")
    assert set(changes.unmerged) == {"anonymous_id:a", "anonymous_id:b", "user_id:u", "email_sha256:e"}
    # The merge's event replayed (a redelivery, a dead-letter replay): refused and audited, the persons stay apart.
    assert not graph.add_link(make_link("anonymous_id:a", "user_id:u", T0 + 1, "identify", "e1"))
    assert [a.action for a in graph.take_changes().audit] == ["refuse_unmerged"]
    assert len(graph.persons()) == 2
    # A sign-in after the unmerge joins them again: the operator cut the past, not the future.
    assert graph.add_link(make_link("anonymous_id:a", "user_id:u", T0 + 2 * MINUTE, "identify", "e9"))
    assert len(graph.persons()) == 1


def test_an_unmerge_travels_the_identity_log_and_of_an_unknown_pair_only_records_the_cut():
    op = Unmerge("anonymous_id:a", "user_id:u", T0, "19a-00ff00ff")
    assert decode_operation(encode_operation(op)) == op
    graph = IdentityGraph(identity_config())
    graph.apply([op])
    assert [a.reason for a in graph.take_changes().audit] == ["no such link: nothing to split"]
    assert not graph.add_link(make_link("anonymous_id:a", "user_id:u", T0 - 5, "identify", "late"))


def test_the_audit_id_starts_with_the_rows_time_so_it_is_found_by_time():
    audit_id = audit_id_of("merge", "anonymous_id:a", "user_id:u", T0, "e1")
    assert int(audit_id.split("-")[0], 16) == T0
    assert audit_id != audit_id_of("merge", "anonymous_id:a", "user_id:u", T0, "e2")


# --- rows and cells ------------------------------------------------------------------------------------------------

def _processor(horizon_ms: int = 0) -> TouchpointProcessor:
    processor = TouchpointProcessor(window_config(MINUTE, 0, 300_000, 1_000), schema_for,
                                    identity_config(restate_horizon_ms=horizon_ms))
    processor.assign(0, None, T0)
    return processor


class Stored:
    """What ClickHouse holds after each flush: one row per event (the latest write), cells with changes added."""

    def __init__(self) -> None:
        self.rows: dict[str, TouchpointRow] = {}
        self.cells: dict[tuple[Any, ...], WindowCell] = {}
        self.audit: list[Any] = []

    def write(self, out: Output) -> None:
        self.audit.extend(out.identity.audit)
        for row in [*out.touchpoints, *out.restated]:
            self.rows[row.event_id] = row
        for cell in out.window_cells:
            self.cells[_key(cell)] = cell
        if out.cell_changes:
            for cell in add_cells([self.cells[k] for k in map(_key, out.cell_changes) if k in self.cells],
                                  out.cell_changes):
                self.cells[_key(cell)] = cell

    def figures(self) -> dict[tuple[Any, ...], tuple[float, float, tuple[tuple[int, int], ...]]]:
        return _figures(self.cells.values())


def _key(cell: WindowCell) -> tuple[Any, ...]:
    return cell.window_kind, cell.window_start_ms, cell.key, cell.partition


def _figures(cells: Any) -> dict[tuple[Any, ...], tuple[float, float, tuple[tuple[int, int], ...]]]:
    return {_key(c): (c.count, round(c.total, 9), c.sketch) for c in cells if c.count and c.window_kind != SESSION}


def _feed(processor: TouchpointProcessor, events: list[dict[str, Any]], offset: int, now_ms: int) -> int:
    processor.process(0, [Record(0, offset + n, encode(e)) for n, e in enumerate(events)], now_ms)
    return offset + len(events)


def _close_all(processor: TouchpointProcessor, now_ms: int) -> None:
    processor.tick(now_ms + 60 * MINUTE, {0})


def _history() -> list[dict[str, Any]]:
    """A customer c; an anonymous device a whose first visit comes before c signs in on it; then a's visits."""
    return [
        touchpoint("buy", T0 - 5 * MINUTE, channel="BILLING", event_type="purchase", anonymous_id=None,
                   customer_id="c", amount={"minor_units": 1_000, "currency": "EUR"}),
        task("FAILURE", event_id="visit", event_time=T0, anonymous_id="a", duration_ms=2_000),
        touchpoint("signin", T0 + MINUTE, event_type="identify", anonymous_id="a", customer_id="c"),
        task("SUCCESS", event_id="after-1", event_time=T0 + 2 * MINUTE, anonymous_id="a", duration_ms=900),
        task("FAILURE", event_id="after-2", event_time=T0 + 2 * MINUTE + 10, anonymous_id="a", duration_ms=4_000),
    ]


def _reference(events: list[dict[str, Any]], first: list[Any], horizon_ms: int = 0) -> Stored:
    """The same events through a processor whose graph had the identity operations from the start."""
    processor = _processor(horizon_ms)
    processor.apply_identity(first)
    stored = Stored()
    _feed(processor, events, 0, T0 + 30 * MINUTE)
    _close_all(processor, T0 + 30 * MINUTE)
    stored.write(processor.take_output(force_checkpoints=True))
    return stored


def _merge_audit(out: Output) -> Any:
    return next(a for a in out.identity.audit if a.action == "merge" and a.event_id == "signin")


def test_an_unmerge_restates_the_rows_and_the_role_split_cells_of_closed_windows():
    processor, stored = _processor(), Stored()
    now = T0 + 30 * MINUTE
    _feed(processor, _history(), 0, now)
    _close_all(processor, now)
    first = processor.take_output(force_checkpoints=True)
    stored.write(first)
    assert {stored.rows[e].person_id for e in ("after-1", "after-2")} == {person_id_of("customer_id:c")}
    unmerge = _unmerge_of(_merge_audit(first), now)

    processor.apply_identity([unmerge])
    restatement = processor.take_restatement()
    assert restatement is not None and restatement.since["anonymous_id:a"] == T0 + MINUTE
    processor.restate(restatement, stored.rows.values())
    out = processor.take_output(force_checkpoints=True)
    stored.write(out)

    assert sorted(row.event_id for row in out.restated) == ["after-1", "after-2"]
    assert {(r.person_id, r.role) for r in out.restated} == {(person_id_of("anonymous_id:a"), "prospect")}
    assert ("p-" + person_id_of("customer_id:c")[2:], "after-1") in out.moved_events
    reference = _reference(_history(), [unmerge])
    assert {e: (r.person_id, r.role) for e, r in stored.rows.items()} == {
        e: (r.person_id, r.role) for e, r in reference.rows.items()}
    assert out.cell_changes and stored.figures() == reference.figures()
    roles = {key[2][2] for key, (count, _, _) in stored.figures().items() if key[2][5] == "task_success_rate"}
    assert roles == {"prospect"}  # the customer's role no longer counts the device's tasks


def test_an_unmerge_while_the_windows_are_open_changes_them_in_place_before_they_are_emitted():
    processor, stored = _processor(), Stored()
    now = T0 + 3 * MINUTE
    _feed(processor, _history(), 0, now)
    first = processor.take_output(now)
    stored.write(first)
    processor.apply_identity([_unmerge_of(_merge_audit(first), now)])
    restatement = processor.take_restatement()
    assert restatement is not None
    processor.restate(restatement, stored.rows.values())
    _close_all(processor, now)
    stored.write(processor.take_output(force_checkpoints=True))
    assert stored.figures() == _reference(_history(), [_unmerge_of(_merge_audit(first), now)]).figures()


def test_late_identify_restates_rows_within_the_horizon_and_records_those_outside():
    now = T0 + 30 * MINUTE
    for horizon, restated in ((5 * MINUTE, True), (30_000, False)):
        processor, stored = _processor(horizon), Stored()
        events = _history()[:3]  # the purchase, the anonymous visit, then the sign-in a minute later
        _feed(processor, events[:2], 0, now)
        _close_all(processor, now - 20 * MINUTE)
        stored.write(processor.take_output(force_checkpoints=True))
        assert stored.rows["visit"].role == "prospect"
        _feed(processor, events[2:], 2, now)
        restatement = processor.take_restatement()
        assert restatement is not None
        processor.restate(restatement, stored.rows.values())
        _close_all(processor, now)
        out = processor.take_output(force_checkpoints=True)
        stored.write(out)
        visit = stored.rows["visit"]
        if restated:
            assert (visit.person_id, visit.role) == (person_id_of("customer_id:c"), "customer")
            link = make_link("anonymous_id:a", "customer_id:c", T0 + MINUTE, "identify", "signin")
            assert stored.figures() == _reference(events, [link], horizon).figures()
        else:
            assert (visit.person_id, visit.role) == (person_id_of("anonymous_id:a"), "prospect")
            assert [a.identifier_a for a in out.identity.audit if a.action == "not_restated"] == ["anonymous_id:a"]


def test_stored_cells_take_signed_changes_and_a_cell_left_empty_counts_nothing():
    cell = WindowCell("1m", 0, MINUTE, "bank", "WEB", "customer", "", "", "lcp_p75", 0, 2.0, 3_000.0,
                      ((10, 1), (12, 1)))
    minus = WindowCell("1m", 0, MINUTE, "bank", "WEB", "customer", "", "", "lcp_p75", 0, -1.0, -1_000.0, ((10, -1),))
    plus = WindowCell("1m", 0, MINUTE, "bank", "WEB", "prospect", "", "", "lcp_p75", 0, 1.0, 1_000.0, ((10, 1),))
    result = {c.role: (c.count, c.total, c.sketch) for c in add_cells([cell], [minus, plus])}
    assert result == {"customer": (1.0, 2_000.0, ((12, 1),)), "prospect": (1.0, 1_000.0, ((10, 1),))}
    emptied = add_cells([cell], [WindowCell(**{**_fields(minus), "count": -2.0, "total": -3_000.0,
                                                 "sketch": ((10, -1), (12, -1))})])
    assert [(c.count, c.total, c.sketch) for c in emptied] == [(0.0, 0.0, ())]


def _fields(cell: WindowCell) -> dict[str, Any]:
    return {name: getattr(cell, name) for name in WindowCell.__dataclass_fields__}


def test_links_are_untouched_by_an_unmerge_of_another_pair():
    graph = IdentityGraph(identity_config())
    graph.apply([make_link("anonymous_id:x", "user_id:y", T0, "identify", "x")])
    graph.apply([Unmerge("anonymous_id:a", "user_id:u", T0 + 1, "id")])
    assert graph.person_key("anonymous_id:x") == "user_id:y"
    assert isinstance(decode_operation(encode_operation(make_link("a:1", "b:2", 1, "link", ""))), Link)


def test_rows_and_cells_not_yet_written_are_restated_in_the_same_write():
    processor, stored = _processor(), Stored()
    now = T0 + 30 * MINUTE
    _feed(processor, _history(), 0, now)
    _close_all(processor, now)  # every window closed: the cells wait in the output with the rows
    merge = next(a for a in processor.enricher.graph.changes.audit if a.event_id == "signin")  # type: ignore[union-attr]
    unmerge = _unmerge_of(merge, now)
    processor.apply_identity([unmerge])
    restatement = processor.take_restatement()
    assert restatement is not None
    processor.restate(restatement, [])
    out = processor.take_output(force_checkpoints=True)
    stored.write(out)
    assert not out.restated and {r.event_id: r.person_id for r in out.touchpoints}["after-1"] == person_id_of(
        "anonymous_id:a")
    assert stored.figures() == _reference(_history(), [unmerge]).figures()


_IDS = {"anonymous_id": ["a1", "a2"], "user_id": ["u1"], "customer_id": ["c1"]}


@st.composite
def _histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Small histories in event-time order: tasks of devices, sign-ins joining two identifiers, app screens (using
    the product), purchases and a known person's page views."""
    events = []
    at = T0
    for n in range(draw(st.integers(4, 14))):
        at += draw(st.integers(1, 90)) * 1_000
        ids: dict[str, Any] = {"anonymous_id": None, "user_id": None, "customer_id": None}
        kind = draw(st.sampled_from(["task", "screen", "signin", "purchase", "visit"]))
        if kind == "visit":  # a known customer's or user's page view (no fact): its role comes from the others'
            value = draw(st.sampled_from(["u1", "c1"]))
            ids["user_id" if value == "u1" else "customer_id"] = value
            events.append(touchpoint(f"e{n}", at, event_type="page_view", identifiers=ids))
        elif kind == "signin":
            first, second = draw(st.lists(st.sampled_from(["a1", "a2", "u1", "c1"]), min_size=2, max_size=2,
                                          unique=True))
            for value in (first, second):
                ids[next(k for k, values in _IDS.items() if value in values)] = value
            events.append(touchpoint(f"e{n}", at, event_type="identify", identifiers=ids))
        elif kind == "purchase":
            ids["customer_id"] = "c1"
            events.append(touchpoint(f"e{n}", at, channel="BILLING", event_type="purchase", identifiers=ids,
                                     amount={"minor_units": 100, "currency": "EUR"}))
        else:
            ids["anonymous_id"] = draw(st.sampled_from(["a1", "a2"]))
            if kind == "screen":
                events.append(touchpoint(f"e{n}", at, channel="MOBILE_APP", event_type="screen_view",
                                         identifiers=ids))
            else:
                events.append(task(draw(st.sampled_from(["SUCCESS", "FAILURE"])), event_id=f"e{n}", event_time=at,
                                   identifiers=ids, duration_ms=draw(st.integers(100, 9_000))))
    return events


@settings(max_examples=100, deadline=None)
@given(_histories(), st.data())
def test_after_late_identifies_and_an_unmerge_the_stored_figures_are_those_of_the_graph_as_it_ends(events, data):
    """Whatever the history, restating as the runner does (late identifies within the horizon at each flush, then
    an unmerge of one of the merges) leaves every row and cell as the same events give with the final graph."""
    horizon = DAY_MS
    processor, stored = _processor(horizon), Stored()
    now = events[-1]["event_time"] + 30 * MINUTE
    offset = 0
    for cut in sorted(set(data.draw(st.lists(st.integers(1, len(events)), max_size=3))) | {len(events)}):
        batch = events[offset:cut]
        offset = _feed(processor, batch, offset, now)
        restatement = processor.take_restatement()
        if restatement is not None:
            processor.restate(restatement, list(stored.rows.values()))
        if data.draw(st.booleans()):
            _close_all(processor, batch[-1]["event_time"] + 2 * MINUTE - 60 * MINUTE)
        stored.write(processor.take_output(now))
    _close_all(processor, now)
    stored.write(processor.take_output(force_checkpoints=True))
    _assert_as_the_graph_says(processor, stored, events, now)  # late identifies restated
    merges = [a for a in stored.audit if a.action == "merge"]
    assume(merges)
    unmerge = _unmerge_of(data.draw(st.sampled_from(merges)), now)
    processor.apply_identity([unmerge])
    restatement = processor.take_restatement()
    if restatement is not None:
        processor.restate(restatement, list(stored.rows.values()))
    stored.write(processor.take_output(force_checkpoints=True))

    _assert_as_the_graph_says(processor, stored, events, now)


def _assert_as_the_graph_says(processor: TouchpointProcessor, stored: Stored, events: list[dict[str, Any]],
                              now: int) -> None:
    """Every stored row and cell is what the same events give when resolved with the processor's graph as it is
    now. A link it does not hold (two identifiers met while already one person, so never recorded) must not join
    what an unmerge split: the reference links nothing."""
    final = copy.deepcopy(processor.enricher.graph)
    assert final is not None
    final.add_link = lambda link: False  # type: ignore[method-assign]
    reference_processor = _processor(processor.enricher.config.restate_horizon_ms)
    reference_processor.enricher.graph = final
    reference = Stored()
    _feed(reference_processor, events, 0, now)
    _close_all(reference_processor, now)
    reference.write(reference_processor.take_output(force_checkpoints=True))
    assert {e: (r.person_id, r.role) for e, r in stored.rows.items()} == {
        e: (r.person_id, r.role) for e, r in reference.rows.items()}
    assert stored.figures() == reference.figures()
