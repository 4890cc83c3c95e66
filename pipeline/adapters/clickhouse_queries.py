"""The console's, the live view's and the bench's reads (and the console's few writes) of ClickHouse: every SQL
statement they run lives here, beside the sink. Indicator reads filter `indicator_cells FINAL` directly rather than
the views, because ClickHouse 18.16 does not push a WHERE down into a view (docs/clickhouse.md)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_driver import Client

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.person_queries import (
    current_persons,
    identifiers_of_persons,
    journey_touchpoints,
    persons_of_identifiers,
)
from pipeline.core.identity import person_id_of
from pipeline.settings import ClickHouseSettings


@dataclass(frozen=True, slots=True)
class SeriesCell:
    window_start_ms: int
    window_end_ms: int
    count: float
    total: float
    sketch: tuple[tuple[int, int], ...]
    partitions: int  # source partitions that wrote a cell of this window


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    partition: int
    commit_offset: int
    read_offset: int
    watermark_ms: int
    closed_before_ms: int
    written_at_ms: int


@dataclass(slots=True)
class Journey:
    identifiers: list[str]
    person_ids: list[str]
    touchpoints: list[dict[str, Any]] = field(default_factory=list)
    merges: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)



LIVE_INDICATORS = """
SELECT tenant, channel, indicator, sum(total) AS num, sum(count) AS den, max(window_start) AS last
FROM indicator_values_by_channel
WHERE window_kind = '1m' AND quantile = 0 AND window_start >= now() - %(seconds)s
GROUP BY tenant, channel, indicator
ORDER BY tenant, channel
"""
# Each series' state from the alerter (alert_current), with the message of its newest transition.
LIVE_ALERTS = """
SELECT c.since_ms, c.state, e_severity, c.rule, c.tenant, c.channel, e_message
FROM alert_current AS c ANY LEFT JOIN (
    SELECT fingerprint, argMax(severity, at_ms) AS e_severity, argMax(message, at_ms) AS e_message
    FROM alert_events GROUP BY fingerprint) AS e USING fingerprint
WHERE c.state IN ('pending', 'firing', 'no_data') OR c.since_ms >= (toUInt64(now()) - %(seconds)s) * 1000
ORDER BY c.since_ms DESC, c.rule
LIMIT 12
"""
# The demo's two tenants: their journeys, pooled.
LIVE_JOURNEYS = """
SELECT tenant, count() AS journeys, avg(channel_switches), avg(contacts > 0), avgIf(resolved, isNotNull(resolved)),
       avgIf(ux_score, isNotNull(ux_score)), avgIf(cx_score, isNotNull(cx_score)), avg(effort),
       argMax(arrayStringConcat(channels, ' > '), end_ms)
