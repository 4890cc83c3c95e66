"""The core flow without servers: validate, enrich, aggregate, evaluate, and the processor around them."""

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.aggregate import DUPLICATE, LATE, NEVER, ON_TIME, Checkpoint, PartitionWindows
from pipeline.core.alerting import RuleError, observe, parse_rule, parse_rules
from pipeline.core.enrich import Enricher
from pipeline.core.evaluate import totals_of
from pipeline.core.indicators import BY_ID, observation
from pipeline.core.processor import TOUCHPOINT_COLUMNS, TouchpointProcessor
from pipeline.core.validate import CONTRACT_VIOLATION, FUTURE_EVENT_TIME, violation
from tests.factories import (
    BASE_MS,
    csat,
    encode,
    identity_config,
    schema_for,
    stream_event,
    streams,
    task,
    touchpoint,
    window_config,
    window_lengths,
)

MINUTE = 60_000


def test_violation_names_the_broken_rule():
    now = BASE_MS
    assert violation(touchpoint(), now, 300_000) is None
    assert violation(touchpoint(event_time=now + 301_000), now, 300_000)[0] == FUTURE_EVENT_TIME
    assert violation(touchpoint(anonymous_id="null"), now, 300_000) == (
        CONTRACT_VIOLATION, "no identifier: anonymous_id, user_id, customer_id are all blank or blocked")
    assert "outside its scale" in violation(csat(9), now, 300_000)[1]
    assert "negative" in violation(touchpoint(duration_ms=-5), now, 300_000)[1]
    assert violation(touchpoint(event_id=" "), now, 300_000) == (CONTRACT_VIOLATION, "event_id is empty")


def test_without_the_identity_graph_the_strongest_identifier_names_the_person_and_implies_the_role():
    events = [touchpoint(anonymous_id="a"), touchpoint(user_id="u", customer_id="0"),
              touchpoint(user_id="u", customer_id="c")]
    Enricher(identity_config(), enabled=False).enrich(events)
    assert [e["role"] for e in events] == ["prospect", "user", "customer"]
    assert events[1]["resolved_from"] == ["user_id:u", "anonymous_id:a-1"]
    assert len({e["person_id"] for e in events}) == 3


def test_indicators_observe_what_their_definition_says():
    assert observation(BY_ID["csat"], csat(4, about="STORE")) == ("STORE", 1.0)
    assert observation(BY_ID["csat"], csat(3)) == ("SURVEY", 0.0)
    assert observation(BY_ID["task_success_rate"], task("ABANDONED")) == ("WEB", 0.0)
    assert observation(BY_ID["error_rate"], task("FAILURE")) == ("WEB", 1.0)
    assert observation(BY_ID["error_rate"], touchpoint(event_type="app_crash", channel="MOBILE_APP")) == (
        "MOBILE_APP", 1.0)
    assert observation(BY_ID["error_rate"], csat(5)) is None


def _cells(windows_cells):
    return {(c.window_kind, c.window_start_ms, c.window_end_ms, c.key): (c.count, c.total, c.sketch)
            for c in windows_cells}


def test_window_closes_when_watermark_passes_and_late_events_are_not_counted():
    windows = PartitionWindows(0, MINUTE, lateness_ms=5_000, **window_lengths())
    events = [task("SUCCESS", event_id="1", event_time=BASE_MS + 1_000),
              task("FAILURE", event_id="2", event_time=BASE_MS + 30_000),
              task("SUCCESS", event_id="1", event_time=BASE_MS + 1_000),  # duplicate
              task("SUCCESS", event_id="3", event_time=BASE_MS + MINUTE + 5_000),  # watermark = end: closes
              task("SUCCESS", event_id="4", event_time=BASE_MS + 59_000)]  # late
    fates = windows.add(events, list(range(5)))
    assert fates == [ON_TIME, ON_TIME, DUPLICATE, ON_TIME, LATE]
    cells = _cells(windows.drain_closed())
    pane = ("1m", BASE_MS, BASE_MS + MINUTE)
    assert cells[(*pane, ("bank", "WEB", "prospect", "", "", "task_success_rate"))] == (2.0, 1.0, ())
    assert cells[(*pane, ("bank", "WEB", "prospect", "", "", "error_rate"))] == (2.0, 1.0, ())
    checkpoint = windows.checkpoint()
    assert checkpoint.commit_offset == 0 and checkpoint.read_offset == 5  # the person's session is open
    assert checkpoint.closed_before_ms == BASE_MS + MINUTE


