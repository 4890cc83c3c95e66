"""ClickHouse adapter: versioned migrations, columnar batch inserts, checkpoints."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clickhouse_driver import Client

from pipeline.core.aggregate import Checkpoint
from pipeline.core.evaluate import Alert, AlertRule, WindowTotal, judge
from pipeline.core.indicators import BY_ID
from pipeline.core.processor import TOUCHPOINT_COLUMNS, Output
from pipeline.settings import SCHEMAS_DIR, ClickHouseSettings

MIGRATIONS_DIR = SCHEMAS_DIR / "clickhouse"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def connect(settings: ClickHouseSettings, *, database: str | None = None) -> Client:
    return Client(
        host=settings.host, port=settings.port, user=settings.user, password=settings.password,
        database=settings.database if database is None else database,
        connect_timeout=5, send_receive_timeout=60,
        settings={"insert_block_size": 1_048_576},
    )


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(sql: str) -> list[str]:
    """Split a migration file on semicolons that end a line; comments are dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} must be named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], tuple(split_statements(path.read_text()))))
    if not migrations:
        raise FileNotFoundError(f"no migrations in {directory}: the schemas are missing from this install")
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version in {directory}")
    return migrations


def apply_migrations(settings: ClickHouseSettings) -> list[Migration]:
    """Create the database and apply every migration not yet recorded; safe to run again and again."""
    server = connect(settings, database="default")
    server.execute(f"CREATE DATABASE IF NOT EXISTS {settings.database}")
    client = connect(settings)
    client.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) "
        "ENGINE = MergeTree ORDER BY version"
    )
    applied = {row[0] for row in client.execute("SELECT version FROM schema_migrations")}
    done = []
    for migration in load_migrations():
        if migration.version in applied:
            continue
        for statement in migration.statements:
            added = _ADD_COLUMN.match(statement)
            if added and client.execute("SELECT count() FROM system.columns WHERE database = currentDatabase() "
                                        "AND table = %(table)s AND name = %(column)s", added.groupdict())[0][0]:
                continue  # already added by a half-applied run (18.16 has no ADD COLUMN IF NOT EXISTS)
            client.execute(statement)  # every other statement is IF NOT EXISTS, so a half-applied file can rerun
        client.execute("INSERT INTO schema_migrations (version, name) VALUES",
                       [(migration.version, migration.name)])
        done.append(migration)
    return done


_ADD_COLUMN = re.compile(r"ALTER TABLE (?P<table>\w+) ADD COLUMN (?P<column>\w+) ", re.IGNORECASE)

InsertObserver = Callable[[str, float, int], None]  # (table, seconds, rows)

_WINDOW_COLUMNS = ("window_start", "window_end", "tenant", "channel", "indicator", "family",
                   "source_partition", "numerator", "denominator", "emitted_at_ms")
_ALERT_COLUMNS = ("alert_id", "rule", "indicator", "family", "severity", "tenant", "channel", "window_start",
                  "window_end", "value", "threshold", "comparison", "numerator", "denominator", "message",
                  "fired_at_ms")
_AUDIT_COLUMNS = ("at_ms", "action", "identifier_a", "identifier_b", "from_person_id", "into_person_id", "reason",
                  "event_id", "recorded_at_ms")
_CHECKPOINT_COLUMNS = ("consumer_group", "topic", "partition", "commit_offset", "read_offset", "watermark_ms",
                       "closed_before_ms", "written_at_ms")


