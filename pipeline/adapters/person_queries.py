"""ClickHouse reads and deletes of one person's data: the console's journey look-up and `touchpoint forget`.

They read person_touchpoints (ordered by person) and identifier_persons (ordered by identifier), which materialized
views keep current from touchpoints (migration 0060), so one person costs a few granules of each instead of a scan
of touchpoints (ordered by channel and time). Person ids written before a merge point to the person they belong to
now through person_aliases."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.adapters.clickhouse_ddl import mutated_table, mutations_table
from pipeline.core.identity import AuditRecord, person_id_of
from pipeline.settings import ClickHouseSettings

JOURNEY_COLUMNS = ("event_id", "event_time_ms", "channel", "event_type", "role", "person_id", "flow", "outcome",
                   "error_code", "survey_kind", "survey_score", "amount_minor", "currency", "counted")


class Executes(Protocol):
    """A clickhouse_driver Client, or the console's lock-holding wrapper of one."""

    def execute(self, query: str, params: Any = None) -> Any: ...


def persons_of_identifiers(client: Executes, identifiers: Collection[str]) -> set[tuple[str, str]]:
    """(person id, identifier) of every person id touchpoints resolved one of the identifiers to."""
    if not identifiers:
        return set()
    return {(person, identifier) for identifier, person in client.execute(
        "SELECT DISTINCT identifier, person_id FROM identifier_persons WHERE identifier IN %(i)s",
        {"i": tuple(identifiers)})}


def identifiers_of_persons(client: Executes, persons: Collection[str]) -> set[tuple[str, str]]:
    """(person id, identifier) of every identifier the persons' touchpoints were resolved from, and (person id, '')
    for a person with touchpoints but no identifier."""
    if not persons:
        return set()
    rows = client.execute("SELECT DISTINCT person_id, resolved_from FROM person_touchpoints "
                          "WHERE person_id IN %(p)s", {"p": tuple(persons)})
    return {(person, identifier) for person, resolved in rows for identifier in (resolved or [""])}


def alias_pairs(client: Executes, persons: Collection[str]) -> set[tuple[str, str]]:
    """(alias person id, person id) of every alias row that names one of the persons on either side."""
    if not persons:
        return set()
    return set(client.execute("SELECT alias_person_id, person_id FROM person_aliases "
                              "WHERE alias_person_id IN %(p)s OR person_id IN %(p)s", {"p": tuple(persons)}))


def current_persons(client: Executes, seeds: Collection[str]) -> set[str]:
    """The seeds, the persons they belong to now (the newest alias row wins) and every person id that belongs to
    one of those now."""
    if not seeds:
        return set()
    current = dict(client.execute(
        "SELECT alias_person_id, argMax(person_id, updated_at_ms) FROM person_aliases "
        "WHERE alias_person_id IN %(p)s GROUP BY alias_person_id", {"p": tuple(seeds)}))
    heads = {current.get(p, p) for p in seeds}
    # Only aliases that ever pointed to a head can point to it now: the inner filter narrows the grouping.
    members = {alias for (alias,) in client.execute(
        "SELECT alias_person_id FROM person_aliases "
        "WHERE alias_person_id IN (SELECT alias_person_id FROM person_aliases WHERE person_id IN %(h)s) "
        "GROUP BY alias_person_id HAVING argMax(person_id, updated_at_ms) IN %(h)s", {"h": tuple(heads)})}
    return set(seeds) | heads | members


def touchpoints_to_restate(client: Executes, since: Mapping[str, int]) -> set[tuple[str, str, int, str]]:
    """(tenant, channel, event time, event id) of the touchpoints resolved from one of the identifiers with an
    event time from that identifier's time on: after an unmerge or a late identify, the rows to restate."""
    persons = {person for person, _ in persons_of_identifiers(client, since)}
    if not persons:
        return set()
    rows = client.execute(
        "SELECT tenant, channel, event_time_ms, event_id, resolved_from FROM person_touchpoints "
        "WHERE person_id IN %(p)s AND event_time_ms >= %(from)s AND hasAny(resolved_from, %(i)s)",
        {"p": tuple(persons), "from": max(0, min(since.values())), "i": list(since)})
    return {(tenant, channel, at, event_id) for tenant, channel, at, event_id, resolved in rows
            if any(at >= since[i] for i in resolved if i in since)}


def delete_moved_touchpoints(client: Executes, settings: ClickHouseSettings,
                             moved: Collection[tuple[str, str]]) -> None:
    """Drop (former person id, event id) rows of person_touchpoints: the events belong to another person now,
    whose rows the restated touchpoints wrote."""
    if moved:
        client.execute(f"ALTER TABLE {mutated_table(settings, 'person_touchpoints')} DELETE "
                       "WHERE (person_id, event_id) IN %(moved)s", {"moved": tuple(moved)})


def journey_touchpoints(client: Executes, persons: Collection[str], limit: int) -> list[dict[str, Any]]:
    """The persons' touchpoints in event time, each event once (a replay that resolved it to another of the persons
    folds into the counted copy, as touchpoints FINAL does)."""
    if not persons:
        return []
    rows = client.execute(
        f"SELECT {', '.join(JOURNEY_COLUMNS)} FROM person_touchpoints WHERE person_id IN %(p)s "
        "ORDER BY event_time_ms, event_id, counted DESC LIMIT 1 BY event_id LIMIT %(limit)s",
        {"p": tuple(persons), "limit": int(limit)})
    return [dict(zip(JOURNEY_COLUMNS, row, strict=True)) for row in rows]


