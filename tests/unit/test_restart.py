"""Bounded restart cost: a partition's open windows are snapshotted into its checkpoint, and windows restored from
the snapshot (plus the stored panes and counted event ids) treat every later record as the uninterrupted ones."""

import itertools
import zlib
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.aggregate import DUPLICATE, LATE, ON_TIME, Checkpoint, PartitionWindows, SnapshotMismatch
from pipeline.core.indicators import REGISTRY, catalogue
from pipeline.core.processor import TouchpointProcessor
from tests.factories import (
    BASE_MS,
    encode,
    identity_config,
    schema_for,
    stream_event,
    streams,
    task,
    touchpoint,
    window_config,
)

MINUTE = 60_000
HOPPING, GAP, BLOCK = 5 * MINUTE, 3 * MINUTE, 30 * MINUTE  # short, so small streams close many of each
LATENESS = 10_000


def _windows(indicators=REGISTRY) -> PartitionWindows:
    return PartitionWindows(0, MINUTE, LATENESS, indicators, hopping_ms=HOPPING, session_gap_ms=GAP,
                            session_max_ms=BLOCK)


def _restore(checkpoint: Checkpoint, stored, rows, indicators=REGISTRY) -> PartitionWindows:
    """What a restarted worker loads from storage: the "1m" cells of the panes before the closed horizon that
    hopping windows still cover (as ClickHouseSink.recent_panes selects them), and the event ids of the counted
    rows read before the checkpoint, from its open_from_ms on (as ClickHouseSink.pane_event_ids)."""
    panes = HOPPING // MINUTE - 1
    recent = [c for c in stored if c.window_kind == "1m" and c.window_start_ms < checkpoint.closed_before_ms
              and c.window_start_ms + panes * MINUTE >= checkpoint.closed_before_ms]
    ids = [(event["event_time"], event["event_id"]) for event, offset, counted in rows
           if counted and offset < checkpoint.read_offset and event["event_time"] >= checkpoint.open_from_ms]
    return PartitionWindows.restore(0, MINUTE, LATENESS, indicators, checkpoint, hopping_ms=HOPPING,
                                    session_gap_ms=GAP, session_max_ms=BLOCK, recent_panes=recent,
                                    pane_event_ids=ids)


def _table(cells) -> dict:
    """Cells keyed like the ReplacingMergeTree table: a rewritten cell replaces its earlier copy."""
    return {(c.window_kind, c.window_start_ms, c.window_end_ms, c.key): (c.count, c.total, c.sketch) for c in cells}


def _rows(events, offsets, fates):
    """The touchpoint rows a flush writes: every event but duplicates, counted unless late."""
    return [(e, o, f == ON_TIME) for e, o, f in zip(events, offsets, fates, strict=True) if f != DUPLICATE]


@settings(max_examples=300, deadline=None)
@given(streams(max_size=160), st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
       st.lists(st.integers(0, 20), min_size=4, max_size=4))
def test_restarts_from_snapshots_emit_and_decide_what_an_uninterrupted_run_does(stream, cuts, crash_after):
    """The worker snapshots at each cut, reads on a few records (their rows and cells are stored), dies, and a new
    one restores the snapshot and goes on from its read_offset. Fates, emitted cells and the open state (the
    snapshot, and the held-back checkpoint of the old format) equal the uninterrupted run's."""
    events, offsets = [stream_event(s) for s in stream], list(range(len(stream)))
    bounds = sorted({c % (len(stream) + 1) for c in cuts})

    uninterrupted = _windows()
    expected_fates: list[int] = []
    expected_state = {}
    for a, b in itertools.pairwise([0, *bounds]):
        expected_fates += uninterrupted.add(events[a:b], offsets[a:b])
        expected_state[b] = (uninterrupted.checkpoint(with_state=True), uninterrupted.checkpoint())
    expected_fates += uninterrupted.add(events[bounds[-1]:], offsets[bounds[-1]:])
    final_state = uninterrupted.snapshot()
    uninterrupted.advance_idle(BASE_MS + 10**9)
    expected = _table(uninterrupted.drain_closed())

    windows = _windows()
    stored, rows, fates = [], [], {}
    position = 0
    for cut, extra in zip(bounds, crash_after, strict=False):
        got = windows.add(events[position:cut], offsets[position:cut])
        fates.update(zip(offsets[position:cut], got, strict=True))
        rows += _rows(events[position:cut], offsets[position:cut], got)
        checkpoint = windows.checkpoint(with_state=True)
        stored += windows.drain_closed()
        assert checkpoint.commit_offset == checkpoint.read_offset == cut
        assert checkpoint == expected_state[cut][0]  # the same snapshot as the uninterrupted windows at this point
        crash = min(len(stream), cut + extra)  # read on, write rows and cells, then die before the next checkpoint
        got = windows.add(events[cut:crash], offsets[cut:crash])
        rows += _rows(events[cut:crash], offsets[cut:crash], got)
        stored += windows.drain_closed()

        windows = _restore(checkpoint, stored, rows)
        assert windows.snapshot() == checkpoint.state  # nothing lost or added in the round trip
        assert windows.checkpoint() == expected_state[cut][1]  # even the held-back offset of the old format
        position = cut
    got = windows.add(events[position:], offsets[position:])
    fates.update(zip(offsets[position:], got, strict=True))
    assert windows.snapshot() == final_state
    windows.advance_idle(BASE_MS + 10**9)
    table = _table(stored)
    table.update(_table(windows.drain_closed()))
    assert [fates[o] for o in offsets] == expected_fates
    assert table == expected


