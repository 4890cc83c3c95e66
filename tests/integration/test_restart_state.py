"""Checkpoints with state on the local ClickHouse 18.16 server: the snapshot and the open panes' event ids come back
from storage, and a restart from them stores what an uninterrupted run does while replaying only the records read
after the checkpoint."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator

import pytest

from pipeline.adapters.clickhouse import HOUR_MS, ClickHouseSink, apply_migrations, connect
from pipeline.core.aggregate import DUPLICATE, ON_TIME, Checkpoint, PartitionWindows
from pipeline.core.processor import Output, touchpoint_row
from pipeline.settings import Settings
from tests.factories import window_lengths
from tests.integration.test_indicator_sql import BASE_MS, random_stream, stored_cells

pytestmark = pytest.mark.integration


@pytest.fixture
def state_sink(stack_settings: Settings) -> Iterator[ClickHouseSink]:
    settings = stack_settings.model_copy(deep=True)
    settings.clickhouse.database = f"it_state_{uuid.uuid4().hex[:8]}"
    apply_migrations(settings.clickhouse)
    sink = ClickHouseSink(settings.clickhouse, "it", "touchpoints")
    yield sink
    sink.client.disconnect()
    connect(settings.clickhouse, database="default").execute(f"DROP DATABASE IF EXISTS {settings.clickhouse.database}")


def test_a_restart_from_a_checkpoint_with_state_replays_only_what_followed_it(state_sink):
    sink = state_sink
    events = random_stream(random.Random(11), 0, 5_000)
    cut, crash = 2_900, 3_100
    events.insert(cut + 3, dict(events[cut - 2]))  # redelivered after the restart, in a pane still open
    offsets = list(range(len(events)))

    def run(windows: PartitionWindows, begin: int, end: int, *, with_state: bool) -> tuple[Output, list[int]]:
        output, fates = Output(), []
        for start in range(begin, end, 200):
            stop = min(start + 200, end)
            fates += windows.add(events[start:stop], offsets[start:stop])
        output.touchpoints = [touchpoint_row(e, 1, 0, o, f == ON_TIME) for e, o, f in
                              zip(events[begin:end], offsets[begin:end], fates, strict=True) if f != DUPLICATE]
        output.window_cells = windows.drain_closed()
        if with_state:
            output.checkpoints = {0: windows.checkpoint(with_state=True)}
        return output, fates

    whole = PartitionWindows(0, 60_000, 10_000, **window_lengths())  # the uninterrupted run
    expected_cells, whole_fates = run(whole, 0, len(events), with_state=False)
    whole.advance_idle(BASE_MS + 6 * HOUR_MS)
    expected = {(c.window_kind, c.window_start_ms // 1000, c.window_end_ms // 1000, c.tenant, c.channel, c.role,
                 c.flow, c.device_class, c.indicator, c.partition): (c.count, c.total, c.sketch)
                for c in expected_cells.window_cells + whole.drain_closed()}

    first = PartitionWindows(0, 60_000, 10_000, **window_lengths())
    written, _ = run(first, 0, cut, with_state=True)
    sink.write(written)
    assert first.checkpoint().commit_offset < cut - 1_000  # the old format would replay the open sessions whole
    after, _ = run(first, cut, crash, with_state=False)
    sink.write(after)  # rows and cells of the records after the checkpoint, then SIGKILL

    checkpoint = sink.load_checkpoint(0)
    assert checkpoint == written.checkpoints[0]  # the state comes back byte for byte
    assert checkpoint is not None and checkpoint.state and checkpoint.commit_offset == checkpoint.read_offset == cut
    ids = sink.pane_event_ids(0, checkpoint.open_from_ms, checkpoint.commit_offset)
    counted_before = {(e["event_time"], e["event_id"]) for e, f in zip(events[:cut], whole_fates[:cut], strict=True)
                      if f == ON_TIME and e["event_time"] >= checkpoint.open_from_ms}
    assert counted_before and set(ids) == counted_before
    panes = sink.recent_panes(0, checkpoint.closed_before_ms, 14)
    second = PartitionWindows.restore(0, 60_000, 10_000, first.event_indicators + first.session_indicators,
                                      checkpoint, recent_panes=panes, pane_event_ids=ids, **window_lengths())
    assert second.snapshot() == checkpoint.state
    replayed, fates = run(second, checkpoint.commit_offset, len(events), with_state=True)
    assert fates == whole_fates[cut:]  # the redelivered event is a duplicate again
    assert fates[3] == DUPLICATE
    second.advance_idle(BASE_MS + 6 * HOUR_MS)
    replayed.window_cells += second.drain_closed()
    sink.write(replayed)

    stored = stored_cells(sink.client)
    assert set(stored) == set(expected)
    for key, (count, total, sketch) in expected.items():
        assert stored[key][0] == count and stored[key][2] == sketch, key
        assert math.isclose(stored[key][1], total, rel_tol=1e-9, abs_tol=1e-9), key


def test_checkpoints_written_before_snapshots_load_without_state(state_sink):
    sink = state_sink
    sink.client.execute("INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, commit_offset, "
                        "read_offset, watermark_ms, closed_before_ms, written_at_ms) VALUES",
                        [("it", "touchpoints", 2, 5, 9, BASE_MS, BASE_MS - 60_000, 1)])
    assert sink.load_checkpoint(2) == Checkpoint(2, 5, 9, BASE_MS, BASE_MS - 60_000)
    assert sink.load_checkpoint(2).state is None  # replayed from the held-back offset, as before
