"""The ClickHouse side of the indicators on the local ClickHouse 18.16 server: cells written by the sink, value
views (ratios and sketch quantiles), alert totals, pane restore, rollups that never double count, and a SQL
batch reference over the raw touchpoints compared with the streamed values."""

from __future__ import annotations

import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.adapters.clickhouse import (
    DAY_MS,
    HOUR_MS,
    ClickHouseSink,
    apply_migrations,
    connect,
    load_migrations,
    split_statements,
)
from pipeline.core import aggregate
from pipeline.core.processor import Output
from pipeline.settings import PROJECT_ROOT, Settings
from tests.factories import window_lengths
from tests.sketch_spec import ALPHA, spec_key, spec_quantile

pytestmark = pytest.mark.integration

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a UTC midnight


def exact_quantile(values: list[float], q: float) -> float:
    return sorted(values)[math.floor(q * (len(values) - 1))]


@pytest.fixture
def db(stack_settings: Settings) -> Iterator[Settings]:
    """A database of its own on the stack's ClickHouse, with every migration applied."""
    settings = stack_settings.model_copy(deep=True)
    settings.clickhouse.database = f"it_sql_{uuid.uuid4().hex[:8]}"
    apply_migrations(settings.clickhouse)
    yield settings
    connect(settings.clickhouse, database="default").execute(f"DROP DATABASE IF EXISTS {settings.clickhouse.database}")


@pytest.fixture
def sink(db: Settings) -> Iterator[ClickHouseSink]:
    sink = ClickHouseSink(db.clickhouse, "it", "touchpoints")
    yield sink
    sink.client.disconnect()


def make_cell(start_ms: int, indicator: str, partition: int, count: float, total: float, *, kind: str = "1m",
              length_ms: int = 60_000, tenant: str = "bank", channel: str = "MOBILE_APP", role: str = "user",
              flow: str = "", device: str = "", values: list[float] | None = None) -> Any:
    buckets = Counter(spec_key(v) for v in values or ())
    return aggregate.WindowCell(
        window_kind=kind, window_start_ms=start_ms, window_end_ms=start_ms + length_ms, tenant=tenant,
        channel=channel, role=role, flow=flow, device_class=device, indicator=indicator, partition=partition,
        count=count, total=total, sketch=tuple(sorted(buckets.items())))


def quantile_cell(start_ms: int, partition: int, values: list[float], **kwargs: Any) -> Any:
    return make_cell(start_ms, "lcp_p75", partition, float(len(values)), sum(values), values=values, **kwargs)


def lognormal(rng: random.Random, n: int) -> list[float]:
    return [rng.lognormvariate(7.5, 0.8) for _ in range(n)]


def test_cells_replayed_and_merged_give_ratio_and_quantile_values(sink, db):
    rng = random.Random(3)
    values = {(p, role, device): lognormal(rng, rng.randrange(1, 300))
              for p in range(4) for role in ("user", "prospect") for device in ("mobile", "desktop")}
    cells = [quantile_cell(BASE_MS, p, v, role=role, device=device) for (p, role, device), v in values.items()]
    cells += [make_cell(BASE_MS, "error_rate", p, 10.0, float(p), role=role)
              for p in range(4) for role in ("user", "prospect")]
    sink.write_cells(cells)
    sink.write_cells(cells[::3])  # a replay after a crash writes some cells again

    ch = sink.client
    everything = [v for vs in values.values() for v in vs]
    [(count, value)] = ch.execute("SELECT count, value FROM indicator_values_by_channel WHERE indicator = 'lcp_p75'")
    assert count == len(everything)
    assert math.isclose(value, spec_quantile(Counter(map(spec_key, everything)), 0.75), rel_tol=1e-12)
    assert abs(value - exact_quantile(everything, 0.75)) <= ALPHA * exact_quantile(everything, 0.75)
    for role, device, value in ch.execute("SELECT role, device_class, value FROM indicator_values "
                                          "WHERE indicator = 'lcp_p75'"):
        mine = [v for (_, r, d), vs in values.items() if (r, d) == (role, device) for v in vs]
        assert math.isclose(value, spec_quantile(Counter(map(spec_key, mine)), 0.75), rel_tol=1e-12)
    [(count, total, value)] = ch.execute("SELECT count, total, value FROM indicator_values_by_channel "
                                         "WHERE indicator = 'error_rate'")
    assert (count, total, value) == (80.0, 12.0, 0.15)
    q = dict(ch.execute("SELECT DISTINCT indicator, quantile FROM indicator_cells"))
    assert q == {"lcp_p75": 0.75, "error_rate": 0.0}