def test_a_session_and_a_pane_spanning_the_restart_go_on_and_duplicates_stay_duplicates():
    first = _windows()
    before = [task("SUCCESS", event_id="a", event_time=BASE_MS + 1_000, person_id="p"),
              task("FAILURE", event_id="b", event_time=BASE_MS + 2_000, person_id="p")]
    fates = first.add(before, [0, 1])
    checkpoint = first.checkpoint(with_state=True)
    assert checkpoint.commit_offset == checkpoint.read_offset == 2  # the open session no longer holds it back
    assert first.checkpoint().commit_offset == 0  # (the old format would replay from its first record)
    rows = _rows(before, [0, 1], fates)

    after = [task("SUCCESS", event_id="a", event_time=BASE_MS + 1_000, person_id="p"),  # redelivered
             task("SUCCESS", event_id="c", event_time=BASE_MS + 2 * MINUTE, person_id="p"),
             touchpoint("late", event_time=BASE_MS + 3_000, person_id="q")]
    restored = _restore(checkpoint, [], rows)
    assert restored.add(after, [2, 3, 4]) == [DUPLICATE, ON_TIME, LATE]
    without_ids = _restore(checkpoint, [], [])
    assert without_ids.add(after[:1], [2]) == [ON_TIME]  # the stored ids are what keeps the duplicate out

    restored.advance_idle(BASE_MS + 10**9)
    cells = _table(restored.drain_closed())
    pane = ("1m", BASE_MS, BASE_MS + MINUTE)
    assert cells[(*pane, ("bank", "WEB", "prospect", "", "", "task_success_rate"))] == (2.0, 1.0, ())
    sessions = [v for k, v in cells.items() if k[0] == "session" and k[3][-1] == "channels_per_session"]
    assert sessions == [(1.0, 1.0, ())]  # p's one session: a, b before the restart, c after


def test_a_changed_catalogue_maps_dropped_indicators_and_replays_for_new_ones():
    events = [stream_event((i, i * 7, i % 3, i % 10, i)) for i in range(40)]
    full = _windows()
    fates = full.add(events, list(range(40)))
    rows = _rows(events, list(range(40)), fates)
    checkpoint = full.checkpoint(with_state=True)
    stored = full.drain_closed()

    fewer = [ind for ind in REGISTRY if ind.id != "lcp_p75"]
    restored = _restore(checkpoint, stored, rows, fewer)  # a dropped indicator's counts are dropped with it
    restored.advance_idle(BASE_MS + 10**9)
    full.advance_idle(BASE_MS + 10**9)
    emitted = _table(restored.drain_closed())
    assert {k for k in emitted if k[0] == "1m" and k[3][-1] == "lcp_p75"} == set()
    # (hopping windows merge the stored panes as they are, which still have it)
    assert {k: v for k, v in emitted.items() if k[3][-1] != "lcp_p75"} == {
        k: v for k, v in _table(full.drain_closed()).items() if k[3][-1] != "lcp_p75"}

    smaller = _windows(fewer)
    smaller.add(events, list(range(40)))
    with pytest.raises(SnapshotMismatch, match="lcp_p75") as raised:  # its open panes would miss the counts
        _restore(smaller.checkpoint(with_state=True), stored, rows)
    assert raised.value.replay_from == smaller.checkpoint()  # so the open windows are rebuilt from the records
    slower = catalogue({"login": 9_000})  # Apdex T is part of the definition: counts of another T not mixed in
    with pytest.raises(SnapshotMismatch, match="apdex"):
        _restore(checkpoint, stored, rows, slower)
    with pytest.raises(SnapshotMismatch, match="window settings"):
        PartitionWindows.restore(0, MINUTE, LATENESS * 2, REGISTRY, checkpoint, hopping_ms=HOPPING,
                                 session_gap_ms=GAP, session_max_ms=BLOCK)
    with pytest.raises(ValueError, match="version 9"):
        state = zlib.compress(zlib.decompress(checkpoint.state).replace(b'"version":1', b'"version":9'))
        _restore(replace(checkpoint, state=state), stored, rows)


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple = ()


