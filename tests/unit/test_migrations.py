"""The DDL must run on ClickHouse 18.16 (the local stack; see the integration tests) and on a modern
ClickHouse, checked here with chdb's embedded engine: every migration as rendered for chdb's version (with
LowCardinality, codecs and TTLs), the value views (ratios and sketch quantiles) and the rollup statements the sink
runs; and what a cluster gets instead (run on two 18.16 servers by tests/integration/test_cluster.py)."""

import math
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.adapters.clickhouse import (
    _MIGRATIONS_TABLE,
    DAY_MS,
    HOUR_MS,
    Migration,
    added_columns,
    load_migrations,
    rollup_statements,
    split_statements,
)
from pipeline.adapters.clickhouse_ddl import (
    LEGACY,
    MigrationTarget,
    ServerDialect,
    TableDefinition,
    render_statements,
    sharding_key,
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


TOUCHPOINTS_TTL_DAYS = 90
DEAD_LETTER_TTL_DAYS = 30


def chdb_target(session, database: str = "touchpoint") -> MigrationTarget:
    """What apply_migrations renders for this server: its version decides the dialect."""
    version = session.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    ttl_days = (("touchpoints", TOUCHPOINTS_TTL_DAYS), ("person_touchpoints", TOUCHPOINTS_TTL_DAYS),
                ("dead_letter_replays", DEAD_LETTER_TTL_DAYS))
    return MigrationTarget(database, ServerDialect.of(version), ttl_days=ttl_days)


def apply(session, migrations: list[Migration], database: str = "touchpoint") -> None:
    """What apply_migrations does, on chdb: statements rendered for its version, ADD COLUMN statements whose
    columns exist skipped."""
    target = chdb_target(session, database)
    for migration in migrations:
        for statement in render_statements(migration.statements, target):
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
        apply(modern, [m for m in migrations if m.version < 10], "upgrade")
        modern.query("INSERT INTO indicator_windows (window_start, window_end, tenant, channel, indicator, family, "
                     "source_partition, numerator, denominator, emitted_at_ms) VALUES "
                     "(60, 120, 'bank', 'WEB', 'csat', 'CX', 0, 3, 4, 1), "
                     "(60, 120, 'bank', 'WEB', 'csat', 'CX', 1, 1, 4, 1)")
        for _ in range(2):  # a half-applied migration that runs again copies nothing twice
            apply(modern, [m for m in migrations if m.version >= 10], "upgrade")
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


def column_types(session, table: str) -> dict[str, tuple[str, str]]:
    return {name: (kind, codec) for name, kind, codec in rows(
        session, f"SELECT name, type, compression_codec FROM system.columns WHERE database = 'touchpoint' "
                 f"AND table = '{table}'")}


def test_server_version_decides_the_dialect():
    assert not ServerDialect.of("18.16.1").modern and LEGACY == ServerDialect.of("18.16.1")
    assert not ServerDialect.of("19.17.4.11").modern
    assert ServerDialect.of("20.3.1").modern and ServerDialect.of("25.8.2.29").modern


def test_one_18_16_server_gets_the_migration_files_as_written():
    target = MigrationTarget("touchpoint", LEGACY, ttl_days=(("touchpoints", 90), ("dead_letter_replays", 30)))
    for migration in load_migrations():
        rendered = render_statements(migration.statements, target)
        assert rendered == list(migration.statements), migration.name
        assert not re.search(r"LowCardinality|CODEC|\bTTL\b|ON CLUSTER|Replicated|Distributed", "\n".join(rendered))


def test_modern_server_stores_low_cardinality_strings_and_codecs_on_time_and_numbers(modern):
    touchpoints = column_types(modern, "touchpoints")
    assert touchpoints["tenant"][0] == "LowCardinality(String)"
    assert touchpoints["error_code"][0] == "LowCardinality(Nullable(String))"
    assert touchpoints["event_id"][0] == "String" and touchpoints["person_id"][0] == "String"  # many values
    assert "DoubleDelta" in touchpoints["event_time_ms"][1] and "DoubleDelta" in touchpoints["event_time"][1]
    assert "T64" in touchpoints["source_offset"][1] and "T64" in touchpoints["counted"][1]
    assert touchpoints["lcp_ms"][1] == ""  # Nullable: no codec
    cells = column_types(modern, "indicator_cells")
    assert cells["indicator"][0] == cells["window_kind"][0] == "LowCardinality(String)"
    assert "Gorilla" in cells["total"][1] and "DoubleDelta" in cells["window_start"][1]
    assert "DoubleDelta" in column_types(modern, "alert_events")["at_ms"][1]


def test_modern_server_expires_raw_touchpoints_and_dead_letter_replays_only(modern):
    engines = dict(rows(modern, "SELECT name, engine_full FROM system.tables WHERE database = 'touchpoint'"))
    assert f"TTL event_time + toIntervalDay({TOUCHPOINTS_TTL_DAYS})" in engines["touchpoints"]
    assert f"toIntervalDay({DEAD_LETTER_TTL_DAYS})" in engines["dead_letter_replays"]
    assert f"TTL event_time + toIntervalDay({TOUCHPOINTS_TTL_DAYS})" in engines["person_touchpoints"]
    assert {name for name, engine in engines.items() if "TTL" in engine} == {"touchpoints", "person_touchpoints",
                                                                              "dead_letter_replays"}
    no_ttl = MigrationTarget("touchpoint", ServerDialect((25, 8)), ttl_days=(("touchpoints", 0),))
    assert not any("TTL" in s for m in load_migrations() for s in render_statements(m.statements, no_ttl))


def cluster_target() -> MigrationTarget:
    statements = [_MIGRATIONS_TABLE, *(s for m in load_migrations() for s in m.statements)]
    keys = tuple((t.name, sharding_key(t)) for s in statements if (t := TableDefinition.parse(s)) is not None)
    return MigrationTarget("touchpoint", LEGACY, "tp", sharding_keys=keys)


def test_a_cluster_gets_replicated_tables_on_the_shards_and_distributed_tables_under_the_usual_names():
    [touchpoints] = [m for m in load_migrations() if m.version == 1]
    local, distributed, view = render_statements(touchpoints.statements, cluster_target())
    assert local.startswith("CREATE TABLE IF NOT EXISTS touchpoint.touchpoints_local ON CLUSTER tp\n(")
    assert ("ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/touchpoint/touchpoints_local', "
            "'{replica}', counted)") in local
    assert local.endswith("ORDER BY (tenant, channel, event_time, event_id)")
    assert distributed == ("CREATE TABLE IF NOT EXISTS touchpoint.touchpoints ON CLUSTER tp AS "
                           "touchpoint.touchpoints_local\nENGINE = Distributed(tp, touchpoint, touchpoints_local, "
                           "cityHash64(event_id))")
    assert view.startswith("CREATE VIEW IF NOT EXISTS touchpoint.touchpoints_unique ON CLUSTER tp AS")
    assert view.endswith("FROM touchpoint.touchpoints FINAL")
    [alter] = [s for m in load_migrations() if m.version == 14 for s in m.statements]
    assert render_statements([alter], cluster_target()) == [
        "ALTER TABLE touchpoint.pipeline_checkpoints_local ON CLUSTER tp ADD COLUMN state String DEFAULT '' "
        "AFTER replay_closed_before_ms",
        "DROP TABLE IF EXISTS touchpoint.pipeline_checkpoints ON CLUSTER tp",
        "CREATE TABLE IF NOT EXISTS touchpoint.pipeline_checkpoints ON CLUSTER tp AS "
        "touchpoint.pipeline_checkpoints_local\nENGINE = Distributed(tp, touchpoint, pipeline_checkpoints_local, "
        "partition)"]
    assert added_columns(render_statements([alter], cluster_target())[0]) == ("pipeline_checkpoints_local", ["state"])


def test_cluster_views_read_joins_across_the_cluster_once():
    statements = render_statements([s for m in load_migrations() for s in m.statements], cluster_target())
    views = [s for s in statements if s.startswith("CREATE VIEW")]
    assert len(views) >= 10 and all(" ON CLUSTER tp AS" in v for v in views)
    assert all("GLOBAL ANY LEFT JOIN" in v for v in views if "JOIN" in v)
    assert not [v for v in views if re.search(r"(?<!GLOBAL )ANY LEFT JOIN|FROM (?!touchpoint\.|\()", v)]


def sorting_columns(table: TableDefinition) -> set[str]:
    return set(re.findall(r"\w+", table.sorting_key))


def test_every_sharding_key_is_made_of_its_tables_sorting_key_so_copies_fold_on_one_shard():
    tables = [t for m in load_migrations() for s in m.statements if (t := TableDefinition.parse(s)) is not None]
    assert len(tables) >= 20
    for table in tables:
        used = set(re.findall(r"\w+", sharding_key(table))) - {"cityHash64"}
        assert used and used <= sorting_columns(table), (table.name, sharding_key(table))
    by_name = {t.name: sharding_key(t) for t in tables}
    for person_table in ("journeys", "person_profiles", "role_transitions"):
        assert by_name[person_table] == "cityHash64(person_id)"  # a person's rows together


def test_a_cluster_materialized_view_reads_and_writes_the_distributed_tables():
    [view] = render_statements(["CREATE MATERIALIZED VIEW IF NOT EXISTS lookups_writer TO lookups AS\n"
                                "SELECT person_id, event_id FROM touchpoints\nARRAY JOIN resolved_from AS identifier"],
                               cluster_target())
    assert view == ("CREATE MATERIALIZED VIEW IF NOT EXISTS touchpoint.lookups_writer ON CLUSTER tp TO "
                    "touchpoint.lookups AS\nSELECT person_id, event_id FROM touchpoint.touchpoints\n"
                    "ARRAY JOIN resolved_from AS identifier")


def test_a_cluster_drops_a_view_on_every_server_and_a_table_with_its_shards():
    assert render_statements(["DROP TABLE IF EXISTS indicator_values"], cluster_target()) == [
        "DROP TABLE IF EXISTS touchpoint.indicator_values ON CLUSTER tp"]
    assert render_statements(["DROP TABLE IF EXISTS alerts"], cluster_target()) == [
        "DROP TABLE IF EXISTS touchpoint.alerts ON CLUSTER tp",
        "DROP TABLE IF EXISTS touchpoint.alerts_local ON CLUSTER tp"]


def test_a_statement_without_a_cluster_form_is_refused_rather_than_run_on_one_server():
    with pytest.raises(ValueError, match="no cluster form"):
        render_statements(["CREATE MATERIALIZED VIEW IF NOT EXISTS m ENGINE = SummingMergeTree ORDER BY a AS "
                           "SELECT a FROM touchpoints"], cluster_target())
    with pytest.raises(ValueError, match="no migration creates"):
        render_statements(["ALTER TABLE nowhere ADD COLUMN a UInt8"], cluster_target())


def test_person_tables_are_backfilled_then_follow_every_insert_into_touchpoints_on_modern_clickhouse(modern):
    modern.query("CREATE DATABASE IF NOT EXISTS persons_upgrade")
    modern.query("USE persons_upgrade")
    insert = ("INSERT INTO touchpoints (event_id, event_time_ms, tenant, channel, event_type, person_id, role, "
              "resolved_from, schema_id, source_partition, source_offset, counted) VALUES ")
    now_ms = int(time.time() * 1000)  # raw touchpoints live 90 days here (TTL): recent event times
    first, second = now_ms - 2000, now_ms - 1000
    try:
        migrations = load_migrations()
        apply(modern, [m for m in migrations if m.version < 60])
        modern.query(insert + f"('e1', {first}, 'bank', 'WEB', 'page_view', 'p-anon', 'prospect', "
                              "['anonymous_id:a'], 1, 0, 1, 1)")
        for _ in range(2):  # a half-applied migration that runs again: its copies fold
            apply(modern, [m for m in migrations if m.version >= 60])
        modern.query(insert + f"('e2', {second}, 'bank', 'MOBILE_APP', 'identify', 'p-user', 'user', "
                              "['anonymous_id:a', 'user_id:u'], 1, 0, 2, 1), "
                              f"('e2', {second}, 'bank', 'MOBILE_APP', 'identify', 'p-user', 'user', "
                              "['anonymous_id:a', 'user_id:u'], 1, 0, 2, 0)")  # a replay, not counted
        modern.query(f"INSERT INTO person_aliases VALUES ('p-anon', 'p-user', {second})")
        assert rows(modern, "SELECT person_id, event_id, channel, role, counted FROM person_touchpoints FINAL "
                            "ORDER BY event_id") == [["p-anon", "e1", "WEB", "prospect", "1"],
                                                     ["p-user", "e2", "MOBILE_APP", "user", "1"]]
        assert rows(modern, "SELECT identifier, person_id, last_seen_ms FROM identifier_persons FINAL "
                            "ORDER BY identifier, person_id") == [["anonymous_id:a", "p-anon", str(first)],
                                                                  ["anonymous_id:a", "p-user", str(second)],
                                                                  ["user_id:u", "p-user", str(second)]]
        assert rows(modern, "SELECT person_id, touchpoint_count, channel_count, latest_role FROM persons") == [
            ["p-user", "2", "2", "user"]]
    finally:
        modern.query("USE touchpoint")
        modern.query("DROP DATABASE persons_upgrade")