HOPPING, GAP, BLOCK = 5 * MINUTE, 3 * MINUTE, 30 * MINUTE  # short, so small streams close many of each


def _windows(checkpoint=None, recent_panes=(), pane_event_ids=()):
    return PartitionWindows(0, MINUTE, 10_000, checkpoint=checkpoint, hopping_ms=HOPPING, session_gap_ms=GAP,
                            session_max_ms=BLOCK, recent_panes=recent_panes, pane_event_ids=pane_event_ids)


def _run(stream, cuts: list[int]):
    """Run in batches split at cuts, then close everything; emitted cells by key, and the fates."""
    windows = _windows()
    events, offsets = [stream_event(s) for s in stream], list(range(len(stream)))
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    fates = []
    for a, b in itertools.pairwise(bounds):
        fates += windows.add(events[a:b], offsets[a:b])
    windows.advance_idle(BASE_MS + 10**9)
    return _cells(windows.drain_closed()), fates


@settings(max_examples=200, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=6))
def test_results_do_not_depend_on_how_the_stream_is_batched(stream, cuts):
    cells, fates = _run(stream, cuts)
    assert (cells, fates) == _run(stream, [])
    assert {kind for kind, *_ in cells} <= {"1m", "15m", "session"}


def test_every_window_kind_is_emitted():
    stream = [(i, i * 40, i % 2, i % 10, i) for i in range(30)]
    kinds = {kind for kind, *_ in _run(stream, [])[0]}
    assert kinds == {"1m", "15m", "session"}


@settings(max_examples=200, deadline=None)
@given(streams(), st.integers(0, 10_000), st.integers(0, 10_000))
def test_crash_and_replay_from_checkpoint_emits_what_an_uninterrupted_run_emits(stream, crash_at, flush_at):
    """A worker flushes (writes closed cells + checkpoint) at flush_at, processes on to crash_at, dies; a new one
    restores the checkpoint and the stored panes hopping windows still need, and replays from the commit offset.
    Rows are keyed like the ReplacingMergeTree table, so a rewritten row replaces its earlier copy."""
    expected, _ = _run(stream, [])
    events, offsets = [stream_event(s) for s in stream], list(range(len(stream)))
    flush_at = flush_at % (len(stream) + 1)
    crash_at = max(flush_at, crash_at % (len(stream) + 1))
    first = _windows()
    fates = first.add(events[:flush_at], offsets[:flush_at])
    stored = first.drain_closed()
    checkpoint = first.checkpoint()
    fates += first.add(events[flush_at:crash_at], offsets[flush_at:crash_at])
    stored += first.drain_closed()  # rows written after the checkpoint, then the crash

    recent = [c for c in stored if c.window_kind == "1m" and c.window_start_ms < checkpoint.closed_before_ms]
    # The stored counted rows before the replay point give the dedup sets of the panes open there: a replayed copy
    # of an event counted before it is a duplicate again (else it would start a session of its own).
    ids = [(e["event_time"], e["event_id"]) for e, o, f in zip(events, offsets, fates, strict=False)
           if f == ON_TIME and o < checkpoint.commit_offset and e["event_time"] >= checkpoint.open_from_ms]
    second = _windows(checkpoint, recent, ids)
    start = checkpoint.commit_offset
    second.add(events[start:], offsets[start:])
    second.advance_idle(BASE_MS + 10**9)
    table = _cells(stored)
    table.update(_cells(second.drain_closed()))
    assert table == expected