class ClickHouseSink:
    """Writes a flush of core output; checkpoints go last, so they never claim rows that are not there."""

    def __init__(self, settings: ClickHouseSettings, consumer_group: str, topic: str,
                 observe: InsertObserver | None = None) -> None:
        self.client = connect(settings)
        self.consumer_group = consumer_group
        self.topic = topic
        self.observe = observe

    def _insert(self, table: str, columns: tuple[str, ...], data: list[list[object]]) -> None:
        rows = len(data[0]) if data else 0
        if rows == 0:
            return
        started = time.perf_counter()
        self.client.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", data, columnar=True)
        if self.observe is not None:
            self.observe(table, time.perf_counter() - started, rows)

    def write(self, output: Output, rules: Sequence[AlertRule]) -> list[Alert]:
        """Rows and windows, then the alerts of windows now closed everywhere (judged from the stored rows, so
        partials written before a crash count), then the checkpoints. Returns the alerts raised."""
        now_ms = int(time.time() * 1000)
        if output.touchpoints:
            columns = [list(column) for column in zip(*output.touchpoints, strict=True)]
            self._insert("touchpoints", TOUCHPOINT_COLUMNS, columns)
        if output.window_cells:
            cells = output.window_cells
            self._insert("indicator_windows", _WINDOW_COLUMNS, [
                [c.window_start_ms // 1000 for c in cells], [c.window_end_ms // 1000 for c in cells],
                [c.tenant for c in cells], [c.channel for c in cells], [c.indicator for c in cells],
                [BY_ID[c.indicator].family.value for c in cells], [c.partition for c in cells],
                [c.numerator for c in cells], [c.denominator for c in cells], [now_ms] * len(cells),
            ])
        alerts: list[Alert] = []
        if output.judge_before_ms is not None and output.judge_partitions and rules:
            totals = self.window_totals(output.judge_from_ms or 0, output.judge_before_ms, output.judge_partitions,
                                        {rule.indicator for rule in rules})
            alerts = judge(rules, totals)
            self._insert("alerts", _ALERT_COLUMNS, [
                [a.alert_id for a in alerts], [a.rule for a in alerts], [a.indicator for a in alerts],
                [a.family for a in alerts], [a.severity for a in alerts], [a.tenant for a in alerts],
                [a.channel for a in alerts], [a.window_start_ms // 1000 for a in alerts],
                [a.window_end_ms // 1000 for a in alerts], [a.value for a in alerts],
                [a.threshold for a in alerts], [a.comparison for a in alerts], [a.numerator for a in alerts],
                [a.denominator for a in alerts], [a.message for a in alerts], [now_ms] * len(alerts),
            ])
        self._write_identity(output, now_ms)
        if output.checkpoints:
            cps = list(output.checkpoints.values())
            self._insert("pipeline_checkpoints", _CHECKPOINT_COLUMNS, [
                [self.consumer_group] * len(cps), [self.topic] * len(cps), [c.partition for c in cps],
                [c.commit_offset for c in cps], [c.read_offset for c in cps], [c.watermark_ms for c in cps],
                [c.closed_before_ms for c in cps], [now_ms] * len(cps),
            ])
        return alerts

    def _write_identity(self, output: Output, now_ms: int) -> None:
        identity = output.identity
        if identity.aliases:
            self._insert("person_aliases", ("alias_person_id", "person_id", "updated_at_ms"), [
                [a for a, _ in identity.aliases], [p for _, p in identity.aliases], [now_ms] * len(identity.aliases)])
        if identity.transitions:
            ts = identity.transitions
            self._insert("role_transitions", ("person_id", "at_ms", "from_role", "to_role", "cause",
                                              "recorded_at_ms"), [
                [t.person_id for t in ts], [t.at_ms for t in ts], [t.from_role for t in ts],
                [t.to_role for t in ts], [t.cause for t in ts], [now_ms] * len(ts)])
        if identity.audit:
            au = identity.audit
            self._insert("identity_audit", _AUDIT_COLUMNS, [
                [a.at_ms for a in au], [a.action for a in au], [a.identifier_a for a in au],
                [a.identifier_b for a in au], [a.from_person_id for a in au], [a.into_person_id for a in au],
                [a.reason for a in au], [a.event_id for a in au], [now_ms] * len(au)])

    def window_totals(self, from_ms: int, before_ms: int, partitions: Sequence[int],
                      indicators: set[str]) -> list[WindowTotal]:
        """Indicator totals of the windows starting in [from, before), over the given source partitions."""
        rows = self.client.execute(
            "SELECT toUInt32(window_start), toUInt32(any(window_end)), tenant, toString(channel), indicator, "
            "sum(numerator), sum(denominator) FROM indicator_windows FINAL "
            "WHERE window_start >= toDateTime(%(start)s) AND window_start < toDateTime(%(end)s) "
            "AND source_partition IN %(partitions)s AND indicator IN %(indicators)s "
            "GROUP BY window_start, tenant, channel, indicator",
            {"start": max(0, from_ms // 1000), "end": max(0, before_ms // 1000), "partitions": tuple(partitions),
             "indicators": tuple(sorted(indicators))},
        )
        return [WindowTotal(start * 1000, end * 1000, tenant, channel, indicator, num, den)
                for start, end, tenant, channel, indicator, num, den in rows]

    def load_checkpoint(self, partition: int) -> Checkpoint | None:
        """The furthest-along checkpoint of a partition: any checkpoint is true of its stream prefix."""
        rows = self.client.execute(
            "SELECT commit_offset, read_offset, watermark_ms, closed_before_ms FROM pipeline_checkpoints "
            "WHERE consumer_group = %(group)s AND topic = %(topic)s AND partition = %(partition)s "
            "ORDER BY read_offset DESC, watermark_ms DESC LIMIT 1",
            {"group": self.consumer_group, "topic": self.topic, "partition": partition},
        )
        if not rows:
            return None
        commit_offset, read_offset, watermark_ms, closed_before_ms = rows[0]
        return Checkpoint(partition, commit_offset, read_offset, watermark_ms, closed_before_ms)
