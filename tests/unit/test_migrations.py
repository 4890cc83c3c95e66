"""The DDL must run on ClickHouse 18.16 (the local stack; see the integration tests) and on a modern
ClickHouse, checked here with chdb's embedded engine: every migration, the value views (ratios and sketch
quantiles) and the rollup statements the sink runs."""

import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.adapters.clickhouse import (
    DAY_MS,
    HOUR_MS,
    Migration,
    added_columns,
    load_migrations,
    rollup_statements,
    split_statements,
)
from pipeline.core.processor import TOUCHPOINT_COLUMNS
from tests.sketch_spec import ALPHA, spec_key, spec_quantile

# The sketch as the spec defines it (pipeline/core/sketch.py), restated here so the SQL is checked against the
# definition rather than against the code under test.


def test_migrations_are_numbered_and_split_into_statements():
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions)) and versions[:4] == [1, 2, 3, 4]
    assert {10, 11, 12, 13} <= set(versions)  # cells, rollups, checkpoint replay points, alert window kinds
    assert all(m.statements for m in migrations)
    assert split_statements("-- c;\nCREATE TABLE a (x UInt8) ENGINE = Log;\n\nSELECT ';'\n;") == [
        "CREATE TABLE a (x UInt8) ENGINE = Log", "SELECT ';'"]


def test_added_columns_are_recognised_so_the_runner_can_skip_them():
    assert added_columns("ALTER TABLE t\n    ADD COLUMN a Nullable(Int64) AFTER x,\n    ADD COLUMN b UInt8") == (
        "t", ["a", "b"])
    assert added_columns("CREATE TABLE IF NOT EXISTS t (a UInt8) ENGINE = Log") is None


def apply(session, migrations: list[Migration]) -> None:
    """What apply_migrations does, on chdb: ADD COLUMN statements whose columns exist are skipped."""
    for migration in migrations:
        for statement in migration.statements:
            adding = added_columns(statement)
            if adding is not None:
                present = {r[0] for r in rows(session, "SELECT name FROM system.columns WHERE database = "
                                                       f"currentDatabase() AND table = '{adding[0]}'")}
                if set(adding[1]) <= present:
                    continue
            session.query(statement)


@pytest.fixture(scope="module")
def modern():
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session()
    session.query("CREATE DATABASE IF NOT EXISTS touchpoint")
    session.query("USE touchpoint")
    apply(session, load_migrations())
    yield session
    session.close()


def rows(session, sql: str) -> list[list[str]]:
    text = session.query(sql, "TabSeparated").bytes().decode()
    return [line.split("\t") for line in text.splitlines()]


_CELL_COLUMNS = ("window_kind, window_start, window_end, tenant, channel, role, flow, device_class, indicator, "
                 "family, quantile, source_partition, count, total, sketch_keys, sketch_counts, emitted_at_ms")


def sql_row(cell: tuple) -> str:
    kind, start, end, tenant, channel, role, flow, device, indicator, family, q, partition, count, total, keys, \
        counts, emitted = cell
    return (f"('{kind}', {start}, {end}, '{tenant}', '{channel}', '{role}', '{flow}', '{device}', '{indicator}', "
            f"'{family}', {q!r}, {partition}, {count!r}, {total!r}, {list(keys)}, {list(counts)}, {emitted})")


def insert_cells(session, cells: list[tuple]) -> None:
    session.query(f"INSERT INTO indicator_cells ({_CELL_COLUMNS}) VALUES {', '.join(map(sql_row, cells))}")


def test_ddl_runs_on_modern_clickhouse_twice(modern):
    version = modern.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    assert int(version.split(".")[0]) >= 24
    apply(modern, load_migrations())  # the fixture applied them once; again must be a no-op
    columns = modern.query("SELECT name FROM system.columns WHERE database = 'touchpoint' AND "
                           "table = 'touchpoints' ORDER BY position", "CSV").bytes().decode().split()
    assert set(TOUCHPOINT_COLUMNS) <= {c.strip('"') for c in columns}
    tables = {r[0] for r in rows(modern, "SELECT name FROM system.tables WHERE database = 'touchpoint'")}
    assert {"indicator_cells", "indicator_values", "indicator_values_by_channel", "indicator_rollup_hourly",
            "indicator_rollup_daily", "indicator_values_hourly", "indicator_values_daily"} <= tables


