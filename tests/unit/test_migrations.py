"""The DDL must run on ClickHouse 18.16 (the local stack; see the integration tests) and on a modern
ClickHouse, checked here with chdb's embedded engine."""

import pytest

from pipeline.adapters.clickhouse import load_migrations, split_statements
from pipeline.core.processor import TOUCHPOINT_COLUMNS


def test_migrations_are_numbered_and_split_into_statements():
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.statements for m in migrations)
    assert split_statements("-- c;\nCREATE TABLE a (x UInt8) ENGINE = Log;\n\nSELECT ';'\n;") == [
        "CREATE TABLE a (x UInt8) ENGINE = Log", "SELECT ';'"]


@pytest.fixture(scope="module")
def modern():
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session()
    session.query("CREATE DATABASE IF NOT EXISTS touchpoint")
    session.query("USE touchpoint")
    yield session
    session.close()


def test_ddl_runs_on_modern_clickhouse_twice(modern):
    version = modern.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    assert int(version.split(".")[0]) >= 24
    for rerun in (False, True):  # idempotent (ADD COLUMN is skipped by the runner when the column exists)
        for migration in load_migrations():
            for statement in migration.statements:
                if not (rerun and " ADD COLUMN " in statement):
                    modern.query(statement)
    columns = modern.query("SELECT name FROM system.columns WHERE database = 'touchpoint' AND "
                           "table = 'touchpoints' ORDER BY position", "CSV").bytes().decode().split()
    assert set(TOUCHPOINT_COLUMNS) <= {c.strip('"') for c in columns}


def test_indicator_values_view_sums_partitions_and_folds_replays_on_modern_clickhouse(modern):
    modern.query("TRUNCATE TABLE indicator_windows")
    modern.query(
        "INSERT INTO indicator_windows (window_start, window_end, tenant, channel, indicator, family, "
        "source_partition, numerator, denominator, emitted_at_ms) VALUES "
        "(60, 120, 'bank', 'WEB', 'csat', 'CX', 0, 3, 4, 1), "
        "(60, 120, 'bank', 'WEB', 'csat', 'CX', 0, 3, 4, 2), "  # the same window replayed
        "(60, 120, 'bank', 'WEB', 'csat', 'CX', 1, 1, 4, 1)")
    result = modern.query("SELECT numerator, denominator, value FROM indicator_values", "CSV")
    assert result.bytes().decode().strip() == "4,8,0.5"
