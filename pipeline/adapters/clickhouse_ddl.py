"""How the migration files (schemas/clickhouse, written for one ClickHouse 18.16 server) are rendered for the
server they run on: a modern server gets LowCardinality strings, column codecs and TTLs; a cluster
(clickhouse.cluster) gets Replicated*MergeTree tables <table>_local on every shard and a Distributed table under
the usual name over them, so writers, views and BI keep the names they know. One server of 18.16 gets the files
as they are."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.settings import ClickHouseSettings

LOCAL_SUFFIX = "_local"
MODERN_SINCE = (20, 3)  # the first long-term release with LowCardinality, codecs and TTL all out of experiment

# String columns holding a small vocabulary (channels, kinds, states, names of rules and queues).
LOW_CARDINALITY_COLUMNS = frozenset({
    "tenant", "channel", "event_type", "role", "flow", "device_class", "outcome", "error_code", "survey_kind",
    "survey_about_channel", "currency", "app_version", "window_kind", "indicator", "family", "rule", "rule_kind",
    "severity", "state", "from_state", "to_state", "cause", "actor", "action", "reason", "status", "receiver",
    "queue", "nps_status", "role_start", "role_end", "contact_channel", "last_touch_channel",
    "last_touch_event_type", "source_channel", "consumer_group", "topic", "dead_letter_topic", "target_topic",
})

# The time a row expires from (tables with a TTL setting only): raw touchpoints and dead-letter-derived rows.
TTL_COLUMNS = {"touchpoints": "event_time", "person_touchpoints": "event_time",
               "dead_letter_replays": "toDateTime(intDiv(replayed_at_ms, 1000))"}

# Copies of a row (replays, duplicates) must meet on one shard for ReplacingMergeTree (and FINAL) to fold them,
# so a table is sharded by columns of its sorting key: the person where the key has one. touchpoints are the
# exception to person: a replay can resolve an event to another person (identity learnt more in between), and
# its copy must still land where the first one is, so they go by event id. Tables not named here: by their
# whole sorting key.
SHARDING_KEYS = {
    "touchpoints": "cityHash64(event_id)",
    "journeys": "cityHash64(person_id)",
    "person_profiles": "cityHash64(person_id)",
    "role_transitions": "cityHash64(person_id)",
    "person_aliases": "cityHash64(alias_person_id)",
    "cases": "cityHash64(case_id)",
    # A Kafka partition's cells, rollups and checkpoints on one shard: its replays replace what it wrote.
    "indicator_cells": "source_partition",
    "indicator_windows": "source_partition",
    "indicator_rollup_hourly": "source_partition",
    "indicator_rollup_daily": "source_partition",
    "pipeline_checkpoints": "partition",
    "person_touchpoints": "cityHash64(person_id)",
}

_CREATE_TABLE = re.compile(r"^CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(\w+)\s*\(", re.I)
_ENGINE = re.compile(r"^\s*ENGINE\s*=\s*(\w+)(?:\(([^)]*)\))?(.*)$", re.I | re.S)
_ORDER_BY = re.compile(r"ORDER\s+BY\s+(\([^)]*\)|\w+)", re.I)
_CREATE_VIEW = re.compile(r"^CREATE\s+VIEW\s+IF\s+NOT\s+EXISTS\s+(\w+)\s+AS\b", re.I)
_CREATE_MATERIALIZED_VIEW = re.compile(
    r"^CREATE\s+MATERIALIZED\s+VIEW\s+IF\s+NOT\s+EXISTS\s+(\w+)\s+TO\s+(\w+)\s+AS\b", re.I)
_INSERT_SELECT = re.compile(r"^INSERT\s+INTO\s+\w+\b.*\bSELECT\b", re.I | re.S)
_ALTER = re.compile(r"^ALTER\s+TABLE\s+(\w+)\s", re.I)
_DROP = re.compile(r"^DROP\s+TABLE\s+IF\s+EXISTS\s+(\w+)\s*$", re.I)
_JOIN = re.compile(r"(?<!GLOBAL )\bANY\s+LEFT\s+JOIN\b", re.I)
_FROM_TABLE = re.compile(r"(\bFROM\s+)(\w+)\b", re.I)
_INTEGER = re.compile(r"^U?Int(8|16|32|64)$")


@dataclass(frozen=True, slots=True)
class ServerDialect:
    """What a server's DDL may use, from its version."""

    version: tuple[int, int]

    @classmethod
    def of(cls, version: str) -> ServerDialect:
        """From `SELECT version()` ("18.16.1", "25.8.2.29")."""
        major, minor = [*re.findall(r"\d+", version), "0", "0"][:2]
        return cls((int(major), int(minor)))

    @property
    def modern(self) -> bool:
        return self.version >= MODERN_SINCE