def test_indicator_values_merge_partitions_and_fold_replays_on_modern_clickhouse(modern):
    modern.query("TRUNCATE TABLE indicator_cells")
    insert_cells(modern, [
        ("1m", 60, 120, "bank", "WEB", "user", "login", "mobile", "csat", "CX", 0.0, 0, 4.0, 3.0, [], [], 1),
        ("1m", 60, 120, "bank", "WEB", "user", "login", "mobile", "csat", "CX", 0.0, 0, 4.0, 3.0, [], [], 2),  # replay
        ("1m", 60, 120, "bank", "WEB", "user", "login", "mobile", "csat", "CX", 0.0, 1, 4.0, 1.0, [], [], 1),
        ("1m", 60, 120, "bank", "WEB", "prospect", "", "", "csat", "CX", 0.0, 1, 2.0, 2.0, [], [], 1),
        ("15m", 60, 960, "bank", "WEB", "user", "login", "mobile", "csat", "CX", 0.0, 0, 4.0, 3.0, [], [], 1),
    ])
    by_role = rows(modern, "SELECT window_kind, role, count, total, value, numerator, denominator "
                           "FROM indicator_values ORDER BY window_kind, role")
    assert by_role == [["15m", "user", "4", "3", "0.75", "3", "4"], ["1m", "prospect", "2", "2", "1", "2", "2"],
                       ["1m", "user", "8", "4", "0.5", "4", "8"]]
    by_channel = rows(modern, "SELECT count, total, value FROM indicator_values_by_channel WHERE window_kind = '1m'")
    assert by_channel == [["10", "6", "0.6"]]


def random_values(rng: random.Random, n: int) -> list[float]:
    # Web-vital-like spreads, with exact zeros (CLS 0) and a heavy tail.
    return [0.0 if rng.random() < 0.05 else rng.lognormvariate(7, 1.2) for _ in range(n)]


def buckets_of(values: list[float]) -> Counter[int]:
    return Counter(spec_key(v) for v in values)


def cell(partition: int, role: str, values: list[float], q: float, *, start: int = 3600, emitted: int = 1) -> tuple:
    buckets = buckets_of(values)
    keys = sorted(buckets)
    return ("1m", start, start + 60, "bank", "WEB", role, "", "", f"lcp_p{round(q * 100)}", "UX", q, partition,
            float(len(values)), float(sum(values)), keys, [buckets[k] for k in keys], emitted)


@pytest.mark.parametrize("q", [0.5, 0.75, 0.9, 0.95, 0.99])
def test_quantile_sql_equals_the_sketch_quantile_of_the_merged_buckets(modern, q):
    rng = random.Random(int(q * 100))
    modern.query("TRUNCATE TABLE indicator_cells")
    parts = {(p, role): random_values(rng, rng.randrange(1, 400)) for p in range(3) for role in ("user", "prospect")}
    cells = [cell(p, role, values, q) for (p, role), values in parts.items()]
    insert_cells(modern, cells + cells[:2])  # a replay of two cells changes nothing
    everything = [v for values in parts.values() for v in values]
    merged = buckets_of(everything)
    expected = spec_quantile(merged, q)

    [[value, count]] = rows(modern, "SELECT value, count FROM indicator_values_by_channel")
    assert math.isclose(float(value), expected, rel_tol=1e-12) and float(count) == len(everything)
    exact = sorted(everything)[math.floor(q * (len(everything) - 1))]
    assert abs(float(value) - exact) <= ALPHA * exact  # the sketch's stated error, against the raw values
    for role, value in rows(modern, "SELECT role, value FROM indicator_values"):
        role_values = [v for (_, r), values in parts.items() if r == role for v in values]
        assert math.isclose(float(value), spec_quantile(buckets_of(role_values), q), rel_tol=1e-12)
    core = pytest.importorskip("pipeline.core.sketch")  # last: a skip here must not hide the checks above
    assert core.quantile(core.of_values(everything), q) == expected  # the core's sketch agrees too


def test_quantile_sql_handles_the_zero_key_and_a_single_value(modern):
    modern.query("TRUNCATE TABLE indicator_cells")
    insert_cells(modern, [
        cell(0, "user", [0.0, 0.0, 0.0, 0.2], 0.75),  # CLS: mostly 0
        cell(0, "prospect", [1234.5], 0.75),
    ])
    values = dict(rows(modern, "SELECT role, value FROM indicator_values"))
    assert float(values["user"]) == 0.0
    assert math.isclose(float(values["prospect"]), 1234.5, rel_tol=ALPHA)