def touchpoint_count(client: Executes, persons: Collection[str]) -> int:
    """Distinct touchpoints of the persons."""
    if not persons:
        return 0
    return int(client.execute("SELECT uniqExact(event_id) FROM person_touchpoints WHERE person_id IN %(p)s",
                              {"p": tuple(persons)})[0][0])


@dataclass(frozen=True, slots=True)
class Reach:
    """Person ids and identifiers connected to some identifiers through stored touchpoints and aliases: all of
    them (the identifiers asked about and their own person ids included), and those found in storage."""

    persons: frozenset[str]
    identifiers: frozenset[str]
    found_persons: frozenset[str]
    found_identifiers: frozenset[str]


def reach(client: Executes, identifiers: Iterable[str]) -> Reach:
    """Follow identifiers to persons and persons to identifiers and aliases until nothing new turns up."""
    ids = set(identifiers)
    persons = {person_id_of(i) for i in ids}
    found_ids: set[str] = set()
    found_persons: set[str] = set()
    new_ids, new_persons = set(ids), set(persons)
    while new_ids or new_persons:
        pairs = persons_of_identifiers(client, new_ids) | identifiers_of_persons(client, new_persons)
        aliases = alias_pairs(client, new_persons)
        found_persons |= {p for p, _ in pairs} | {p for pair in aliases for p in pair}
        found_ids |= {i for _, i in pairs if i}
        new_ids, new_persons = found_ids - ids, found_persons - persons
        ids |= new_ids
        persons |= new_persons
    return Reach(frozenset(persons), frozenset(ids), frozenset(found_persons), frozenset(found_ids))


def delete_person_data(client: Executes, settings: ClickHouseSettings, persons: Collection[str],
                       identifiers: Collection[str]) -> None:
    """Ask ClickHouse to delete every row of the persons, or resolved from the identifiers, from every table that
    holds person data (see pending_deletions for when it is done). Indicator cells and alerts hold none."""
    params = {"p": tuple(persons), "i": list(identifiers), "it": tuple(identifiers)}  # IN: tuple; hasAny: array
    for table, condition in (
        ("touchpoints", "person_id IN %(p)s OR hasAny(resolved_from, %(i)s)"),
        ("person_touchpoints", "person_id IN %(p)s OR hasAny(resolved_from, %(i)s)"),
        ("identifier_persons", "identifier IN %(it)s OR person_id IN %(p)s"),
        ("person_aliases", "alias_person_id IN %(p)s OR person_id IN %(p)s"),
        ("role_transitions", "person_id IN %(p)s"),
        ("journeys", "person_id IN %(p)s"),
        ("person_profiles", "person_id IN %(p)s"),
        ("identity_audit", "identifier_a IN %(it)s OR identifier_b IN %(it)s "
                           "OR from_person_id IN %(p)s OR into_person_id IN %(p)s"),
    ):
        client.execute(f"ALTER TABLE {mutated_table(settings, table)} DELETE WHERE {condition}", params)


def pending_deletions(client: Executes, settings: ClickHouseSettings) -> int:
    """Mutations of this database ClickHouse (every server of a cluster) has not finished applying."""
    return int(client.execute(f"SELECT count() FROM {mutations_table(settings)} WHERE database = %(db)s "
                              "AND is_done = 0", {"db": settings.database})[0][0])


def record_erasure(client: Executes, at_ms: int, identifier_sha256: str, reason: str) -> None:
    """The erasure's audit row: the identifier's hash only."""
    client.execute("INSERT INTO identity_audit (at_ms, action, identifier_a, identifier_b, from_person_id, "
                   "into_person_id, reason, event_id, recorded_at_ms) VALUES",
                   [(at_ms, "erasure", identifier_sha256, "", "", "", reason, "", at_ms)])


_AUDIT_COLUMNS = "at_ms, action, identifier_a, identifier_b, from_person_id, into_person_id, reason, event_id"


def audit_naming(client: Executes, identifier: str, persons: Collection[str], limit: int) -> list[AuditRecord]:
    """The identity decisions naming the identifier or one of the persons, oldest first."""
    rows = client.execute(
        f"SELECT DISTINCT {_AUDIT_COLUMNS} FROM identity_audit WHERE identifier_a = %(i)s OR identifier_b = %(i)s "
        "OR from_person_id IN %(p)s OR into_person_id IN %(p)s ORDER BY at_ms, action LIMIT %(limit)s",
        {"i": identifier or "\x00", "p": tuple(persons) or ("\x00",), "limit": int(limit)})
    return [AuditRecord(*row) for row in rows]


def audit_at(client: Executes, at_ms: int) -> list[AuditRecord]:
    """The identity decisions recorded at this moment (an audit id carries its row's time)."""
    return [AuditRecord(*row) for row in client.execute(
        f"SELECT DISTINCT {_AUDIT_COLUMNS} FROM identity_audit WHERE at_ms = %(at)s", {"at": at_ms})]