SNAPSHOT_EVERY = 5_000


def _processor() -> TouchpointProcessor:
    return TouchpointProcessor(window_config(MINUTE, 0, 300_000, 1_000, session_gap_ms=30 * MINUTE), schema_for,
                               identity_config(),
                               identity_enabled=False, snapshot_interval_ms=SNAPSHOT_EVERY)


def _records(first_offset: int, events) -> list[Record]:
    return [Record(0, first_offset + n, encode(e)) for n, e in enumerate(events)]


def test_checkpoints_carry_state_at_most_every_interval_and_commit_what_was_read():
    processor = _processor()
    assert processor.assign(0, None, now_ms=BASE_MS).how == "new"
    events = [task("SUCCESS", event_id=f"e{i}", event_time=BASE_MS + i * 1_000, user_id=f"u{i % 3}")
              for i in range(30)]
    processor.process(0, _records(0, events[:10]), now_ms=BASE_MS)
    first = processor.take_output(BASE_MS).checkpoints[0]  # the first output after the assignment has one
    assert first.state is not None and first.commit_offset == first.read_offset == 10  # sessions are open
    processor.process(0, _records(10, events[10:20]), now_ms=BASE_MS + 1_000)
    assert processor.take_output(BASE_MS + SNAPSHOT_EVERY - 1).checkpoints == {}  # too soon: no commit
    assert processor.take_output(BASE_MS + SNAPSHOT_EVERY).checkpoints[0].read_offset == 20
    assert processor.take_output(BASE_MS + 10 * SNAPSHOT_EVERY).checkpoints == {}  # nothing moved since
    processor.process(0, _records(20, events[20:]), now_ms=BASE_MS + SNAPSHOT_EVERY + 1)
    forced = processor.take_output(BASE_MS + SNAPSHOT_EVERY + 1, force_checkpoints=True).checkpoints[0]
    assert forced.commit_offset == forced.read_offset == 30  # a stop or revoke does not wait for the interval


def test_a_processor_restored_from_a_checkpoint_with_state_counts_as_if_never_stopped():
    events = [task("FAILURE" if i % 4 == 0 else "SUCCESS", event_id=f"e{i}", event_time=BASE_MS + i * 3_000,
                   user_id=f"u{i % 5}") for i in range(60)]
    events.insert(40, events[35])  # a redelivery after the restart of an event read before it
    records = _records(0, events)

    def closed(processor, outputs):
        processor.tick(BASE_MS + 10**8, caught_up={0})
        outputs.append(processor.take_output(BASE_MS + 10**8, force_checkpoints=True))
        return ({(c.window_kind, c.window_start_ms, c.key): (c.count, c.total) for o in outputs
                 for c in o.window_cells}, sum((o.duplicates for o in outputs), start=Counter()))

    whole = _processor()
    whole.assign(0, None, BASE_MS)
    whole.process(0, records, BASE_MS)
    expected = closed(whole, [])

    first = _processor()
    first.assign(0, None, BASE_MS)
    first.process(0, records[:37], BASE_MS)
    outputs = [first.take_output(BASE_MS, force_checkpoints=True)]
    checkpoint = outputs[0].checkpoints[0]
    assert checkpoint.commit_offset == 37
    first.process(0, records[37:45], BASE_MS)  # rows and cells stored, then killed before the next checkpoint
    outputs.append(first.take_output(BASE_MS))
    assert outputs[-1].checkpoints == {}

    rows = [row for o in outputs for row in o.touchpoints]
    ids = [(row[1], row[0]) for row in rows
           if row[-1] == 1 and row[-2] < checkpoint.read_offset and row[1] >= checkpoint.open_from_ms]
    second = _processor()
    recent = [c for c in outputs[0].window_cells if c.window_kind == "1m"]
    resume = second.assign(0, checkpoint, BASE_MS, recent_panes=recent, pane_event_ids=ids)
    assert (resume.offset, resume.how) == (37, "state")  # read on from the snapshot: 8 records replayed, not 45
    second.process(0, records[resume.offset:], BASE_MS)
    assert closed(second, outputs[:1]) == expected
    with pytest.raises(ValueError, match="event ids"):
        _processor().assign(0, checkpoint, BASE_MS)