def test_rollups_sum_panes_once_even_when_rolled_again_and_cells_replayed(modern):
    for table in ("indicator_cells", "indicator_rollup_hourly", "indicator_rollup_daily"):
        modern.query(f"TRUNCATE TABLE {table}")
    rng = random.Random(7)
    day = 20_000 * DAY_MS  # a UTC midnight
    panes = []
    for partition in (0, 1):
        for minute in range(0, 24 * 60, 7):  # panes across a whole day, two partitions
            start = (day + minute * 60_000) // 1000
            values = random_values(rng, 5)
            panes.append(("1m", start, start + 60, "bank", "MOBILE_APP", "user", "", "", "error_rate", "UX", 0.0,
                          partition, 10.0, float(minute % 3), [], [], 1))
            keys = sorted(buckets_of(values))
            panes.append(("1m", start, start + 60, "bank", "MOBILE_APP", "user", "", "", "lcp_p75", "UX", 0.75,
                          partition, 5.0, sum(values), keys, [buckets_of(values)[k] for k in keys], 1))
            # A 15-minute hopping window must not be summed into the period.
            panes.append(("15m", start, start + 900, "bank", "MOBILE_APP", "user", "", "", "error_rate", "UX", 0.0,
                          partition, 150.0, 15.0, [], [], 1))
    insert_cells(modern, panes)
    for partition in (0, 1):
        for statement in rollup_statements(partition, day, day + 12 * HOUR_MS, day, day, now_ms=1):
            modern.query(statement)  # the first half-day: no day closed yet
    insert_cells(modern, panes[:30])  # replayed windows after a crash
    for now_ms in (2, 3):  # rolled again (a restart, another worker): the newest roll replaces
        for partition in (0, 1):
            for statement in rollup_statements(partition, day, day + DAY_MS, day, day + DAY_MS, now_ms=now_ms):
                modern.query(statement)

    ones = [p for p in panes if p[0] == "1m"]
    hourly = rows(modern, "SELECT toUInt32(period_start), indicator, count, total, value "
                          "FROM indicator_values_hourly ORDER BY period_start, indicator")
    assert len(hourly) == 48
    for start_s, indicator, count, total, value in hourly:
        in_hour = [p for p in ones if p[8] == indicator and int(start_s) <= p[1] < int(start_s) + 3600]
        assert float(count) == sum(p[12] for p in in_hour)
        assert math.isclose(float(total), sum(p[13] for p in in_hour), rel_tol=1e-12)
        if indicator == "lcp_p75":
            merged: Counter[int] = Counter()
            for p in in_hour:
                merged.update(dict(zip(p[14], p[15], strict=True)))
            assert math.isclose(float(value), spec_quantile(merged, 0.75), rel_tol=1e-12)
    [[count, total, value]] = rows(modern, "SELECT count, total, value FROM indicator_values_daily "
                                           "WHERE indicator = 'error_rate'")
    errors = [p for p in ones if p[8] == "error_rate"]
    assert float(count) == sum(p[12] for p in errors) and float(total) == sum(p[13] for p in errors)
    assert math.isclose(float(value), float(total) / float(count))


def test_migration_copies_the_earlier_windows_into_cells(modern):
    modern.query("CREATE DATABASE IF NOT EXISTS upgrade")
    modern.query("USE upgrade")
    try:
        migrations = load_migrations()
        apply(modern, [m for m in migrations if m.version < 10])
        modern.query("INSERT INTO indicator_windows (window_start, window_end, tenant, channel, indicator, family, "
                     "source_partition, numerator, denominator, emitted_at_ms) VALUES "
                     "(60, 120, 'bank', 'WEB', 'csat', 'CX', 0, 3, 4, 1), "
                     "(60, 120, 'bank', 'WEB', 'csat', 'CX', 1, 1, 4, 1)")
        for _ in range(2):  # a half-applied migration that runs again copies nothing twice
            apply(modern, [m for m in migrations if m.version >= 10])
        assert rows(modern, "SELECT window_kind, channel, numerator, denominator, value FROM indicator_values") == [
            ["1m", "WEB", "4", "8", "0.5"]]
    finally:
        modern.query("USE touchpoint")
        modern.query("DROP DATABASE upgrade")


