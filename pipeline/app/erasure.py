"""`touchpoint forget IDENTIFIER`: erase a person (right to erasure). Idempotent and audited.

1. Find every person id the identifier has belonged to (rows, and aliases after merges) and every identifier
   those persons were resolved from, through the tables ordered by identifier and by person (no scan of
   touchpoints; the SQL is in pipeline/adapters/person_queries.py).
2. Write a Forget operation per identifier to the identity log (pipeline/adapters/identity_log.py): every
   worker drops the person from its graph, writes tombstones for the person's links and facts, and replays of
   their old events no longer identify them. After the settle time the Forget's key is overwritten with the
   identifier's SHA-256 only, so once the broker compacts the log no erased identifier is left in it.
3. Delete their rows from touchpoints, person_touchpoints, identifier_persons, person_aliases, role_transitions,
   journeys, person_profiles and identity_audit, and wait until ClickHouse has applied the deletions (workers
   drop their open journeys and profiles on the Forget operations).
4. Record the erasure in identity_audit under the identifier's SHA-256 only.

Indicator windows and alerts hold no person data (counts per channel and minute) and are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.identity_log import write_operations
from pipeline.adapters.person_queries import (
    delete_person_data,
    pending_deletions,
    reach,
    record_erasure,
    touchpoint_count,
)
from pipeline.core.identity import KINDS, Forget, Forgotten, identifier_hash
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


def forget(settings: Settings, identifier: str, *, settle_s: float = 2.0, timeout_s: float = 120.0) -> ErasureReport:
    refused = refusal(identifier, settings.identity.core().blocked_values)
    if refused is not None:
        raise ErasureRefused(refused)
    client = connect(settings.clickhouse)
    found = reach(client, candidates(identifier))
    rows_before = touchpoint_count(client, found.persons)
    now_ms = int(time.time() * 1000)
    erased = sorted(found.identifiers)
    write_operations(settings, [Forget(i, now_ms) for i in erased], "forget")
    time.sleep(settle_s)  # let workers apply it and flush what they had buffered, so those rows go too
    write_operations(settings, [], "forget", erased=[Forgotten(identifier_hash(i), now_ms) for i in erased])
    delete_person_data(client, settings.clickhouse, found.persons, found.identifiers)
    deadline = time.monotonic() + timeout_s
    while pending_deletions(client, settings.clickhouse):
        if time.monotonic() > deadline:
            raise TimeoutError("ClickHouse has not finished the deletions yet; run forget again to check")
        time.sleep(0.2)
    record_erasure(client, now_ms, identifier_hash(identifier),
                   f"{len(found.found_identifiers)} identifiers, {len(found.found_persons)} person ids, "
                   f"{rows_before} touchpoints")
    return ErasureReport(sorted(found.found_identifiers), sorted(found.found_persons), rows_before)