LEGACY = ServerDialect((18, 16))


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where migrations run: the database, the server's dialect, the cluster (empty: one server) and TTLs."""

    database: str
    dialect: ServerDialect = LEGACY
    cluster: str = ""
    replica_path: str = "/clickhouse/tables/{shard}/{database}/{table}"
    ttl_days: tuple[tuple[str, int], ...] = ()  # (table, days); 0 days: no TTL
    sharding_keys: tuple[tuple[str, str], ...] = ()  # (table, key) of every table the migrations create

    @classmethod
    def of(cls, settings: ClickHouseSettings, server_version: str, statements: Iterable[str] = ()) -> MigrationTarget:
        """`statements`: every migration's, applied or not, so an ALTER knows its table's sharding key."""
        keys = tuple((table.name, sharding_key(table)) for statement in statements
                     if (table := TableDefinition.parse(statement)) is not None)
        return cls(settings.database, ServerDialect.of(server_version), settings.cluster, settings.replica_path,
                   (("touchpoints", settings.touchpoints_ttl_days),
                    ("person_touchpoints", settings.touchpoints_ttl_days),  # the same rows, kept as long
                    ("dead_letter_replays", settings.dead_letter_replays_ttl_days)), keys)


def _closing_paren(text: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses in: {text[:80]}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _column_type(definition: str) -> tuple[str, str, str]:
    """(name, type, the rest: DEFAULT ...) of a column definition."""
    name, _, rest = definition.partition(" ")
    rest = rest.strip()
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "("
        depth -= char == ")"
        if char.isspace() and depth == 0:
            return name, rest[:i], rest[i:]
    return name, rest, ""


def modern_column(definition: str) -> str:
    """A column as a modern server stores it best: LowCardinality for a small vocabulary, a codec for time
    (DoubleDelta: mostly increasing) and numbers (Gorilla for floats, T64 for integers)."""
    name, kind, rest = _column_type(definition)
    if name in LOW_CARDINALITY_COLUMNS and kind in ("String", "Nullable(String)"):
        return f"{name} LowCardinality({kind}){rest}"
    if kind.startswith("DateTime") or (name.endswith("_ms") and _INTEGER.match(kind)):
        codec = "DoubleDelta, LZ4"
    elif kind in ("Float32", "Float64"):
        codec = "Gorilla, LZ4"
    elif _INTEGER.match(kind):
        codec = "T64, LZ4"
    else:
        return definition
    return f"{definition} CODEC({codec})"


@dataclass(frozen=True, slots=True)
class TableDefinition:
    name: str
    columns: list[str]
    engine: str
    engine_args: str
    clauses: str  # PARTITION BY ... ORDER BY ...

    @classmethod
    def parse(cls, statement: str) -> TableDefinition | None:
        match = _CREATE_TABLE.match(statement)
        if not match:
            return None
        opening = match.end() - 1
        closing = _closing_paren(statement, opening)
        engine = _ENGINE.match(statement[closing + 1:])
        if not engine:
            raise ValueError(f"no ENGINE clause in CREATE TABLE {match[1]}")
        return cls(match[1], _split_top_level(statement[opening + 1:closing]), engine[1], engine[2] or "",
                   engine[3].rstrip())

    @property
    def sorting_key(self) -> str:
        match = _ORDER_BY.search(self.clauses)
        return match[1] if match else "tuple()"

    def render(self, name: str, engine: str, engine_args: str) -> str:
        columns = ",\n    ".join(self.columns)
        return f"CREATE TABLE IF NOT EXISTS {name}\n(\n    {columns}\n)\nENGINE = {engine}({engine_args}){self.clauses}"


def _modern_table(table: TableDefinition, target: MigrationTarget) -> TableDefinition:
    clauses = table.clauses
    days = dict(target.ttl_days).get(table.name, 0)
    if days > 0 and table.name in TTL_COLUMNS:
        clauses += f"\nTTL {TTL_COLUMNS[table.name]} + INTERVAL {int(days)} DAY"
    return TableDefinition(table.name, [modern_column(c) for c in table.columns], table.engine, table.engine_args,
                           clauses)


def sharding_key(table: TableDefinition) -> str:
    key = SHARDING_KEYS.get(table.name)
    if key is not None:
        return key
    columns = table.sorting_key.strip("()")
    return f"cityHash64({columns})"


def _distributed_table(name: str, key: str, target: MigrationTarget) -> str:
    db, cluster = target.database, target.cluster
    return (f"CREATE TABLE IF NOT EXISTS {db}.{name} ON CLUSTER {cluster} AS {db}.{name}{LOCAL_SUFFIX}\n"
            f"ENGINE = Distributed({cluster}, {db}, {name}{LOCAL_SUFFIX}, {key})")


def _cluster_tables(table: TableDefinition, target: MigrationTarget) -> list[str]:
    local = table.name + LOCAL_SUFFIX
    path = target.replica_path.replace("{database}", target.database).replace("{table}", local)
    args = ", ".join(a for a in (f"'{path}'", "'{replica}'", table.engine_args.strip()) if a)
    return [table.render(f"{target.database}.{local} ON CLUSTER {target.cluster}", f"Replicated{table.engine}", args),
            _distributed_table(table.name, sharding_key(table), target)]


def render_statement(statement: str, target: MigrationTarget) -> list[str]:
    """The statements that do what `statement` (as written in a migration file) does on the target."""
    table = TableDefinition.parse(statement)
    if table is not None:
        if target.dialect.modern:
            table = _modern_table(table, target)
        if target.cluster:
            return _cluster_tables(table, target)
        return [table.render(table.name, table.engine, table.engine_args)] if target.dialect.modern else [statement]
    if not target.cluster:
        return [statement]
    db, cluster = target.database, target.cluster
    on_cluster = f"ON CLUSTER {cluster}"
    if view := _CREATE_VIEW.match(statement):
        # Views read the Distributed tables; a join's right side is read across the cluster once (GLOBAL), not on
        # every shard (which 18.16 refuses by default: distributed_product_mode = deny).
        return [f"CREATE VIEW IF NOT EXISTS {db}.{view[1]} {on_cluster} AS{_qualified(statement[view.end():], db)}"]
    if view := _CREATE_MATERIALIZED_VIEW.match(statement):
        # On every server, over the Distributed tables: the server a writer inserts through sees each row once
        # (shards receive their rows into the local tables, which have no view) and sends the view's rows to the
        # target's shards by the target's own sharding key, so its copies fold as on one server.
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view[1]} {on_cluster} TO {db}.{view[2]} "
                f"AS{_qualified(statement[view.end():], db)}"]
    if alter := _ALTER.match(statement):
        name = alter[1]
        key = dict(target.sharding_keys).get(name)
        if key is None:
            raise ValueError(f"ALTER TABLE {name}: no migration creates {name}, so its Distributed table is unknown")
        # The shards' tables change; the Distributed table (no data: writers insert synchronously) is made again
        # over them, as 18.16 runs no ALTER ON CLUSTER of a table that is not replicated.
        return [f"ALTER TABLE {db}.{name}{LOCAL_SUFFIX} {on_cluster} {statement[alter.end():]}",
                f"DROP TABLE IF EXISTS {db}.{name} {on_cluster}", _distributed_table(name, key, target)]
    if drop := _DROP.match(statement):
        name = drop[1]
        local = [f"DROP TABLE IF EXISTS {db}.{name}{LOCAL_SUFFIX} {on_cluster}"] if name in dict(
            target.sharding_keys) else []  # a table's shards too; a view has none
        return [f"DROP TABLE IF EXISTS {db}.{name} {on_cluster}", *local]
    if _INSERT_SELECT.match(statement):
        return [statement]  # through the Distributed tables, once
    raise ValueError(f"no cluster form of this migration statement (pipeline/adapters/clickhouse_ddl.py): "
                     f"{statement[:80]}")