FROM journeys FINAL
WHERE start >= now() - %(seconds)s AND tenant IN ('bank', 'hospital')
GROUP BY tenant
ORDER BY tenant
"""


class ConsoleQueries:
    """One connection, one query at a time (the console's request threads share it)."""

    def __init__(self, settings: ClickHouseSettings, client: Client | None = None) -> None:
        self.settings = settings
        self.client = client or connect(settings)
        self._lock = threading.Lock()

    def execute(self, query: str, params: object = None) -> Any:
        with self._lock:
            return self.client.execute(query, params)

    def close(self) -> None:
        self.client.disconnect()

    # --- indicators -----------------------------------------------------------------------------------------

    def pooled_by_tenant(self, seconds: int) -> dict[str, dict[str, tuple[float, float]]]:
        """tenant -> indicator -> (total, count) over the closed 1-minute windows of the last `seconds`, every
        channel, role, flow, device and partition summed; ratios and means only (quantiles do not pool this way)."""
        rows = self.execute(
            "SELECT tenant, indicator, sum(total), sum(count) FROM indicator_cells FINAL "
            "WHERE window_kind = '1m' AND quantile = 0 AND window_start >= now() - %(seconds)s "
            "GROUP BY tenant, indicator", {"seconds": int(seconds)})
        pooled: dict[str, dict[str, tuple[float, float]]] = {}
        for tenant, indicator, total, count in rows:
            pooled.setdefault(tenant, {})[indicator] = (float(total), float(count))
        return pooled

    def channels(self, seconds: int) -> list[tuple[str, str, list[str]]]:
        """(tenant, channel, indicators with data) seen in windows of the last `seconds`."""
        rows = self.execute(
            "SELECT tenant, channel, groupUniqArray(indicator) FROM indicator_cells FINAL "
            "WHERE window_start >= now() - %(seconds)s AND count > 0 AND window_kind IN ('1m', '15m') "
            "GROUP BY tenant, channel ORDER BY tenant, channel", {"seconds": int(seconds)})
        return [(tenant, channel, sorted(indicators)) for tenant, channel, indicators in rows]

    def series(self, tenant: str, channel: str, indicator: str, window_kind: str, seconds: int) -> list[SeriesCell]:
        """One indicator's windows of one kind for a tenant and channel, partitions and other dimensions merged."""
        rows = self.execute(
            "SELECT toUInt32(window_start), toUInt32(window_end), sum(count), sum(total), "
            "sumMap(sketch_keys, sketch_counts), uniqExact(source_partition) FROM indicator_cells FINAL "
            "WHERE window_kind = %(kind)s AND tenant = %(tenant)s AND channel = %(channel)s "
            "AND indicator = %(indicator)s AND window_start >= now() - %(seconds)s "
            "GROUP BY window_start, window_end ORDER BY window_start",
            {"kind": window_kind, "tenant": tenant, "channel": channel, "indicator": indicator,
             "seconds": int(seconds)})
        return [SeriesCell(start * 1000, end * 1000, float(count), float(total),
                           tuple(zip(keys, counts, strict=True)), int(partitions))
                for start, end, count, total, (keys, counts), partitions in rows]

    def late_events(self, tenant: str, channel: str, seconds: int, pane_ms: int) -> dict[int, int]:
        """Pane start (ms) -> touchpoints of the tenant and channel that came after their window closed."""
        rows = self.execute(
            "SELECT intDiv(event_time_ms, %(pane)s) * %(pane)s AS pane_start, count() FROM touchpoints FINAL "
            "WHERE tenant = %(tenant)s AND toString(channel) = %(channel)s AND counted = 0 "
            "AND event_time >= now() - %(seconds)s GROUP BY pane_start",
            {"pane": int(pane_ms), "tenant": tenant, "channel": channel, "seconds": int(seconds)})
        return {int(start): int(n) for start, n in rows}

    # --- a person's journey ---------------------------------------------------------------------------------

    def journey(self, identifiers: Sequence[str], limit: int = 1000) -> Journey:
        """Every touchpoint of the person (or persons) the identifiers belong to now, in event time, with the merges
        that joined them and their role transitions. Reads the tables ordered by person and by identifier
        (pipeline/adapters/person_queries.py), never a scan of touchpoints."""
        ids = list(identifiers)
        seeds = {person_id_of(i) for i in ids} | {p for p, _ in persons_of_identifiers(self, ids)}
        persons = tuple(sorted(current_persons(self, seeds)))
        found = journey_touchpoints(self, persons, limit)
        journey = Journey(ids, sorted({row["person_id"] for row in found}))
        journey.touchpoints = found
        if not found:
            return journey
        all_ids = sorted(set(ids) | {i for _, i in identifiers_of_persons(self, persons) if i})
        journey.identifiers = all_ids
        journey.merges = [
            {"at_ms": at, "action": action, "identifier_a": a, "identifier_b": b, "from_person_id": f,
             "into_person_id": into, "reason": reason}
            for at, action, a, b, f, into, reason in self.execute(
                # The newest copy per key, as FINAL would keep, but chosen after the filter: FINAL merged the
                # whole table first.
                "SELECT at_ms, action, identifier_a, identifier_b, from_person_id, into_person_id, reason "
                "FROM identity_audit WHERE from_person_id IN %(p)s OR into_person_id IN %(p)s "
                "OR identifier_a IN %(i)s OR identifier_b IN %(i)s ORDER BY at_ms, recorded_at_ms DESC "
                "LIMIT 1 BY action, identifier_a, identifier_b, at_ms LIMIT 200",
                {"p": persons, "i": tuple(all_ids)})]
        journey.transitions = [
            {"at_ms": at, "from_role": f, "to_role": t, "cause": cause}
            for at, f, t, cause in self.execute(
                "SELECT DISTINCT at_ms, from_role, to_role, cause FROM role_transitions FINAL "
                "WHERE person_id IN %(p)s ORDER BY at_ms", {"p": persons})]
        return journey

    # --- pipeline health ------------------------------------------------------------------------------------

    def checkpoints(self, consumer_group: str, topic: str) -> list[CheckpointRow]:
        """Each partition's furthest-along checkpoint (the one with the highest read offset)."""
        rows = self.execute(
            "SELECT partition, argMax(commit_offset, read_offset), max(read_offset), "
            "argMax(watermark_ms, read_offset), argMax(closed_before_ms, read_offset), max(written_at_ms) "
            "FROM pipeline_checkpoints WHERE consumer_group = %(group)s AND topic = %(topic)s "
            "GROUP BY partition ORDER BY partition", {"group": consumer_group, "topic": topic})
        return [CheckpointRow(*(int(v) for v in row)) for row in rows]

    def last_rows_written_ms(self) -> int | None:
        """When the newest touchpoint row was written (the last flush with rows), in ms."""
        rows = self.execute("SELECT toUInt64(max(ingested_at)) * 1000, count() FROM touchpoints "
                            "WHERE ingested_at >= now() - 86400")
        return int(rows[0][0]) if rows and rows[0][1] else None

    def replayed_dead_letters(self, topic: str) -> set[tuple[int, int]]:
        """(partition, offset) of the dead letters of a topic already replayed."""
        rows = self.execute("SELECT dead_letter_partition, dead_letter_offset FROM dead_letter_replays FINAL "
                            "WHERE dead_letter_topic = %(topic)s", {"topic": topic})
        return {(int(p), int(o)) for p, o in rows}

    def record_replays(self, rows: Sequence[tuple[str, int, int, str, str, str, int]]) -> None:
        """(dead-letter topic, partition, offset, event id, reason, target topic, replayed at ms) per replay."""
        if rows:
            self.execute("INSERT INTO dead_letter_replays (dead_letter_topic, dead_letter_partition, "
                         "dead_letter_offset, event_id, reason, target_topic, replayed_at_ms) VALUES", list(rows))

    def live_indicators(self, seconds: int) -> list[tuple[str, str, str, float, float]]:
        """(tenant, channel, indicator, numerator, observations) of the closed 1-minute windows of the last seconds."""
        return [(t, c, i, num, den) for t, c, i, num, den, _last in self.execute(LIVE_INDICATORS, {"seconds": seconds})]

    def touchpoint_volume(self, seconds: int) -> tuple[int, int]:
        """Touchpoints and distinct persons of the last seconds."""
        rows = self.execute("SELECT count(), uniqExact(person_id) FROM touchpoints "
                            "WHERE event_time >= now() - %(seconds)s", {"seconds": seconds})
        return int(rows[0][0]), int(rows[0][1])

    def live_alerts(self, seconds: int) -> list[tuple[Any, ...]]:
        """(since, state, severity, rule, tenant, channel, message) of alerts active or changed in the last seconds."""
        return list(self.execute(LIVE_ALERTS, {"seconds": seconds}))


    def live_journeys(self, seconds: int) -> list[tuple[Any, ...]]:
        """Per demo tenant: journeys, mean switches, share with a contact, resolved, UX, CX, effort, latest path."""
        return list(self.execute(LIVE_JOURNEYS, {"seconds": seconds}))


# --- the bench ----------------------------------------------------------------------------------------------

def touchpoint_rows(client: Client) -> int:
    """Rows in the touchpoints table (replays not merged away yet included): how far a bench run has got."""
    return int(client.execute("SELECT count() FROM touchpoints")[0][0])