def test_a_checkpoint_whose_snapshot_cannot_be_continued_falls_back_to_replaying_its_open_windows():
    events = [task("SUCCESS", event_id=f"e{i}", event_time=BASE_MS + i * 1_000, user_id="u") for i in range(10)]
    first = _processor()
    first.assign(0, None, BASE_MS)
    first.process(0, _records(100, events), BASE_MS)
    checkpoint = first.take_output(BASE_MS).checkpoints[0]
    other = TouchpointProcessor(window_config(MINUTE, 5_000, 300_000, 1_000), schema_for, identity_config(),
                                identity_enabled=False,
                                snapshot_interval_ms=SNAPSHOT_EVERY)
    resume = other.assign(0, checkpoint, BASE_MS, pane_event_ids=[])
    assert (resume.offset, resume.how) == (100, "replay") and "window settings" in resume.note


@settings(max_examples=200, deadline=None)
@given(streams(max_size=120), st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000))
def test_an_upgrade_from_a_checkpoint_without_state_then_snapshots_emits_what_an_uninterrupted_run_does(
        stream, old_cut, new_cut, crash_after):
    """An old worker checkpoints without state and dies; the new one replays from the held-back offset (with the
    stored ids of the panes open there), snapshots during or after that replay, dies, and is restored."""
    events, offsets = [stream_event(s) for s in stream], list(range(len(stream)))
    uninterrupted = _windows()
    expected_fates = uninterrupted.add(events, offsets)
    uninterrupted.advance_idle(BASE_MS + 10**9)
    expected = _table(uninterrupted.drain_closed())
    old_cut = old_cut % (len(stream) + 1)
    crash = min(len(stream), old_cut + crash_after % 20)

    old = _windows()
    fates = old.add(events[:old_cut], offsets[:old_cut])
    stored = old.drain_closed()
    held_back = old.checkpoint()
    fates += old.add(events[old_cut:crash], offsets[old_cut:crash])
    stored += old.drain_closed()
    rows = _rows(events[:crash], offsets[:crash], fates)

    start = held_back.commit_offset
    recent = [c for c in stored if c.window_kind == "1m" and c.window_start_ms < held_back.closed_before_ms]
    ids = [(e["event_time"], e["event_id"]) for e, o, counted in rows
           if counted and o < start and e["event_time"] >= held_back.open_from_ms]
    new = PartitionWindows(0, MINUTE, LATENESS, checkpoint=held_back, hopping_ms=HOPPING, session_gap_ms=GAP,
                           session_max_ms=BLOCK, recent_panes=recent, pane_event_ids=ids)
    new_cut = start + new_cut % (len(stream) - start + 1)
    replayed = new.add(events[start:new_cut], offsets[start:new_cut])
    assert replayed == expected_fates[start:new_cut]  # the replay decides every fate as the first run did
    rows = [r for r in rows if r[1] < start] + _rows(events[start:new_cut], offsets[start:new_cut], replayed)
    checkpoint = new.checkpoint(with_state=True)
    stored += new.drain_closed()

    restored = _restore(checkpoint, stored, rows)
    assert restored.snapshot() == checkpoint.state
    assert restored.add(events[new_cut:], offsets[new_cut:]) == expected_fates[new_cut:]
    restored.advance_idle(BASE_MS + 10**9)
    table = _table(stored)
    table.update(_table(restored.drain_closed()))
    assert table == expected


def test_a_snapshot_taken_at_a_replay_point_keeps_the_ids_of_panes_the_replay_has_not_reopened_yet():
    events = [touchpoint("a", BASE_MS, person_id="p"),
              touchpoint("b", BASE_MS + 5_000, person_id="q"),
              touchpoint("a", BASE_MS + 6_000, person_id="q"),  # a redelivery: a duplicate in the first pane
              *(touchpoint(i, BASE_MS + s * 1_000, person_id="q") for i, s in (("c", 70), ("d", 150), ("e", 230)))]
    offsets = list(range(len(events)))
    old = _windows()
    fates = old.add(events, offsets)
    assert fates[2] == DUPLICATE
    held_back = old.checkpoint()
    assert held_back.commit_offset == 1  # q's session; p's (and the first pane) closed and final
    ids = [(e["event_time"], e["event_id"]) for e, o, counted in _rows(events, offsets, fates)
           if counted and o < 1 and e["event_time"] >= held_back.open_from_ms]
    new = PartitionWindows(0, MINUTE, LATENESS, checkpoint=held_back, hopping_ms=HOPPING, session_gap_ms=GAP,
                           session_max_ms=BLOCK, recent_panes=old.drain_closed(), pane_event_ids=ids)
    checkpoint = new.checkpoint(with_state=True)  # before the replay reopened the first pane
    restored = _restore(checkpoint, [], _rows(events, offsets, fates))
    assert restored.add(events[1:], offsets[1:]) == fates[1:]
