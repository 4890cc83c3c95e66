"""`touchpoint init --status` and `--dry-run` on the real ClickHouse: applied and pending migrations with
checksums, and nothing changed by either."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from pipeline.adapters.clickhouse import (
    apply_migrations,
    connect,
    load_migrations,
    migration_checksum,
    migration_status,
)
from pipeline.settings import to_env

pytestmark = pytest.mark.integration


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **to_env(settings)}, timeout=120)


def test_status_lists_every_migration_applied_with_its_checksum(isolated):
    out = cli(isolated, "init", "--status")
    assert out.returncode == 0, out.stderr
    for migration in load_migrations():
        line = next(line for line in out.stdout.splitlines() if line.startswith(f"{migration.version:04d} "))
        assert migration.name in line and " applied " in line and line.count(migration_checksum(migration)) == 2
    assert f"{len(load_migrations())} applied, 0 pending" in out.stdout
    assert "0 pending migrations would run" in cli(isolated, "init", "--dry-run").stdout


def test_dry_run_on_a_new_database_prints_every_statement_and_creates_nothing(isolated):
    fresh = isolated.model_copy(deep=True)
    fresh.clickhouse.database = f"it_fresh_{uuid.uuid4().hex[:8]}"
    out = cli(fresh, "init", "--dry-run", "--status")
    assert out.returncode == 0, out.stderr
    assert f"0 applied, {len(load_migrations())} pending" in out.stdout
    assert "CREATE TABLE IF NOT EXISTS touchpoints" in out.stdout
    assert "CREATE TABLE IF NOT EXISTS dead_letter_replays" in out.stdout  # the newest file too
    assert "-- skipped if its columns exist" in out.stdout
    server = connect(fresh.clickhouse, database="default")
    assert server.execute("SELECT count() FROM system.databases WHERE name = %(db)s",
                          {"db": fresh.clickhouse.database})[0][0] == 0


def test_a_database_from_before_checksums_gets_them_from_then_on(isolated):
    old = isolated.model_copy(deep=True)
    old.clickhouse.database = f"it_old_{uuid.uuid4().hex[:8]}"
    server = connect(old.clickhouse, database="default")
    server.execute(f"CREATE DATABASE {old.clickhouse.database}")
    try:
        client = connect(old.clickhouse)
        client.execute("CREATE TABLE schema_migrations (version UInt32, name String, applied_at DateTime('UTC') "
                       "DEFAULT now()) ENGINE = MergeTree ORDER BY version")
        first = load_migrations()[0]
        for statement in first.statements:
            client.execute(statement)
        client.execute("INSERT INTO schema_migrations (version, name) VALUES", [(first.version, first.name)])
        states = migration_status(old.clickhouse)
        assert states[0].state == "applied" and states[0].applied_checksum == ""
        assert all(s.state == "pending" for s in states[1:])
        applied = apply_migrations(old.clickhouse)
        assert [m.version for m in applied] == [m.version for m in load_migrations()[1:]]
        after = migration_status(old.clickhouse)
        assert all(s.state == "applied" for s in after)
        assert [s.applied_checksum for s in after[1:]] == [s.checksum for s in after[1:]]
    finally:
        server.execute(f"DROP DATABASE IF EXISTS {old.clickhouse.database}")
