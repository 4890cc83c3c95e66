"""ClickHouse adapter: versioned migrations, columnar batch inserts of touchpoints and indicator cells, window
totals for the alerter to judge, hourly/daily rollups, pane restore and checkpoints. It reads and writes; judging is
the core's (pipeline.core.alerting), applied by `touchpoint alerter`."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from clickhouse_driver import Client

from pipeline.adapters.clickhouse_ddl import MigrationTarget, cluster_settings, create_database, render_statements
from pipeline.adapters.person_queries import delete_moved_touchpoints, touchpoints_to_restate
from pipeline.core.aggregate import Checkpoint, WindowCell, add_cells
from pipeline.core.evaluate import WindowTotal
from pipeline.core.indicators import BY_ID
from pipeline.core.journeys import JOURNEY_COLUMNS, PROFILE_COLUMNS
from pipeline.core.processor import TOUCHPOINT_COLUMNS, Output, Restatement, TouchpointRow
from pipeline.settings import SCHEMAS_DIR, ClickHouseSettings

MIGRATIONS_DIR = SCHEMAS_DIR / "clickhouse"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def connect(settings: ClickHouseSettings, *, database: str | None = None) -> Client:
    return Client(
        host=settings.host, port=settings.port, user=settings.user, password=settings.password,
        database=settings.database if database is None else database,
        connect_timeout=5, send_receive_timeout=60,
        settings={"insert_block_size": 1_048_576, **cluster_settings(settings)},
    )


def drop_database(settings: ClickHouseSettings) -> None:
    """Remove a scratch database (a bench's own) with everything in it."""
    client = connect(settings, database="default")
    try:
        client.execute(f"DROP DATABASE IF EXISTS {settings.database}")
    finally:
        client.disconnect()


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


_ALTER_ADD = re.compile(r"^\s*ALTER\s+TABLE\s+(?:\w+\.)?(\w+)(?:\s+ON\s+CLUSTER\s+\w+)?\s+ADD\s+COLUMN\s", re.I)
_ADDED_COLUMN = re.compile(r"ADD\s+COLUMN\s+(\w+)", re.I)


def added_columns(statement: str) -> tuple[str, list[str]] | None:
    """(table, columns) of an `ALTER TABLE t ADD COLUMN ...` statement, else None. ClickHouse 18.16 has no
    ADD COLUMN IF NOT EXISTS, so the runner skips such a statement when its columns are already there."""
    match = _ALTER_ADD.match(statement)
    return (match[1], _ADDED_COLUMN.findall(statement)) if match else None


def migration_checksum(migration: Migration) -> str:
    """SHA-256 (first 16 hex digits) of a migration's statements as written (whatever server they are rendered
    for): comments and blank lines do not change it."""
    return hashlib.sha256("\n;\n".join(migration.statements).encode()).hexdigest()[:16]


_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now(), checksum String) "
                     "ENGINE = MergeTree ORDER BY version")