def test_open_sessions_hold_the_commit_offset_back():
    windows = PartitionWindows(0, MINUTE, 0, **window_lengths(session_gap_ms=10 * MINUTE))
    first = touchpoint("a", BASE_MS, person_id="p")
    later = [touchpoint(f"b{i}", BASE_MS + (i + 1) * MINUTE, person_id="q") for i in range(3)]
    windows.add([first, *later], [7, 8, 9, 10])
    checkpoint = windows.checkpoint()
    assert checkpoint.closed_before_ms == BASE_MS + 3 * MINUTE  # three panes are final...
    assert checkpoint.commit_offset == 7  # ...but p's session is open: replay from its first event
    assert (checkpoint.replay_watermark_ms, checkpoint.replay_closed_before_ms) == (NEVER, NEVER)
    windows.advance_idle(BASE_MS + 13 * MINUTE)  # past the end of both sessions
    sessions = [c for c in windows.drain_closed() if c.window_kind == "session"]
    by_bucket = {(c.window_start_ms, c.indicator): (c.count, c.total) for c in sessions}
    assert by_bucket[(BASE_MS + 9 * MINUTE, "channels_per_session")] == (1.0, 1.0)  # p: ended at 10 min
    assert by_bucket[(BASE_MS + 12 * MINUTE, "channels_per_session")] == (1.0, 1.0)  # q: ended at 3 + 10 min
    assert windows.checkpoint().commit_offset == 11


def test_an_event_that_bridges_two_sessions_joins_them():
    windows = PartitionWindows(0, MINUTE, 120_000, **window_lengths(session_gap_ms=2 * MINUTE))
    events = [task("SUCCESS", event_id="1", event_time=BASE_MS, person_id="p"),
              task("SUCCESS", event_id="2", event_time=BASE_MS + 3 * MINUTE, person_id="p"),  # a gap: 2 sessions
              task("FAILURE", event_id="3", event_time=BASE_MS + 90_000, person_id="p")]  # out of order: bridges
    assert windows.add(events, [0, 1, 2]) == [ON_TIME, ON_TIME, ON_TIME]
    windows.advance_idle(BASE_MS + 60 * MINUTE)
    sessions = {c.indicator: (c.count, c.total) for c in windows.drain_closed() if c.window_kind == "session"}
    assert sessions["channels_per_session"] == (1.0, 1.0)  # one session, not two
    assert sessions["intermittency"] == (1.0, 1.0)  # in event time: success, failure, success


def test_hopping_window_merges_the_panes_it_covers():
    windows = PartitionWindows(0, MINUTE, 0, **window_lengths(hopping_ms=3 * MINUTE))
    events = [task("FAILURE" if i == 1 else "SUCCESS", event_id=str(i), event_time=BASE_MS + i * MINUTE,
                   duration_ms=1_000 * (i + 1)) for i in range(4)]
    windows.add(events, [0, 1, 2, 3])
    windows.advance_idle(BASE_MS + 10 * MINUTE)
    hopping = {(c.window_start_ms, c.indicator): c for c in windows.drain_closed() if c.window_kind == "15m"}
    cell = hopping[(BASE_MS, "task_success_rate")]  # panes 0, 1, 2
    assert (cell.window_end_ms, cell.count, cell.total) == (BASE_MS + 3 * MINUTE, 3.0, 2.0)
    assert hopping[(BASE_MS + MINUTE, "task_success_rate")].total == 2.0  # panes 1, 2, 3
    assert hopping[(BASE_MS + MINUTE, "time_on_task")].count == 2.0  # successes only
    assert hopping[(BASE_MS - 2 * MINUTE, "task_success_rate")].count == 1.0  # the first pane alone
    assert (BASE_MS + 4 * MINUTE, "task_success_rate") not in hopping  # no pane with data in it


def _threshold(name: str, indicator: str, comparison: str, threshold: float, min_count: float,
               severity: str = "warning", **more) -> dict:
    return {"name": name, "kind": "threshold", "indicator": indicator, "comparison": comparison,
            "threshold": threshold, "min_count": min_count, "severity": severity, **more}


def breaching(rules, totals) -> set[tuple[str, str, str]]:
    """(rule, tenant, channel) of every series the alerter's rules find breaching in these totals."""
    return {(rule.name, o.tenant, o.channel) for rule in rules for o in observe(rule, totals, {}) if o.breaching}


