"""`touchpoint identity audit` and `touchpoint identity unmerge AUDIT_ID`: what operators do about merges.

`audit` lists the identity decisions (merges, refusals, unmerges) of an identifier or a person with the id of each
row. `unmerge` takes a merge's id, checks that it names a merge, and publishes an Unmerge operation on the identity
log (pipeline/adapters/identity_log.py), as `forget` publishes erasures: every worker applies it to its graph, and
each restates the rows of its own partitions (see docs/identity.md for what is restated and what is not).
"""

from __future__ import annotations

import time

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.identity_log import write_operations
from pipeline.adapters.person_queries import audit_at, audit_naming
from pipeline.core.identity import AuditRecord, Unmerge, person_id_of
from pipeline.settings import Settings


class UnmergeRefused(ValueError):
    """The audit id names no row, or a row that is not a merge: nothing is published."""


def audit_rows(settings: Settings, identifier: str = "", person: str = "", limit: int = 100) -> list[AuditRecord]:
    """The audit rows naming the identifier (or its own person id) or the person, oldest first."""
    persons = tuple(p for p in (person, person_id_of(identifier) if identifier else "") if p)
    client = connect(settings.clickhouse)
    try:
        return audit_naming(client, identifier, persons, limit)
    finally:
        client.disconnect()


def merge_of(settings: Settings, audit_id: str) -> AuditRecord:
    """The merge row with this id, or UnmergeRefused naming why not."""
    at_hex, _, _ = audit_id.strip().partition("-")
    try:
        at_ms = int(at_hex, 16)
    except ValueError:
        raise UnmergeRefused(f"{audit_id!r} is not an audit id (like 19a6b2c3d4e-1f2e3d4c); "
                             "`touchpoint identity audit --identifier kind:value` lists them") from None
    client = connect(settings.clickhouse)
    try:
        rows = audit_at(client, at_ms)
    finally:
        client.disconnect()
    found = [row for row in rows if row.audit_id == audit_id.strip()]
    if not found:
        raise UnmergeRefused(f"no identity_audit row has id {audit_id}: `touchpoint identity audit --identifier "
                             "kind:value` lists the ids; nothing was unmerged")
    if found[0].action != "merge":
        raise UnmergeRefused(f"audit row {audit_id} is a {found[0].action}, not a merge: only a merge can be "
                             "undone; nothing was unmerged")
    return found[0]


def unmerge(settings: Settings, audit_id: str) -> tuple[AuditRecord, Unmerge]:
    """Publish the undoing of the merge with this id; every worker applies it."""
    merge = merge_of(settings, audit_id)
    operation = Unmerge(merge.identifier_a, merge.identifier_b, int(time.time() * 1000), audit_id.strip())
    # After the links it undoes in the identity log, which workers read in offset order (docs/identity.md).
    write_operations(settings, [operation], "unmerge")
    return merge, operation