def test_window_totals_sum_roles_flows_devices_per_window_kind(sink):
    rng = random.Random(2)
    lcp = [lognormal(rng, 40), lognormal(rng, 25)]
    cells = [
        make_cell(BASE_MS, "error_rate", 0, 10.0, 2.0, role="user", flow="login", device="mobile"),
        make_cell(BASE_MS, "error_rate", 0, 10.0, 1.0, role="prospect", flow="", device=""),
        make_cell(BASE_MS, "error_rate", 1, 5.0, 0.0),
        make_cell(BASE_MS, "error_rate", 2, 50.0, 50.0),  # a partition the caller does not judge
        make_cell(BASE_MS - 840_000, "error_rate", 0, 150.0, 30.0, kind="15m", length_ms=900_000),
        make_cell(BASE_MS + 60_000, "error_rate", 0, 4.0, 1.0),  # the next window: not closed yet
        make_cell(BASE_MS, "csat", 0, 3.0, 3.0, channel="STORE"),
        quantile_cell(BASE_MS, 0, lcp[0], role="user"),
        quantile_cell(BASE_MS, 1, lcp[1], role="prospect"),
        make_cell(BASE_MS, "channels_per_session", 1, 2.0, 3.0, kind="session", channel="ALL"),
    ]
    sink.write_cells(cells)
    sink.write_cells(cells[:2])  # replayed
    # The horizon moved from the start to the end of the pane: exactly the windows ending at its end closed.
    totals = sink.window_totals(BASE_MS, BASE_MS + 60_000, [0, 1], {"error_rate", "csat", "lcp_p75"})
    got = {(t.window_kind, t.window_start_ms, t.window_end_ms, t.tenant, t.channel, t.indicator):
           (t.numerator, t.denominator, t.sketch) for t in totals}
    merged = Counter(spec_key(v) for v in lcp[0] + lcp[1])
    assert got == {
        ("1m", BASE_MS, BASE_MS + 60_000, "bank", "MOBILE_APP", "error_rate"): (3.0, 25.0, ()),
        ("1m", BASE_MS, BASE_MS + 60_000, "bank", "STORE", "csat"): (3.0, 3.0, ()),
        ("1m", BASE_MS, BASE_MS + 60_000, "bank", "MOBILE_APP", "lcp_p75"):
            (sum(lcp[0]) + sum(lcp[1]), 65.0, tuple(sorted(merged.items()))),
    }
    [lcp_total] = [t for t in totals if t.indicator == "lcp_p75"]
    assert math.isclose(lcp_total.value, spec_quantile(merged, 0.75), rel_tol=1e-12)  # what the rule judges

    other_kinds = sink.window_totals(BASE_MS, BASE_MS + 60_000, [0, 1], {"error_rate", "channels_per_session"},
                                     {"15m", "session"})
    assert {(t.window_kind, t.window_start_ms, t.channel, t.indicator, t.numerator, t.denominator)
            for t in other_kinds} == {("15m", BASE_MS - 840_000, "MOBILE_APP", "error_rate", 30.0, 150.0),
                                      ("session", BASE_MS, "ALL", "channels_per_session", 3.0, 2.0)}


def test_recent_panes_restore_the_last_panes_of_a_partition(sink):
    rng = random.Random(11)
    pane = 60_000
    written = []
    for i in range(20):
        if i == 17:
            continue  # an empty pane: no cells
        start = BASE_MS + i * pane
        written.append(make_cell(start, "error_rate", 0, 10.0, float(i % 4), role=rng.choice(["user", "prospect"])))
        written.append(quantile_cell(start, 0, lognormal(rng, 5), device="mobile"))
        written.append(make_cell(start, "error_rate", 1, 7.0, 1.0))  # another partition
    written.append(make_cell(BASE_MS, "error_rate", 0, 150.0, 30.0, kind="15m", length_ms=15 * pane))
    sink.write_cells(written)
    sink.write_cells(written[-10:])  # replayed

    before = BASE_MS + 19 * pane  # panes starting before it are closed; the 20th is still open
    restored = sink.recent_panes(0, before, 14)
    expected = [c for c in written if c.partition == 0 and c.window_kind == "1m"
                and before - 14 * pane <= c.window_start_ms < before]
    assert sorted(restored, key=repr) == sorted(expected, key=repr)  # the same WindowCell objects, sketches too
    assert {c.window_start_ms for c in restored} == {BASE_MS + i * pane for i in range(5, 19) if i != 17}
    assert sink.recent_panes(3, before, 14) == []