def _qualified(query: str, database: str) -> str:
    """A view's query with its tables named with their database (each server checks a view's query when it
    creates it, in its own default database) and its joins GLOBAL."""
    return _FROM_TABLE.sub(rf"\1{database}.\2", _JOIN.sub("GLOBAL ANY LEFT JOIN", query))


def render_statements(statements: tuple[str, ...] | list[str], target: MigrationTarget) -> list[str]:
    return [rendered for statement in statements for rendered in render_statement(statement, target)]


def create_database(target: MigrationTarget) -> str:
    on_cluster = f" ON CLUSTER {target.cluster}" if target.cluster else ""
    return f"CREATE DATABASE IF NOT EXISTS {target.database}{on_cluster}"


def mutated_table(settings: ClickHouseSettings, table: str) -> str:
    """What an ALTER TABLE ... DELETE names: the table, or on a cluster every shard's local table (a Distributed
    table has no mutations)."""
    if not settings.cluster:
        return table
    return f"{settings.database}.{table}{LOCAL_SUFFIX} ON CLUSTER {settings.cluster}"


def mutations_table(settings: ClickHouseSettings) -> str:
    """Where mutations are listed: this server's system.mutations, or every server's of the cluster."""
    return f"cluster('{settings.cluster}', system.mutations)" if settings.cluster else "system.mutations"


def cluster_settings(settings: ClickHouseSettings) -> dict[str, object]:
    """Connection settings of the pipeline's clients on a cluster. Writers insert into the Distributed tables
    synchronously (insert_distributed_sync): an insert returns once every shard holds its rows, so the runner's
    order (rows, then checkpoints) and its retries mean on a cluster what they mean on one server; inserting
    into each shard's local table would repeat the sharding keys in Python. IN and JOIN subqueries over
    Distributed tables are read once across the cluster (distributed_product_mode = global)."""
    if not settings.cluster:
        return {}
    return {"insert_distributed_sync": 1, "distributed_product_mode": "global"}