def test_alert_rule_breaches_when_a_closed_window_breaks_it():
    rule = parse_rule(_threshold("ux_error_rate_high", "error_rate", "above", 0.2, 4))
    windows = PartitionWindows(0, MINUTE, 0, **window_lengths())
    events = [task("FAILURE" if i < 3 else "SUCCESS", event_id=str(i), event_time=BASE_MS + i) for i in range(10)]
    windows.add([*events, touchpoint(event_id="x", event_time=BASE_MS + MINUTE)], list(range(11)))
    totals = totals_of(windows.drain_closed())
    (obs,) = [o for o in observe(rule, totals, {}) if o.judged]
    assert (obs.tenant, obs.channel, obs.breaching, obs.value) == ("bank", "WEB", True, 0.3)
    assert "3 of 10" in obs.summary
    quiet = parse_rule(_threshold("q", "error_rate", "above", 0.2, 11))
    assert [(o.judged, o.breaching) for o in observe(quiet, totals, {})] == [(False, False)]  # too few observations


def test_alert_rule_rejects_unknown_indicator():
    with pytest.raises(RuleError, match="nope"):
        parse_rule(_threshold("x", "nope", "below", 0.1, 1))
    with pytest.raises(RuleError, match="session"):
        parse_rule(_threshold("x", "csat", "below", 0.1, 1, window_kind="session"))


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple = ()


RULES = parse_rules([_threshold("cx_csat_low", "csat", "below", 0.6, 3, "critical"),
                     _threshold("ux_error_rate_high", "error_rate", "above", 0.15, 3)])


def _processor(idle_ms: int = 1_000):
    return TouchpointProcessor(window_config(MINUTE, 0, 300_000, idle_ms), schema_for, identity_config())


def test_processor_tells_bad_ux_good_cx_from_good_ux_bad_cx():
    """The seeds' cases: a bank app that fails but a kind agent who solves it; a hospital site that works
    but a chaotic visit."""
    events = []
    for i in range(10):
        t = BASE_MS + i * 1000
        events.append(task("FAILURE" if i % 3 == 0 else "SUCCESS", event_id=f"b{i}", event_time=t,
                           tenant="bank", channel="MOBILE_APP", user_id=f"u{i}"))
        events.append(csat(5, event_id=f"bs{i}", event_time=t, tenant="bank", channel="CONTACT_CENTRE",
                           about="CONTACT_CENTRE", customer_id=f"c{i}"))
        events.append(task("SUCCESS", event_id=f"h{i}", event_time=t, tenant="hospital", user_id=f"p{i}"))
        events.append(csat(2, event_id=f"hs{i}", event_time=t, tenant="hospital", about="STORE",
                           user_id=f"p{i}"))
    processor = _processor()
    records = [Record(0, n, encode(e)) for n, e in enumerate(events)]
    processor.assign(0, None, now_ms=BASE_MS)
    processor.process(0, records, now_ms=BASE_MS + 20_000)
    processor.tick(now_ms=BASE_MS + 20_000 + 2 * MINUTE, caught_up=set())
    assert processor.output.window_cells == []  # records may still be unread: a quiet partition is not idle
    processor.tick(now_ms=BASE_MS + 20_000 + 2 * MINUTE, caught_up={0})  # caught up and quiet: idle
    out = processor.take_output()
    assert {c.window_start_ms for c in out.window_cells if c.window_kind == "1m"} == {BASE_MS}  # closed by idling
    fired = breaching(RULES, totals_of(out.window_cells))
    assert fired == {("ux_error_rate_high", "bank", "MOBILE_APP"), ("cx_csat_low", "hospital", "STORE")}
    assert len(out.touchpoints) == 40 and len(out.touchpoints[0]) == len(TOUCHPOINT_COLUMNS)
    assert out.checkpoints[0].commit_offset == 0  # the persons' sessions are still open
    processor.tick(now_ms=BASE_MS + 20_000 + 32 * MINUTE, caught_up={0})  # idle past the session gap
    out = processor.take_output()
    assert out.checkpoints[0].commit_offset == 40
    sessions = [c for c in out.window_cells if c.window_kind == "session" and c.indicator == "channels_per_session"]
    assert sum(c.count for c in sessions) == 30  # 10 app users, 10 customers surveyed, 10 patients (task + survey)