@pytest.mark.parametrize(("doc", "at_least"), [("docs/clickhouse.md", 8), ("README.md", 3)])
def test_every_query_of_the_bi_guide_and_the_readme_runs_on_modern_clickhouse(modern, doc, at_least):
    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    statements = [s for block in re.findall(r"```sql\n(.*?)```", text, re.S) for s in split_statements(block)]
    assert len(statements) >= at_least
    modern.query("CREATE DATABASE IF NOT EXISTS touchpoint")
    for statement in statements:
        modern.query(statement)  # raises on a syntax or name error


def test_checkpoints_keep_the_replay_point_on_modern_clickhouse(modern):
    modern.query("INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, commit_offset, read_offset, "
                 "watermark_ms, closed_before_ms, replay_watermark_ms, replay_closed_before_ms, written_at_ms) "
                 "VALUES ('g', 't', 0, 5, 9, 1000, 960, 700, 660, 1), ('g', 't', 1, 5, 9, 1000, 960, NULL, NULL, 1)")
    assert rows(modern, "SELECT partition, replay_watermark_ms, replay_closed_before_ms FROM pipeline_checkpoints "
                        "WHERE consumer_group = 'g' ORDER BY partition") == [["0", "700", "660"], ["1", "\\N", "\\N"]]


def test_checkpoints_keep_their_state_and_older_ones_have_none_on_modern_clickhouse(modern):
    modern.query("INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, commit_offset, read_offset, "
                 "watermark_ms, closed_before_ms, state, written_at_ms) VALUES "
                 "('s', 't', 0, 9, 9, 1000, 960, unhex('789c00ff'), 1)")
    modern.query("INSERT INTO pipeline_checkpoints (consumer_group, topic, partition, commit_offset, read_offset, "
                 "watermark_ms, closed_before_ms, written_at_ms) VALUES ('s', 't', 1, 5, 9, 1000, 960, 1)")
    assert rows(modern, "SELECT partition, hex(state) FROM pipeline_checkpoints WHERE consumer_group = 's' "
                        "ORDER BY partition") == [["0", "789C00FF"], ["1", ""]]


def test_person_tables_are_backfilled_then_follow_every_insert_into_touchpoints_on_modern_clickhouse(modern):
    modern.query("CREATE DATABASE IF NOT EXISTS persons_upgrade")
    modern.query("USE persons_upgrade")
    insert = ("INSERT INTO touchpoints (event_id, event_time_ms, tenant, channel, event_type, person_id, role, "
              "resolved_from, schema_id, source_partition, source_offset, counted) VALUES ")
    try:
        migrations = load_migrations()
        apply(modern, [m for m in migrations if m.version < 60])
        modern.query(insert + "('e1', 1000, 'bank', 'WEB', 'page_view', 'p-anon', 'prospect', ['anonymous_id:a'], "
                              "1, 0, 1, 1)")
        for _ in range(2):  # a half-applied migration that runs again: its copies fold
            apply(modern, [m for m in migrations if m.version >= 60])
        modern.query(insert + "('e2', 2000, 'bank', 'MOBILE_APP', 'identify', 'p-user', 'user', "
                              "['anonymous_id:a', 'user_id:u'], 1, 0, 2, 1), "
                              "('e2', 2000, 'bank', 'MOBILE_APP', 'identify', 'p-user', 'user', "
                              "['anonymous_id:a', 'user_id:u'], 1, 0, 2, 0)")  # a replay, not counted
        modern.query("INSERT INTO person_aliases VALUES ('p-anon', 'p-user', 2000)")
        assert rows(modern, "SELECT person_id, event_id, channel, role, counted FROM person_touchpoints FINAL "
                            "ORDER BY event_id") == [["p-anon", "e1", "WEB", "prospect", "1"],
                                                     ["p-user", "e2", "MOBILE_APP", "user", "1"]]
        assert rows(modern, "SELECT identifier, person_id, last_seen_ms FROM identifier_persons FINAL "
                            "ORDER BY identifier, person_id") == [["anonymous_id:a", "p-anon", "1000"],
                                                                  ["anonymous_id:a", "p-user", "2000"],
                                                                  ["user_id:u", "p-user", "2000"]]
        assert rows(modern, "SELECT person_id, touchpoint_count, channel_count, latest_role FROM persons") == [
            ["p-user", "2", "2", "user"]]
    finally:
        modern.query("USE touchpoint")
        modern.query("DROP DATABASE persons_upgrade")