def _migrations_table(client: Client, target: MigrationTarget) -> None:
    for statement in render_statements([_MIGRATIONS_TABLE], target):
        client.execute(statement)
    columns = {row[0] for row in client.execute(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'schema_migrations'")}
    if "checksum" not in columns:  # databases initialised before checksums were recorded
        for statement in render_statements(["ALTER TABLE schema_migrations ADD COLUMN checksum String"], target):
            client.execute(statement)


class ClusterNotConfigured(RuntimeError):
    """clickhouse.cluster names a cluster the server's remote_servers do not define."""


def migration_target(settings: ClickHouseSettings, server: Client) -> MigrationTarget:
    """Where the migrations run: the database, the dialect of the server's version, the cluster and TTLs."""
    if settings.cluster:
        known = sorted({name for (name,) in server.execute("SELECT DISTINCT cluster FROM system.clusters")})
        if settings.cluster not in known:
            raise ClusterNotConfigured(
                f"ClickHouse at {settings.host}:{settings.port} has no cluster {settings.cluster!r} in its "
                f"remote_servers (clickhouse.cluster, TOUCHPOINT_CLICKHOUSE__CLUSTER); it has {known}")
    statements = [_MIGRATIONS_TABLE, *(s for m in load_migrations() for s in m.statements)]
    return MigrationTarget.of(settings, server.execute("SELECT version()")[0][0], statements)


def apply_migrations(settings: ClickHouseSettings) -> list[Migration]:
    """Create the database and apply every migration not yet recorded, rendered for the server (its version, the
    cluster: pipeline.adapters.clickhouse_ddl); safe to run again and again."""
    server = connect(settings, database="default")
    target = migration_target(settings, server)
    server.execute(create_database(target))
    client = connect(settings)
    _migrations_table(client, target)
    applied = {row[0] for row in client.execute("SELECT version FROM schema_migrations")}
    done = []
    for migration in load_migrations():
        if migration.version in applied:
            continue
        for statement in render_statements(migration.statements, target):
            adding = added_columns(statement)
            if adding is not None:
                table, wanted = adding
                present = {row[0] for row in client.execute(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = %(table)s",
                    {"table": table})}
                if set(wanted) <= present:
                    continue  # applied before the migration was recorded
            client.execute(statement)  # every other statement is IF NOT EXISTS, so a half-applied file can rerun
        client.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES",
                       [(migration.version, migration.name, migration_checksum(migration))])
        done.append(migration)
    return done


@dataclass(frozen=True, slots=True)
class MigrationState:
    migration: Migration
    checksum: str  # of the file as it is now
    applied_at: datetime | None  # None: pending
    applied_checksum: str  # recorded when it was applied ('' before checksums were recorded)
    statements: tuple[str, ...] = ()  # as they run on this server (its version, the cluster)

    @property
    def state(self) -> str:
        if self.applied_at is None:
            return "pending"
        if self.applied_checksum and self.applied_checksum != self.checksum:
            return "changed since applied"
        return "applied"


def migration_status(settings: ClickHouseSettings) -> list[MigrationState]:
    """Every migration file with whether (and when, with which checksum) it was applied; reads only."""
    server = connect(settings, database="default")
    target = migration_target(settings, server)
    exists = server.execute("SELECT count() FROM system.tables WHERE database = %(db)s "
                            "AND name = 'schema_migrations'", {"db": settings.database})[0][0]
    recorded: dict[int, tuple[datetime, str]] = {}
    if exists:
        client = connect(settings)
        columns = {row[0] for row in client.execute(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'schema_migrations'")}
        checksum = "checksum" if "checksum" in columns else "''"
        for version, applied_at, applied_checksum in client.execute(
                f"SELECT version, applied_at, {checksum} FROM schema_migrations ORDER BY version"):
            recorded[version] = (applied_at, applied_checksum)
    states = []
    for m in load_migrations():
        applied_at, applied_checksum = recorded.get(m.version, (None, ""))
        states.append(MigrationState(m, migration_checksum(m), applied_at, applied_checksum,
                                     tuple(render_statements(m.statements, target))))
    return states


class DatabaseInUse(RuntimeError):
    """The database holds another pipeline's cells and checkpoints."""


def claim_database(settings: ClickHouseSettings, consumer_group: str, topic: str) -> None:
    """Make this pipeline (group, topic) the database's owner, or refuse if another pipeline owns it: cells and
    rollups are keyed by source partition, so two pipelines sharing a database would replace each other's."""
    client = connect(settings)
    rows = client.execute("SELECT consumer_group, topic FROM pipeline_owner ORDER BY claimed_at_ms LIMIT 1")
    if not rows:
        client.execute("INSERT INTO pipeline_owner (consumer_group, topic, claimed_at_ms) VALUES",
                       [(consumer_group, topic, int(time.time() * 1000))])
        rows = client.execute("SELECT consumer_group, topic FROM pipeline_owner ORDER BY claimed_at_ms LIMIT 1")
    owner_group, owner_topic = rows[0]
    if (owner_group, owner_topic) != (consumer_group, topic):
        raise DatabaseInUse(
            f"ClickHouse database {settings.database!r} holds the pipeline of consumer group {owner_group!r} and "
            f"topic {owner_topic!r}, not {consumer_group!r}/{topic!r}: give this pipeline its own database "
            "(TOUCHPOINT_CLICKHOUSE__DATABASE)")


InsertObserver = Callable[[str, float, int], None]  # (table, seconds, rows)

_CELL_COLUMNS = ("window_kind", "window_start", "window_end", "tenant", "channel", "role", "flow", "device_class",
                 "indicator", "family", "quantile", "source_partition", "count", "total", "sketch_keys",
                 "sketch_counts", "emitted_at_ms")
_AUDIT_COLUMNS = ("at_ms", "action", "identifier_a", "identifier_b", "from_person_id", "into_person_id", "reason",
                  "event_id", "recorded_at_ms")
_CHECKPOINT_COLUMNS = ("consumer_group", "topic", "partition", "commit_offset", "read_offset", "watermark_ms",
                       "closed_before_ms", "replay_watermark_ms", "replay_closed_before_ms", "state",
                       "written_at_ms")


_QUANTILE_SUFFIX = re.compile(r"_p(\d{2})$")  # lcp_p75 -> 0.75, for indicators the registry gives no q
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
ROLLUP_KINDS = ("1m", "session")  # '15m' hopping windows overlap: summing them into a period would overcount


def indicator_quantile(indicator_id: str) -> float:
    """q of a quantile indicator (0.0 for ratios and means): from the registry, else from an _pNN suffix."""
    q = getattr(BY_ID.get(indicator_id), "q", None)
    if isinstance(q, int | float) and q > 0:
        return float(q)
    match = _QUANTILE_SUFFIX.search(indicator_id)
    return int(match[1]) / 100 if match else 0.0


def rollup_statements(partition: int, hours_from_ms: int, hours_to_ms: int, days_from_ms: int, days_to_ms: int,
                      now_ms: int) -> list[str]:
    """INSERT ... SELECT statements that roll one partition's hours [hours_from, hours_to) up from the final cells,
    then its days [days_from, days_to) from the hourly rows. Arguments are whole numbers, hence inlined (chdb
    runs the same text in the unit tests)."""
    statements = []
    kinds = ", ".join(f"'{kind}'" for kind in ROLLUP_KINDS)
    columns = ("period_start, window_kind, tenant, channel, role, flow, device_class, indicator, family, quantile, "
               "source_partition, count, total, sketch_keys, sketch_counts, rolled_at_ms")
    # Inner names (cnt, tot, ...) differ from the columns: ClickHouse 18.16 misreads `sum(count) AS count`.
    select = ("SELECT period, window_kind, tenant, channel, role, flow, device_class, indicator, fam, q, "
              f"source_partition, cnt, tot, merged.1, merged.2, {int(now_ms)} FROM (SELECT {{period}} AS period, "
              "window_kind, tenant, channel, role, flow, device_class, indicator, source_partition, "
              "any(family) AS fam, max(quantile) AS q, sum(count) AS cnt, sum(total) AS tot, "
              "sumMap(sketch_keys, sketch_counts) AS merged FROM {source} FINAL WHERE source_partition = "
              f"{int(partition)} AND {{where}} GROUP BY period, window_kind, tenant, channel, role, flow, "
              "device_class, indicator, source_partition)")
    if hours_to_ms > hours_from_ms:
        where = (f"window_kind IN ({kinds}) AND window_start >= toDateTime({int(hours_from_ms) // 1000}) "
                 f"AND window_start < toDateTime({int(hours_to_ms) // 1000})")
        statements.append(f"INSERT INTO indicator_rollup_hourly ({columns}) " + select.format(
            period="toStartOfHour(window_start)", source="indicator_cells", where=where))
    if days_to_ms > days_from_ms:
        where = (f"period_start >= toDateTime({int(days_from_ms) // 1000}) "
                 f"AND period_start < toDateTime({int(days_to_ms) // 1000})")
        statements.append(f"INSERT INTO indicator_rollup_daily ({columns}) " + select.format(
            period="toStartOfDay(period_start)", source="indicator_rollup_hourly", where=where))
    return statements


class ClickHouseSink:
    """Writes a flush of core output; checkpoints go last, so they never claim rows that are not there."""

    def __init__(self, settings: ClickHouseSettings, consumer_group: str, topic: str,
                 observe: InsertObserver | None = None, *, rollup_settle_ms: int = 0) -> None:
        self.client = connect(settings)
        self.settings = settings
        # The worker writes in the background while it loads checkpoints and panes of newly assigned partitions;
        # one connection serves one query at a time.
        self._lock = threading.Lock()
        self.consumer_group = consumer_group
        self.topic = topic
        self.observe = observe
        # Session cells sit in the pane their session ended in and close with it, so a closed hour is final; a
        # core that emitted cells after their pane closed would set how far back hours are rolled again.
        self.rollup_settle_ms = rollup_settle_ms
        self._rolled_until: dict[int, int] = {}  # partition -> end of the last hour rolled up (ms)
        self._hour_seen: dict[int, int] = {}  # partition -> hour of its closed horizon at the last roll_up
        self._families: dict[str, str] = {}
        self._quantiles: dict[str, float] = {}
        # The restated cells of the output being written, computed once: a retried write must not add the
        # changes to cells its first attempt already changed.
        self._restated_cells: tuple[int, list[WindowCell]] | None = None

    def execute(self, query: str, params: Any = None) -> Any:
        return self._execute(query, params)

    def _execute(self, query: str, params: object = None, **kwargs: object) -> Any:
        with self._lock:
            return self.client.execute(query, params, **kwargs)

    def _insert(self, table: str, columns: tuple[str, ...], data: list[list[object]]) -> None:
        rows = len(data[0]) if data else 0
        if rows == 0:
            return
        started = time.perf_counter()
        self._execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", data, columnar=True)
        if self.observe is not None:
            self.observe(table, time.perf_counter() - started, rows)

    def write(self, output: Output) -> None:
        """Rows, cells and identity records, then the checkpoints, then the rollups of hours and days the
        checkpoints closed."""
        now_ms = int(time.time() * 1000)
        if output.touchpoints:
            columns = [list(column) for column in zip(*output.touchpoints, strict=True)]
            self._insert("touchpoints", TOUCHPOINT_COLUMNS, columns)
        if output.window_cells:
            self.write_cells(output.window_cells, now_ms, whole_windows=True)
        if output.restated or output.cell_changes:
            self.write_restatement(output, now_ms)
        self._write_identity(output, now_ms)
        self.write_journeys(output, now_ms)
        if output.checkpoints:
            cps = list(output.checkpoints.values())
            self.write_checkpoints(cps, now_ms)
            for cp in cps:
                # Rolling needs a query or two: only when the partition's closed horizon entered a new hour.
                hour = cp.closed_before_ms - cp.closed_before_ms % HOUR_MS
                if self._hour_seen.get(cp.partition) != hour:
                    self.roll_up(cp.partition, cp.closed_before_ms, now_ms)
                    self._hour_seen[cp.partition] = hour

    def rows_to_restate(self, restatement: Restatement) -> list[TouchpointRow]:
        """The stored rows (one per event, FINAL) of the restatement's partitions resolved from one of its
        identifiers from that identifier's time on: their keys come from person_touchpoints (ordered by person),
        then the rows by key from touchpoints (ordered by tenant, channel and time)."""
        keys = touchpoints_to_restate(self, restatement.since)
        if not keys:
            return []
        times = [at for _, _, at, _ in keys]
        rows = self._execute(
            f"SELECT {', '.join(TOUCHPOINT_COLUMNS)} FROM touchpoints FINAL WHERE tenant IN %(t)s "
            "AND channel IN %(c)s AND event_time >= toDateTime(%(from)s) AND event_time <= toDateTime(%(to)s) "
            "AND event_id IN %(e)s AND source_partition IN %(p)s",
            {"t": tuple({k[0] for k in keys}), "c": tuple({k[1] for k in keys}), "from": min(times) // 1000,
             "to": max(times) // 1000, "e": tuple({k[3] for k in keys}), "p": tuple(restatement.partitions)})
        found = [TouchpointRow(*row) for row in rows]
        return [row for row in found if (row.tenant, row.channel, row.event_time_ms, row.event_id) in keys]

    def write_restatement(self, output: Output, now_ms: int) -> None:
        """Restated rows (same key, written later, so ReplacingMergeTree keeps them; a moved event's row under its
        former person leaves person_touchpoints) and stored cells with the restatement's changes added."""
        if output.restated:
            self._insert("touchpoints", TOUCHPOINT_COLUMNS,
                         [list(column) for column in zip(*output.restated, strict=True)])
        if output.cell_changes:
            if self._restated_cells is None or self._restated_cells[0] != id(output.cell_changes):
                self._restated_cells = (id(output.cell_changes), add_cells(
                    self._stored_cells(output.cell_changes), output.cell_changes))
            self.write_cells(self._restated_cells[1], now_ms)
            self._roll_up_again(self._restated_cells[1], now_ms)
        delete_moved_touchpoints(self, self.settings, output.moved_events)

    def _roll_up_again(self, cells: Sequence[WindowCell], now_ms: int) -> None:
        """Hours (and whole days) already rolled up that restated cells fall in are rolled again, replacing their
        rows; later hours are rolled as usual."""
        hours: dict[int, set[int]] = {}
        for cell in cells:
            if cell.window_kind in ROLLUP_KINDS:
                hours.setdefault(cell.partition, set()).add(cell.window_start_ms - cell.window_start_ms % HOUR_MS)
        for partition, starts in hours.items():
            rolled = self._rolled_until.get(partition)
            if rolled is None:
                rolled = self._rolled_before(partition)
            for hour in sorted(h for h in starts if rolled is not None and h < rolled):
                day = hour - hour % DAY_MS
                whole_day = rolled is not None and day + DAY_MS <= rolled
                for statement in rollup_statements(partition, hour, hour + HOUR_MS, day,
                                                   day + DAY_MS if whole_day else day, now_ms):
                    self._execute(statement)

    def _stored_cells(self, changes: Sequence[WindowCell]) -> list[WindowCell]:
        """The stored cells (FINAL) the changes apply to."""
        wanted = {(c.window_kind, c.window_start_ms, c.window_end_ms, c.key, c.partition) for c in changes}
        rows = self._execute(
            "SELECT window_kind, toUInt32(window_start), toUInt32(window_end), tenant, channel, role, flow, "
            "device_class, indicator, source_partition, count, total, sketch_keys, sketch_counts "
            "FROM indicator_cells FINAL WHERE (window_kind, toUInt32(window_start), source_partition) IN %(g)s",
            {"g": tuple({(c.window_kind, c.window_start_ms // 1000, c.partition) for c in changes})})
        cells = [WindowCell(kind, start * 1000, end * 1000, tenant, channel, role, flow, device, indicator,
                            partition, count, total, tuple(zip(keys, counts, strict=True)))
                 for kind, start, end, tenant, channel, role, flow, device, indicator, partition, count, total, keys,
                 counts in rows]
        return [c for c in cells if (c.window_kind, c.window_start_ms, c.window_end_ms, c.key, c.partition) in wanted]

    def write_checkpoints(self, cps: Sequence[Checkpoint], now_ms: int) -> None:
        self._insert("pipeline_checkpoints", _CHECKPOINT_COLUMNS, [
            [self.consumer_group] * len(cps), [self.topic] * len(cps), [c.partition for c in cps],
            [c.commit_offset for c in cps], [c.read_offset for c in cps], [c.watermark_ms for c in cps],
            [c.closed_before_ms for c in cps], [c.replay_watermark_ms for c in cps],
            [c.replay_closed_before_ms for c in cps], [c.state or b"" for c in cps], [now_ms] * len(cps),
        ])

    def write_journeys(self, output: Output, now_ms: int) -> None:
        """Closed journeys and the profiles they changed; a replayed journey or profile replaces its first copy."""
        for table, columns, rows in (("journeys", JOURNEY_COLUMNS, output.journeys),
                                     ("person_profiles", PROFILE_COLUMNS, list(output.profiles.values()))):
            if rows:
                data = [list(column) for column in zip(*rows, strict=True)]
                data.append([now_ms] * len(rows))
                self._insert(table, (*columns, "recorded_at_ms"), data)

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

    def _family(self, indicator: str) -> str:
        family = self._families.get(indicator)
        if family is None:
            family = self._families[indicator] = BY_ID[indicator].family.value
        return family

    def _quantile(self, indicator: str) -> float:
        q = self._quantiles.get(indicator)
        if q is None:
            q = self._quantiles[indicator] = indicator_quantile(indicator)
        return q

    def write_cells(self, cells: Sequence[WindowCell], now_ms: int | None = None, *,
                    whole_windows: bool = False) -> None:
        """One columnar insert of closed cells; a replayed cell has the same key and replaces the first copy.
        whole_windows: the cells are every cell of their panes and hopping windows (as the core emits them), so
        stored cells of those windows missing here are emptied."""
        if not cells:
            return
        family, quantile = self._family, self._quantile
        keys: list[list[int]] = []
        counts: list[list[int]] = []
        for c in cells:
            keys.append([k for k, _ in c.sketch])
            counts.append([n for _, n in c.sketch])
        emitted = int(time.time() * 1000) if now_ms is None else now_ms
        data: list[list[Any]] = [
            [c.window_kind for c in cells], [c.window_start_ms // 1000 for c in cells],
            [c.window_end_ms // 1000 for c in cells], [c.tenant for c in cells], [c.channel for c in cells],
            [c.role for c in cells], [c.flow for c in cells], [c.device_class for c in cells],
            [c.indicator for c in cells], [family(c.indicator) for c in cells],
            [quantile(c.indicator) for c in cells], [c.partition for c in cells], [c.count for c in cells],
            [c.total for c in cells], keys, counts, [emitted] * len(cells),
        ]
        whole = [c for c in cells if c.window_kind != "session"] if whole_windows else []
        for stale in self._stale_cells(whole) if whole else ():  # emptied in the same insert as the replay
            for column, value in zip(data, (*stale, 0.0, 0.0, [], [], emitted), strict=True):
                column.append(value)
        self._insert("indicator_cells", _CELL_COLUMNS, data)

    def _stale_cells(self, cells: Sequence[WindowCell]) -> list[tuple[Any, ...]]:
        """Stored cells of the windows being written (same kind, start and partition) that this emission does
        not have. A replay can put an event under another role than the first run did (identity learnt more in
        between); the earlier cell must then count nothing, or the event would count twice."""
        groups = {(c.window_kind, c.window_start_ms // 1000, c.partition) for c in cells}
        written = {(c.window_kind, c.window_start_ms // 1000, c.tenant, c.channel, c.role, c.flow, c.device_class,
                    c.indicator, c.partition) for c in cells}
        stored = self._execute(
            "SELECT window_kind, toUInt32(window_start), toUInt32(window_end), tenant, channel, role, flow, "
            "device_class, indicator, family, quantile, source_partition FROM indicator_cells FINAL "
            "WHERE (window_kind, toUInt32(window_start), source_partition) IN %(groups)s AND count > 0",
            {"groups": tuple(groups)})
        return [row for row in stored if (*row[:2], *row[3:9], row[11]) not in written]

    def window_totals(self, from_ms: int, before_ms: int, partitions: Sequence[int], indicators: set[str],
                      window_kinds: Collection[str] = ("1m",)) -> list[WindowTotal]:
        """Indicator totals of the windows of the given kinds ending in (from, before] (every window a closed
        horizon moving from `from` to `before` closed), over the given source partitions, summed over role, flow
        and device class; quantile indicators' sketches merged."""
        if not partitions or not indicators or not window_kinds:
            return []
        rows = self._execute(
            "SELECT window_kind, toUInt32(window_start), toUInt32(window_end), tenant, channel, indicator, "
            "sum(total), sum(count), sumMap(sketch_keys, sketch_counts) FROM indicator_cells FINAL "
            "WHERE window_kind IN %(kinds)s AND window_end > toDateTime(%(start)s) "
            "AND window_end <= toDateTime(%(end)s) "
            "AND source_partition IN %(partitions)s AND indicator IN %(indicators)s "
            "GROUP BY window_kind, window_start, window_end, tenant, channel, indicator",
            {"kinds": tuple(sorted(window_kinds)), "start": max(0, from_ms // 1000), "end": max(0, before_ms // 1000),
             "partitions": tuple(partitions), "indicators": tuple(sorted(indicators))},
        )
        return [WindowTotal(start * 1000, end * 1000, tenant, channel, indicator, total, count, kind,
                            tuple(zip(keys, counts, strict=True)))
                for kind, start, end, tenant, channel, indicator, total, count, (keys, counts) in rows]

    def recent_panes(self, partition: int, before_ms: int, count: int) -> list[WindowCell]:
        """The cells of a partition's '1m' panes among the last `count` pane slots that start before `before_ms`
        (its closed horizon): what a restarted worker needs to rebuild its hopping windows. Empty panes have no
        cells, so fewer than `count` panes may come back; ordered by window start."""
        if count <= 0:
            return []
        # A pane is among the last `count` when its start + count * its length reaches before_ms.
        rows = self._execute(
            "SELECT toUInt32(window_start), toUInt32(window_end), tenant, channel, role, flow, device_class, "
            "indicator, count, total, sketch_keys, sketch_counts FROM indicator_cells FINAL "
            "WHERE window_kind = '1m' AND source_partition = %(partition)s "
            "AND window_start < toDateTime(%(before)s) AND window_start >= toDateTime(%(earliest)s) "
            "AND toUInt32(window_start) + %(count)s * (toUInt32(window_end) - toUInt32(window_start)) "
            ">= %(before)s "
            "ORDER BY window_start, tenant, channel, indicator, role, flow, device_class",
            {"partition": partition, "before": max(0, before_ms // 1000), "count": count,
             # Bounds the scan: no pane is longer than a day.
             "earliest": max(0, before_ms // 1000 - count * DAY_MS // 1000)},
        )
        return [
            WindowCell(window_kind="1m", window_start_ms=start * 1000, window_end_ms=end * 1000, tenant=tenant,
                       channel=channel, role=role, flow=flow, device_class=device_class, indicator=indicator,
                       partition=partition, count=cnt, total=total,
                       sketch=tuple(zip(keys, counts, strict=True)))
            for start, end, tenant, channel, role, flow, device_class, indicator, cnt, total, keys, counts in rows
        ]

    def roll_up(self, partition: int, closed_before_ms: int, now_ms: int | None = None) -> tuple[int, int] | None:
        """Roll a partition's hours (and days) closed since the last roll into the rollup tables: every window
        ending at or before `closed_before_ms` is final. The last hour rolled (and those within the settle time)
        is rolled again, which replaces its rows. Returns the hour range rolled, or None if no hour closed."""
        if closed_before_ms <= 0:
            return None
        hours_to = closed_before_ms - closed_before_ms % HOUR_MS
        rolled = self._rolled_until.get(partition)
        if rolled is None:
            rolled = self._rolled_before(partition)
            if rolled is None:
                return None  # no cell of this partition yet
            self._rolled_until[partition] = rolled
        if hours_to <= rolled:
            return None
        hours_from = max(0, min(rolled, hours_to - self.rollup_settle_ms))
        hours_from -= hours_from % HOUR_MS
        days_to = closed_before_ms - closed_before_ms % DAY_MS
        days_from = hours_from - hours_from % DAY_MS
        rolled_at = int(time.time() * 1000) if now_ms is None else now_ms
        started = time.perf_counter()
        # A day of hours per statement bounds the memory of a first roll over a long history.
        for chunk in range(hours_from, hours_to, DAY_MS):
            for statement in rollup_statements(partition, chunk, min(chunk + DAY_MS, hours_to), 0, 0, rolled_at):
                self._execute(statement)
        for statement in rollup_statements(partition, 0, 0, days_from, days_to, rolled_at):
            self._execute(statement)
        if self.observe is not None:
            self.observe("indicator_rollup_hourly", time.perf_counter() - started, 0)
        self._rolled_until[partition] = hours_to
        return hours_from, hours_to

    def _rolled_before(self, partition: int) -> int | None:
        """Where a partition's rolling resumes: its last rolled hour (rolled again), else its first cell's hour."""
        rows = self._execute(
            "SELECT toUInt32(max(period_start)), count() FROM indicator_rollup_hourly "
            "WHERE source_partition = %(partition)s", {"partition": partition})
        if rows and rows[0][1]:
            return int(rows[0][0]) * 1000
        rows = self._execute(
            "SELECT toUInt32(min(window_start)), count() FROM indicator_cells "
            "WHERE source_partition = %(partition)s AND window_kind IN %(kinds)s",
            {"partition": partition, "kinds": ROLLUP_KINDS})
        if rows and rows[0][1]:
            first = int(rows[0][0]) * 1000
            return first - first % HOUR_MS
        return None

    def load_checkpoint(self, partition: int) -> Checkpoint | None:
        """The furthest-along checkpoint of a partition: any checkpoint is true of its stream prefix. Its state
        (a snapshot of the open windows) is None in checkpoints written before snapshots."""
        where = "consumer_group = %(group)s AND topic = %(topic)s AND partition = %(partition)s"
        params: dict[str, Any] = {"group": self.consumer_group, "topic": self.topic, "partition": partition}
        rows = self._execute(
            "SELECT commit_offset, read_offset, watermark_ms, closed_before_ms, replay_watermark_ms, "
            f"replay_closed_before_ms, written_at_ms FROM pipeline_checkpoints WHERE {where} "
            "ORDER BY read_offset DESC, watermark_ms DESC, written_at_ms DESC LIMIT 1", params)
        if not rows:
            return None
        commit_offset, read_offset, watermark_ms, closed_before_ms, replay_watermark, replay_closed, written = rows[0]
        # Then that row's state alone: rows not merged away yet hold megabytes of older states each.
        states = self._execute(
            f"SELECT state FROM pipeline_checkpoints WHERE {where} AND read_offset = %(read)s "
            "AND watermark_ms = %(watermark)s AND written_at_ms = %(written)s LIMIT 1",
            {**params, "read": read_offset, "watermark": watermark_ms, "written": written},
            settings={"strings_as_bytes": True})  # compressed binary, not text
        return Checkpoint(partition, commit_offset, read_offset, watermark_ms, closed_before_ms,
                          replay_watermark_ms=replay_watermark, replay_closed_before_ms=replay_closed,
                          state=(states[0][0] or None) if states else None)

    def pane_event_ids(self, partition: int, from_ms: int, before_offset: int) -> list[tuple[int, str]]:
        """(event time, event id) of the partition's counted touchpoints read before `before_offset` with event
        times from `from_ms` on. From a checkpoint's open_from_ms, before its commit_offset: the dedup sets of the
        panes open at that offset (a snapshot leaves them out; a replay from a held-back offset needs them too).
        Late events are not counted and duplicates have no row of their own, so neither is among them."""
        from_ms = max(0, from_ms)
        return [(int(event_time_ms), event_id) for event_time_ms, event_id in self._execute(
            "SELECT event_time_ms, event_id FROM touchpoints "
            "WHERE source_partition = %(partition)s AND counted = 1 AND source_offset < %(before)s "
            "AND event_time >= toDateTime(%(from_s)s) AND event_time_ms >= %(from_ms)s",
            {"partition": partition, "before": before_offset, "from_s": from_ms // 1000, "from_ms": from_ms})]
