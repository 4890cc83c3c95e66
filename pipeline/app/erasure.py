"""`touchpoint forget IDENTIFIER`: erase a person (right to erasure). Idempotent and audited.

1. Find every person id the identifier has belonged to (rows, and aliases after merges) and every identifier
   those persons were resolved from.
2. Write a Forget operation per identifier to the identity table (pipeline/adapters/identity_log.py): every
   worker drops the person from its graph, and replays of their old events no longer identify them.
3. Delete their rows from touchpoints, person_aliases, role_transitions, journeys, person_profiles and
   identity_audit, and wait until ClickHouse has applied the deletions (workers drop their open journeys and
   profiles on the Forget operations).
4. Record the erasure in identity_audit under the identifier's SHA-256 only.

Indicator windows and alerts hold no person data (counts per channel and minute) and are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.clickhouse_ddl import mutated_table, mutations_table
from pipeline.adapters.identity_log import encode_chunks, write_chunks
from pipeline.core.identity import KINDS, Forget, identifier_hash, person_id_of
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class ErasureReport:
    identifiers: list[str]
    person_ids: list[str]
    rows_before: int


class ErasureRefused(ValueError):
    """The identifier identifies nobody (blank or blocked): nothing is erased, nothing is written."""


def refusal(identifier: str, blocked: frozenset[str]) -> str | None:
    """Why `forget` must not act on this identifier, or None. A blank or blocked value (identity.core's
    blocked_values: BLANK_IDENTIFIERS and identity.extra_blocked_values) never identified a person, so
    erasing it would only write erasure operations and an audit row for nobody."""
    kind, sep, value = identifier.partition(":")
    if not (sep and kind in KINDS):
        kind, value = "", identifier
    if value.strip().lower() in blocked:
        what = f"{kind} value {value!r}" if kind else f"identifier {value!r}"
        return (f"refusing to forget the {what}: it is blank or blocked (never identifies anyone; "
                "identity.extra_blocked_values); nothing was erased")
    return None


def candidates(identifier: str) -> list[str]:
    """'kind:value' as given, or the value under every kind when no known kind prefixes it."""
    kind, _, value = identifier.partition(":")
    if kind in KINDS and value:
        return [identifier]
    return [f"{k}:{identifier}" for k in KINDS]


def _person_data(client: object, identifiers: list[str]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Person ids and identifiers reachable from the given identifiers through stored rows and aliases: all of
    them, and those actually found in storage."""
    ids, persons = set(identifiers), {person_id_of(i) for i in identifiers}
    found_ids: set[str] = set()
    found_persons: set[str] = set()
    while True:
        rows = client.execute(  # type: ignore[attr-defined]
            "SELECT DISTINCT person_id, resolved_from FROM touchpoints "
            "WHERE person_id IN %(persons)s OR hasAny(resolved_from, %(ids)s)",
            {"persons": tuple(persons), "ids": list(ids)})
        aliases = client.execute(  # type: ignore[attr-defined]
            "SELECT alias_person_id, person_id FROM person_aliases "
            "WHERE alias_person_id IN %(persons)s OR person_id IN %(persons)s", {"persons": tuple(persons)})
        found_persons |= {p for p, _ in rows} | {p for pair in aliases for p in pair}
        found_ids |= {i for _, resolved in rows for i in resolved}
        new_persons, new_ids = persons | found_persons, ids | found_ids
        if new_persons == persons and new_ids == ids:
            return persons, ids, found_persons, found_ids
        persons, ids = new_persons, new_ids


def forget(settings: Settings, identifier: str, *, settle_s: float = 2.0, timeout_s: float = 120.0) -> ErasureReport:
    refused = refusal(identifier, settings.identity.core().blocked_values)
    if refused is not None:
        raise ErasureRefused(refused)
    client = connect(settings.clickhouse)
    persons, ids, found_persons, found_ids = _person_data(client, candidates(identifier))
    rows_before = client.execute("SELECT count() FROM touchpoints WHERE person_id IN %(p)s OR "
                                 "hasAny(resolved_from, %(i)s)", {"p": tuple(persons), "i": list(ids)})[0][0]
    now_ms = int(time.time() * 1000)
    write_chunks(settings, encode_chunks(Forget(i, now_ms) for i in sorted(ids)), "forget")
    time.sleep(settle_s)  # let workers apply it and flush what they had buffered, so those rows go too
    params = {"p": tuple(persons), "i": list(ids), "it": tuple(ids)}  # IN takes a tuple, hasAny an array
    ch = settings.clickhouse
    for table, condition in (
        ("touchpoints", "person_id IN %(p)s OR hasAny(resolved_from, %(i)s)"),
        ("person_aliases", "alias_person_id IN %(p)s OR person_id IN %(p)s"),
        ("role_transitions", "person_id IN %(p)s"),
        ("journeys", "person_id IN %(p)s"),
        ("person_profiles", "person_id IN %(p)s"),
        ("identity_audit", "identifier_a IN %(it)s OR identifier_b IN %(it)s "
                           "OR from_person_id IN %(p)s OR into_person_id IN %(p)s"),
    ):
        client.execute(f"ALTER TABLE {mutated_table(ch, table)} DELETE WHERE {condition}", params)
    deadline = time.monotonic() + timeout_s
    while client.execute(f"SELECT count() FROM {mutations_table(ch)} WHERE database = %(db)s AND is_done = 0",
                         {"db": ch.database})[0][0]:
        if time.monotonic() > deadline:
            raise TimeoutError("ClickHouse has not finished the deletions yet; run forget again to check")
        time.sleep(0.2)
    client.execute("INSERT INTO identity_audit (at_ms, action, identifier_a, identifier_b, from_person_id, "
                   "into_person_id, reason, event_id, recorded_at_ms) VALUES",
                   [(now_ms, "erasure", identifier_hash(identifier), "", "", "",
                     f"{len(found_ids)} identifiers, {len(found_persons)} person ids, {rows_before} touchpoints",
                     "", now_ms)])
    return ErasureReport(sorted(found_ids), sorted(found_persons), rows_before)