def test_rollups_count_each_pane_once_through_replays_rerolls_and_late_sessions(sink, db):
    rng = random.Random(5)
    day = BASE_MS
    panes = []
    for partition in (0, 1):
        for minute in range(0, 26 * 60, 11):  # a day and two hours of panes
            start = day + minute * 60_000
            panes.append(make_cell(start, "error_rate", partition, 10.0, float(minute % 3)))
            panes.append(quantile_cell(start, partition, lognormal(rng, 4)))
            panes.append(make_cell(start, "error_rate", partition, 150.0, 9.0, kind="15m", length_ms=900_000))
    sink.write_cells(panes)
    horizon = day + 25 * HOUR_MS + 30 * 60_000  # every pane before it is final
    for partition in (0, 1):
        assert sink.roll_up(partition, horizon, now_ms=1) == (day, day + 25 * HOUR_MS)
        assert sink.roll_up(partition, horizon, now_ms=2) is None  # nothing new closed

    # A crash: the successor replays windows and rolls again from the rollup table's last hour.
    sink.write_cells(panes[:40])
    fresh = ClickHouseSink(db.clickhouse, "it", "touchpoints")
    session = make_cell(day + 25 * HOUR_MS + 40 * 60_000, "channels_per_session", 0, 2.0, 5.0, kind="session",
                        channel="ALL")  # sessions that ended in that pane
    fresh.write_cells([session])
    for partition in (0, 1):  # the last hour rolled (from the table) is rolled again, then the new one
        assert fresh.roll_up(partition, horizon + HOUR_MS, now_ms=3) == (day + 24 * HOUR_MS, day + 26 * HOUR_MS)

    ch = sink.client
    ones = [c for c in panes if c.window_kind == "1m" and c.window_start_ms < day + 26 * HOUR_MS]
    hourly = ch.execute("SELECT toUInt32(period_start), indicator, count, total, value FROM indicator_values_hourly "
                        "WHERE window_kind = '1m' ORDER BY period_start, indicator")
    assert len(hourly) == 2 * 26
    for start_s, indicator, count, total, value in hourly:
        mine = [c for c in ones if c.indicator == indicator and start_s * 1000 <= c.window_start_ms
                < start_s * 1000 + HOUR_MS]
        assert count == sum(c.count for c in mine)
        assert math.isclose(total, sum(c.total for c in mine), rel_tol=1e-12)
        if indicator == "lcp_p75":
            merged: Counter[int] = Counter()
            for c in mine:
                merged.update(dict(c.sketch))
            assert math.isclose(value, spec_quantile(merged, 0.75), rel_tol=1e-12)
        else:
            assert math.isclose(value, total / count, rel_tol=1e-12)
    assert ch.execute("SELECT toUInt32(period_start), count, total FROM indicator_values_hourly "
                      "WHERE window_kind = 'session'") == [((day + 25 * HOUR_MS) // 1000, 2.0, 5.0)]
    daily = dict(ch.execute("SELECT indicator, count FROM indicator_values_daily WHERE period_start = "
                            "toDateTime(%(day)s)", {"day": day // 1000}))
    first_day = [c for c in ones if c.window_start_ms < day + DAY_MS]
    assert daily == {"error_rate": sum(c.count for c in first_day if c.indicator == "error_rate"),
                     "lcp_p75": sum(c.count for c in first_day if c.indicator == "lcp_p75")}
    # The second day is not closed: no daily row for it yet.
    assert ch.execute("SELECT count() FROM indicator_rollup_daily WHERE period_start > toDateTime(%(day)s)",
                      {"day": day // 1000}) == [(0,)]


# The batch reference: indicator partials per window straight from the raw touchpoints (each event once, only
# those counted in windows), in SQL a BI analyst can run; see docs/clickhouse.md.
BATCH_REFERENCE_SQL = """
SELECT toUInt32(intDiv(event_time_ms, %(window_ms)s) * %(window_ms)s / 1000) AS start, tenant, about,
       'csat' AS indicator, toFloat64(count()) AS cnt, toFloat64(sum(satisfied)) AS tot, 0. AS exact_quantile
FROM (
    SELECT event_time_ms, tenant,
           if(ifNull(survey_about_channel, '') != '', assumeNotNull(survey_about_channel), toString(channel)) AS about,
           toUInt8(assumeNotNull(survey_score) >= assumeNotNull(survey_scale_max) - 1) AS satisfied
    FROM touchpoints_unique WHERE counted = 1 AND event_type = 'survey_response' AND survey_kind = 'CSAT'
)
GROUP BY start, tenant, about
UNION ALL
SELECT toUInt32(intDiv(event_time_ms, %(window_ms)s) * %(window_ms)s / 1000) AS start, tenant,
       toString(channel) AS about, 'error_rate' AS indicator, toFloat64(count()) AS cnt,
       toFloat64(sum(failed)) AS tot, 0. AS exact_quantile
FROM (
    SELECT event_time_ms, tenant, channel,
           toUInt8(event_type IN ('app_error', 'app_crash') OR isNotNull(error_code)
                   OR ifNull(outcome, '') = 'FAILURE') AS failed
    FROM touchpoints_unique
    WHERE counted = 1 AND event_type IN ('page_view', 'screen_view', 'task', 'app_error', 'app_crash')
)
GROUP BY start, tenant, about
UNION ALL
SELECT start, tenant, about, 'lcp_p75' AS indicator, toFloat64(length(sorted)) AS cnt, arraySum(sorted) AS tot,
       sorted[toUInt64(floor(0.75 * (length(sorted) - 1))) + 1] AS exact_quantile
FROM (
    SELECT toUInt32(intDiv(event_time_ms, %(window_ms)s) * %(window_ms)s / 1000) AS start, tenant,
           toString(channel) AS about, arraySort(groupArray(assumeNotNull(lcp_ms))) AS sorted
    FROM touchpoints_unique
    WHERE counted = 1 AND event_type IN ('page_view', 'screen_view') AND isNotNull(lcp_ms)
    GROUP BY start, tenant, about
)
"""


def batch_reference(ch: Any, window_ms: int) -> dict[tuple[int, str, str, str], tuple[float, float, float]]:
    rows = ch.execute(BATCH_REFERENCE_SQL, {"window_ms": window_ms})
    return {(start, tenant, channel, indicator): (cnt, tot, exact) for start, tenant, channel, indicator, cnt, tot,
            exact in rows}


def streamed(ch: Any, indicators: tuple[str, ...]) -> dict[tuple[int, str, str, str], tuple[float, float, float]]:
    rows = ch.execute("SELECT toUInt32(window_start), tenant, channel, indicator, count, total, value "
                      "FROM indicator_values_by_channel WHERE window_kind = '1m' AND indicator IN %(ids)s",
                      {"ids": indicators})
    return {(start, tenant, channel, indicator): (cnt, tot, value) for start, tenant, channel, indicator, cnt, tot,
            value in rows}


def assert_matches_reference(ch: Any, window_ms: int, indicators: tuple[str, ...]) -> int:
    """Counts and totals exactly, ratios exactly, quantiles within the sketch's stated error."""
    reference = {k: v for k, v in batch_reference(ch, window_ms).items() if k[3] in indicators}
    stream = streamed(ch, indicators)
    assert reference, "the reference found nothing: the test traffic misses the indicators"
    assert set(stream) == set(reference)
    for key, (cnt, tot, exact) in reference.items():
        s_cnt, s_tot, value = stream[key]
        assert s_cnt == cnt, key
        assert math.isclose(s_tot, tot, rel_tol=1e-9, abs_tol=1e-9), key
        if key[3] == "lcp_p75":
            assert abs(value - exact) <= ALPHA * exact, (key, value, exact)
        else:
            assert value == tot / cnt, key
    return len(reference)


@pytest.mark.parametrize("doc", ["docs/clickhouse.md", "README.md"])
def test_every_query_of_the_bi_guide_and_the_readme_runs_on_clickhouse_18(sink, db, doc):
    sink.write_cells([quantile_cell(BASE_MS, 0, [1200.0, 2600.0, 0.0]),
                      make_cell(BASE_MS, "error_rate", 0, 4.0, 1.0)])
    statements = [s for block in re.findall(r"```sql\n(.*?)```", (PROJECT_ROOT / doc).read_text(), re.S)
                  for s in split_statements(block)]
    assert statements
    for statement in statements:
        sink.client.execute(statement.replace("touchpoint.", f"{db.clickhouse.database}."))


def test_window_totals_feed_the_alerters_rules_of_every_window_kind_and_checkpoints_keep_the_replay_point(sink):
    from pipeline.core.alerting import observe, parse_rules
    from pipeline.core.processor import Output

    cells = [
        make_cell(BASE_MS, "error_rate", 0, 40.0, 20.0),
        make_cell(BASE_MS - 840_000, "error_rate", 0, 400.0, 100.0, kind="15m", length_ms=900_000),
        make_cell(BASE_MS, "channels_per_session", 0, 10.0, 25.0, kind="session", channel="ALL"),
    ]
    rules = parse_rules([
        {"name": "ux_error_rate_high", "kind": "threshold", "indicator": "error_rate", "comparison": "above",
         "threshold": 0.15, "min_count": 20, "severity": "critical"},
        {"name": "ux_error_rate_high_15m", "kind": "threshold", "indicator": "error_rate", "comparison": "above",
         "threshold": 0.2, "min_count": 20, "window_kind": "15m"},
        {"name": "cx_many_channels", "kind": "threshold", "indicator": "channels_per_session",
         "comparison": "above", "threshold": 2.0, "min_count": 5, "severity": "info", "window_kind": "session"},
    ])
    checkpoint = aggregate.Checkpoint(0, 5, 9, BASE_MS + 65_000, BASE_MS + 60_000, BASE_MS + 40_000, BASE_MS)
    output = Output(window_cells=cells, checkpoints={0: checkpoint})

    def write_and_judge() -> set[tuple[str, str, float | None]]:  # a worker's flush, then what the alerter reads
        sink.write(output)
        totals = sink.window_totals(BASE_MS, BASE_MS + 60_000, [0], {"error_rate", "channels_per_session"},
                                    {"1m", "15m", "session"})
        return {(rule.name, o.channel, o.value) for rule in rules
                for o in observe(rule, [t for t in totals if t.window_kind == rule.window_kind], {}) if o.breaching}

    expected = {("ux_error_rate_high", "MOBILE_APP", 0.5), ("ux_error_rate_high_15m", "MOBILE_APP", 0.25),
                ("cx_many_channels", "ALL", 2.5)}
    assert write_and_judge() == expected
    assert write_and_judge() == expected  # a retried write replaces what it wrote: the totals do not double
    assert sink.load_checkpoint(0) == checkpoint


def test_migrations_apply_again_after_a_crash_before_they_were_recorded(db):
    client = connect(db.clickhouse)
    client.execute("TRUNCATE TABLE schema_migrations")  # as if every file ran but none was recorded
    again = apply_migrations(db.clickhouse)
    assert [m.version for m in again] == [m.version for m in load_migrations()]  # every file ran again
    assert {10, 11, 12, 13, 14} <= {m.version for m in again}
    assert apply_migrations(db.clickhouse) == []
    columns = {name for (name,) in client.execute("SELECT name FROM system.columns WHERE database = "
                                                  "currentDatabase() AND table = 'pipeline_checkpoints'")}
    assert {"replay_watermark_ms", "replay_closed_before_ms", "state"} <= columns
    client.disconnect()


def random_stream(rng: random.Random, partition: int, count: int) -> list[dict[str, Any]]:
    """One partition's events over three hours and a half: out of order within the lateness, duplicates, and
    late events (older than their closed pane)."""
    from tests.factories import page, survey, task

    events: list[dict[str, Any]] = []
    span_ms = 3 * HOUR_MS + 30 * 60_000
    for i in range(count):
        t = BASE_MS + i * span_ms // count + rng.randrange(-8_000, 8_000)  # jitter within the 10 s lateness
        person = rng.randrange(150)
        who: dict[str, Any] = {"event_id": f"p{partition}-{i}", "event_time": max(BASE_MS, t),
                               "tenant": rng.choice(["bank", "hospital"]),
                               "user_id": f"u{person}" if person % 3 else None, "anonymous_id": f"a{person}",
                               "person_id": f"person-{partition}-{person}",
                               "role": rng.choice(["prospect", "user", "customer"]),
                               "is_customer": False, "is_user": person % 3 > 0, "first_seen_ms": BASE_MS,
                               "customer_since_ms": None, "purchase_count": 0, "resolved_from": [],
                               "flow": rng.choice([None, "login", "checkout"]),
                               "device_class": rng.choice([None, "mobile", "desktop"])}
        kind = rng.random()
        if kind < 0.35:
            events.append(task(rng.choice(["SUCCESS", "SUCCESS", "FAILURE"]), channel="MOBILE_APP", **who))
        elif kind < 0.55:
            events.append(survey("CSAT", rng.randint(1, 5), channel="EMAIL",
                                 about=rng.choice([None, "STORE", "CONTACT_CENTRE"]), **who))
        else:
            lcp = None if rng.random() < 0.1 else rng.lognormvariate(7.4, 0.7)
            events.append(page(lcp_ms=lcp, channel=rng.choice(["WEB", "MOBILE_APP"]), **who))
        if rng.random() < 0.05:
            events.append(dict(events[-1]))  # a producer retry: the same event again
        if rng.random() < 0.02 and i > 200:
            late = dict(events[rng.randrange(len(events) - 150)])
            late["event_id"] += "-late"  # an event that arrives after its pane closed
            events.append(late)
    return events


def test_streamed_cells_equal_the_sql_batch_reference_over_the_raw_touchpoints(sink, db):
    from pipeline.core.aggregate import DUPLICATE, LATE, PartitionWindows
    from pipeline.core.processor import Output, touchpoint_row

    rng = random.Random(20)
    output = Output()
    fates: Counter[int] = Counter()
    for partition in (0, 1):
        events = random_stream(rng, partition, 6_000)
        windows = PartitionWindows(partition, 60_000, 10_000, **window_lengths())
        for begin in range(0, len(events), 250):  # batches, as a worker fetches them
            batch = events[begin:begin + 250]
            offsets = list(range(begin, begin + len(batch)))
            for event, offset, fate in zip(batch, offsets, windows.add(batch, offsets), strict=True):
                fates[fate] += 1
                if fate != DUPLICATE:
                    output.touchpoints.append(touchpoint_row(event, 1, partition, offset, counted=fate != LATE))
        windows.advance_idle(BASE_MS + 5 * HOUR_MS)  # an idle partition: everything closes
        output.window_cells.extend(windows.drain_closed())
        output.checkpoints[partition] = windows.checkpoint()
    assert fates[LATE] > 50 and fates[DUPLICATE] > 200  # the stream did exercise both

    sink.write(output)
    replay = ClickHouseSink(db.clickhouse, "it", "touchpoints")  # a restarted worker replays the same output
    replay.write(output)
    replay.client.disconnect()

    indicators = ("csat", "error_rate", "lcp_p75")
    assert assert_matches_reference(sink.client, 60_000, indicators) > 300
    # The hourly rollups (of the 1m panes) equal the reference per hour, summed over roles, flows, devices.
    rows = sink.client.execute(
        "SELECT toUInt32(period_start), tenant, channel, indicator, sum(count), sum(total), "
        "sumMap(sketch_keys, sketch_counts) FROM indicator_rollup_hourly FINAL "
        "WHERE window_kind = '1m' AND indicator IN %(ids)s GROUP BY period_start, tenant, channel, indicator",
        {"ids": indicators})
    hourly = {(start, tenant, channel, indicator): (cnt, tot, tuple(zip(*merged, strict=True)))
              for start, tenant, channel, indicator, cnt, tot, merged in rows}
    reference = batch_reference(sink.client, HOUR_MS)
    assert set(hourly) == set(reference) and len({k[0] for k in hourly}) == 4
    for key, (cnt, tot, exact) in reference.items():
        h_cnt, h_tot, sketch = hourly[key]
        assert h_cnt == cnt and math.isclose(h_tot, tot, rel_tol=1e-9), key
        if key[3] == "lcp_p75":
            assert abs(spec_quantile(dict(sketch), 0.75) - exact) <= ALPHA * exact, key


def stored_cells(ch: Any) -> dict[tuple, tuple[float, float, tuple]]:
    rows = ch.execute("SELECT window_kind, toUInt32(window_start), toUInt32(window_end), tenant, channel, role, flow, "
                      "device_class, indicator, source_partition, count, total, sketch_keys, sketch_counts "
                      "FROM indicator_cells FINAL")
    return {tuple(row[:10]): (row[10], row[11], tuple(zip(row[12], row[13], strict=True))) for row in rows}


def test_a_restart_from_the_stored_checkpoint_and_panes_stores_what_an_uninterrupted_run_does(sink, db):
    from pipeline.core.aggregate import PartitionWindows
    from pipeline.core.processor import Output

    events = random_stream(random.Random(8), 0, 5_000)
    offsets = list(range(len(events)))

    def run(windows: PartitionWindows, begin: int, end: int) -> Output:
        for start in range(begin, end, 200):
            stop = min(start + 200, end)
            windows.add(events[start:stop], offsets[start:stop])
        return Output(window_cells=windows.drain_closed(), checkpoints={0: windows.checkpoint()})

    whole = PartitionWindows(0, 60_000, 10_000, **window_lengths())  # the uninterrupted run
    expected_cells = run(whole, 0, len(events)).window_cells
    whole.advance_idle(BASE_MS + 6 * HOUR_MS)
    expected_cells += whole.drain_closed()
    expected = {(c.window_kind, c.window_start_ms // 1000, c.window_end_ms // 1000, c.tenant, c.channel, c.role,
                 c.flow, c.device_class, c.indicator, c.partition): (c.count, c.total, c.sketch)
                for c in expected_cells}
    assert {k[0] for k in expected} == {"1m", "15m", "session"}

    first = PartitionWindows(0, 60_000, 10_000, **window_lengths())
    sink.write(run(first, 0, 2_900))  # then SIGKILL: nothing after this write survives

    checkpoint = sink.load_checkpoint(0)
    assert checkpoint is not None and checkpoint.commit_offset < 2_900
    panes = sink.recent_panes(0, checkpoint.closed_before_ms, 14)
    assert panes and all(c.window_kind == "1m" for c in panes)
    second = PartitionWindows(0, 60_000, 10_000, checkpoint=checkpoint, recent_panes=panes,
                              **window_lengths())
    output = run(second, checkpoint.commit_offset, len(events))
    second.advance_idle(BASE_MS + 6 * HOUR_MS)
    output.window_cells += second.drain_closed()
    sink.write(output)

    stored = stored_cells(sink.client)
    assert set(stored) == set(expected)
    for key, (count, total, sketch) in expected.items():
        assert stored[key][0] == count and stored[key][2] == sketch, key
        assert math.isclose(stored[key][1], total, rel_tol=1e-9, abs_tol=1e-9), key


def test_restated_cells_are_added_once_and_the_hours_and_days_rolled_up_are_rolled_again(sink):
    day = BASE_MS
    panes = [make_cell(day + minute * 60_000, "error_rate", 0, 10.0, 2.0, role="customer")
             for minute in range(0, 26 * 60, 30)]
    sink.write_cells(panes, now_ms=1)
    assert sink.roll_up(0, day + 25 * HOUR_MS + 30 * 60_000, now_ms=2) == (day, day + 25 * HOUR_MS)
    moved = [c for c in panes if day + 3 * HOUR_MS <= c.window_start_ms < day + 4 * HOUR_MS]
    changes = [make_cell(c.window_start_ms, "error_rate", 0, sign * 4.0, sign * 1.0, role=role)
               for c in moved for sign, role in ((-1, "customer"), (1, "prospect"))]
    output = Output(cell_changes=changes)
    sink.write_restatement(output, now_ms=3)
    sink.write_restatement(output, now_ms=4)  # a retried write: the same figures, not the changes twice
    ch = sink.client
    cells = dict(ch.execute("SELECT role, (sum(count), sum(total)) FROM indicator_cells FINAL GROUP BY role"))
    assert cells == {"customer": (10.0 * len(panes) - 4.0 * len(moved), 2.0 * len(panes) - len(moved)),
                     "prospect": (4.0 * len(moved), 1.0 * len(moved))}
    for table, until in (("indicator_rollup_hourly", day + 25 * HOUR_MS), ("indicator_rollup_daily", day + DAY_MS)):
        rolled = dict(ch.execute(f"SELECT role, (sum(count), sum(total)) FROM {table} FINAL GROUP BY role"))
        expected = dict(ch.execute(
            "SELECT role, (sum(count), sum(total)) FROM indicator_cells FINAL WHERE window_start < toDateTime(%(u)s) "
            "GROUP BY role", {"u": until // 1000}))
        assert rolled == expected, table