def test_processor_dead_letters_bad_records_and_goes_on():
    processor = _processor()
    processor.assign(3, None, now_ms=BASE_MS)
    future = touchpoint("f", event_time=BASE_MS + 3_600_000)
    records = [Record(3, 10, b"garbage!"), Record(3, 11, encode(future)), Record(3, 12, encode(touchpoint())),
               Record(3, 13, encode(csat(0, event_id="z")))]
    processor.process(3, records, now_ms=BASE_MS)
    out = processor.take_output()
    assert [(d.record.offset, d.reason) for d in out.dead_letters] == [
        (10, "undecodable"), (11, "future_event_time"), (13, "contract_violation")]
    assert [row[0] for row in out.touchpoints] == ["e-1"]
    assert out.checkpoints[3].read_offset == 14


def test_a_window_is_judged_from_the_cells_of_every_partition():
    processor = _processor(idle_ms=30_000)
    processor.assign(0, None, now_ms=BASE_MS)
    processor.assign(1, None, now_ms=BASE_MS)
    failing = [task("FAILURE", event_id=f"f{i}", event_time=BASE_MS + i) for i in range(5)]
    ok = [task("SUCCESS", event_id=f"s{i}", event_time=BASE_MS + i) for i in range(20)]
    closing = touchpoint("next", event_time=BASE_MS + 2 * MINUTE)
    processor.process(0, [Record(0, n, encode(e)) for n, e in enumerate([*failing, closing])], BASE_MS + 1)
    alone = [o.value for o in observe(RULES[1], totals_of(processor.output.window_cells), {}) if o.judged]
    assert alone == [1.0]  # partition 0 alone is 100% failures
    processor.process(1, [Record(1, n, encode(e)) for n, e in enumerate([*ok, closing])], BASE_MS + 2)
    out = processor.take_output()
    assert {c.partition for c in out.window_cells} == {0, 1}
    whole = [(o.value, o.breaching) for o in observe(RULES[1], totals_of(out.window_cells), {}) if o.judged]
    assert whole == [(0.2, True)]  # 5 failures of 25 on both partitions


def test_a_restored_worker_emits_only_windows_not_yet_final():
    processor = _processor()
    checkpoint = Checkpoint(0, commit_offset=5, read_offset=9, watermark_ms=BASE_MS + 3 * MINUTE,
                            closed_before_ms=BASE_MS + 3 * MINUTE)
    processor.assign(0, checkpoint, now_ms=BASE_MS)
    events = [task("SUCCESS", event_id="n", event_time=BASE_MS + 4 * MINUTE),
              task("SUCCESS", event_id="m", event_time=BASE_MS + 6 * MINUTE)]  # closes the 4th minute
    processor.process(0, [Record(0, 9 + n, encode(e)) for n, e in enumerate(events)], BASE_MS + 10 * MINUTE)
    out = processor.take_output()
    assert {c.window_start_ms for c in out.window_cells if c.window_kind == "1m"} == {BASE_MS + 4 * MINUTE}
    assert out.checkpoints[0].closed_before_ms == BASE_MS + 6 * MINUTE


def test_an_event_id_counted_on_two_partitions_of_a_worker_is_reported():
    processor = _processor()
    processor.assign(0, None, now_ms=BASE_MS)
    processor.assign(1, None, now_ms=BASE_MS)
    first = task("SUCCESS", event_id="retried", event_time=BASE_MS + 1_000)
    processor.process(0, [Record(0, 0, encode(first))], BASE_MS + 2_000)
    processor.process(1, [Record(1, 0, encode(first)), Record(1, 1, encode(task("SUCCESS", event_id="other",
                                                                                 event_time=BASE_MS + 1_500)))],
                      BASE_MS + 2_000)
    out = processor.take_output()
    assert out.cross_partition_duplicates == {"WEB": 1}
    assert out.duplicates == {}  # within a partition it would have been a plain duplicate, not counted
