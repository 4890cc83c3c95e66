"""ClickHouse adapter of the alerter: what it reads (checkpoints, window totals of every partition, seasonal history,
detractor touchpoints, operators' commands, silences, the lease) and what it writes (alert events, states, the
delivery log, cases). Every read is one bounded query; every write one columnar insert."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.adapters.clickhouse import ClickHouseSink, connect
from pipeline.core.alerting import AlertEvent, Series
from pipeline.core.cases import Case, CaseChange, TouchpointFact
from pipeline.core.evaluate import WindowTotal
from pipeline.core.notify import Notification, Silence
from pipeline.settings import ClickHouseSettings

_EVENT_COLUMNS = ("event_id", "fingerprint", "rule", "rule_kind", "severity", "family", "tenant", "channel",
                  "label_names", "label_values", "from_state", "to_state", "cause", "actor", "window_kind",
                  "window_start", "window_end", "window_start_ms", "window_end_ms", "value", "threshold",
                  "value_names", "value_numbers", "message", "partitions", "closed_by_watermark", "closed_by_idle",
                  "channels_reporting", "channels_expected", "active_since_ms", "at_ms", "epoch")
_STATE_COLUMNS = ("fingerprint", "rule", "tenant", "channel", "state", "since_ms", "value", "acked_by",
                  "escalation_level", "window_end_ms", "series_json", "version", "epoch")
_NOTIFICATION_COLUMNS = ("notification_id", "receiver", "group_key", "reason", "status", "attempt", "http_status",
                         "error", "event_ids", "payload", "at_ms", "epoch")
_CASE_COLUMNS = ("case_id", "tenant", "person_id", "reason", "queue", "status", "opened_at_ms", "sla_due_ms",
                 "source_event_id", "source_channel", "score", "escalation_level", "closed_at_ms", "closed_by",
                 "updated_at_ms")


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    partition: int
    closed_before_ms: int
    written_at_ms: int


@dataclass(frozen=True, slots=True)
class LeaseView:
    epoch: int
    holder: str
    claimed_at_ms: int
    renewed_at_ms: int


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One line of the delivery log."""

    notification: Notification
    status: str
    attempt: int
    at_ms: int
    http_status: int = 0
    error: str = ""


def event_from_row(row: Sequence[Any]) -> AlertEvent:
    from pipeline.core.alerting import Completeness

    (event_id, fp, rule, rule_kind, severity, family, tenant, channel, label_names, label_values, from_state,
     to_state, cause, actor, window_kind, _start, _end, start_ms, end_ms, value, threshold, value_names,
     value_numbers, message, partitions, by_watermark, by_idle, reporting, expected, active_since_ms, at_ms,
     _epoch) = row
    return AlertEvent(
        event_id=event_id, fingerprint=fp, rule=rule, rule_kind=rule_kind, severity=severity, family=family,
        tenant=tenant, channel=channel, from_state=from_state, to_state=to_state, window_kind=window_kind,
        window_start_ms=start_ms, window_end_ms=end_ms, value=value, threshold=threshold,
        values=tuple(zip(value_names, value_numbers, strict=True)), message=message,
        completeness=Completeness(partitions, tuple(by_watermark), tuple(by_idle), tuple(reporting),
                                  tuple(expected)), at_ms=at_ms, cause=cause,
        actor=actor, labels=tuple(zip(label_names, label_values, strict=True)), active_since_ms=active_since_ms)


class AlertStore:
    """The alerter's view of ClickHouse. Totals are read through ClickHouseSink.window_totals (all partitions)."""

    def __init__(self, settings: ClickHouseSettings, consumer_group: str, topic: str) -> None:
        self.client = connect(settings)
        self._lock = threading.Lock()
        self.consumer_group = consumer_group
        self.topic = topic
        self.cells = ClickHouseSink(settings, consumer_group, topic)

    def close(self) -> None:
        self.client.disconnect()
        self.cells.client.disconnect()

    def _execute(self, query: str, params: object = None, **kwargs: object) -> Any:
        with self._lock:
            return self.client.execute(query, params, **kwargs)

    def _insert(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        if rows:
            data = [list(column) for column in zip(*rows, strict=True)]
            self._execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES", data, columnar=True)

    # ------------------------------------------------------------------------------------------------ reads

    def checkpoints(self) -> list[PartitionProgress]:
        rows = self._execute(
            "SELECT partition, max(closed_before_ms), max(written_at_ms) FROM pipeline_checkpoints "
            "WHERE consumer_group = %(group)s AND topic = %(topic)s GROUP BY partition",
            {"group": self.consumer_group, "topic": self.topic})
        return [PartitionProgress(int(p), int(closed), int(written)) for p, closed, written in rows]

    def window_totals(self, from_ms: int, before_ms: int, partitions: Sequence[int], indicators: set[str],
                      window_kind: str) -> list[WindowTotal]:
        """One query: every partition's cells of one window kind ending in (from, before], summed."""
        return self.cells.window_totals(from_ms, before_ms, partitions, indicators, (window_kind,))

    def hourly_history(self, hours_ms: Collection[int], indicators: set[str]) -> list[WindowTotal]:
        """Totals per hour, tenant, channel and indicator of the '1m' rollups of the given hours (one query)."""
        if not hours_ms or not indicators:
            return []
        rows = self._execute(
            "SELECT toUInt32(period_start), tenant, channel, indicator, sum(total), sum(count), "
            "sumMap(sketch_keys, sketch_counts) FROM indicator_rollup_hourly FINAL "
            "WHERE window_kind = '1m' AND indicator IN %(indicators)s AND toUInt32(period_start) IN %(hours)s "
            "GROUP BY period_start, tenant, channel, indicator",
            {"indicators": tuple(sorted(indicators)), "hours": tuple(sorted(h // 1000 for h in hours_ms))})
        return [WindowTotal(start * 1000, start * 1000 + 3_600_000, tenant, channel, indicator, total, count, "1m",
                            tuple(zip(keys, counts, strict=True)))
                for start, tenant, channel, indicator, total, count, (keys, counts) in rows]

    def detractor_facts(self, from_ms: int, before_ms: int) -> list[TouchpointFact]:
        """Customers' survey answers and escalated contacts with event time in [from, before) (one query)."""
        if before_ms <= from_ms:
            return []
        rows = self._execute(
            "SELECT event_id, any(event_time_ms), any(tenant), any(toString(channel)), any(person_id), "
            "max(is_customer), any(survey_kind), any(survey_score), any(survey_scale_min), any(survey_scale_max), "
            "max(ifNull(escalated, 0)) FROM touchpoints "
            "WHERE event_time >= toDateTime(%(from_s)s) AND event_time <= toDateTime(%(to_s)s) "
            "AND event_time_ms >= %(from_ms)s AND event_time_ms < %(to_ms)s AND is_customer = 1 "
            "AND (survey_kind IN ('NPS', 'CSAT') OR escalated = 1) GROUP BY event_id",
            {"from_s": from_ms // 1000, "to_s": before_ms // 1000 + 1, "from_ms": from_ms, "to_ms": before_ms})
        return [TouchpointFact(eid, int(t), tenant, channel, person, bool(customer), kind,
                               None if score is None else int(score), None if low is None else int(low),
                               None if high is None else int(high), bool(escalated))
                for eid, t, tenant, channel, person, customer, kind, score, low, high, escalated in rows]

    def commands(self, since_ms: int) -> list[tuple[str, str, str, str, int]]:
        """(command_id, action, target, actor, at_ms) of operators' commands since a time, oldest first."""
        return [tuple(r) for r in self._execute(
            "SELECT command_id, action, target, actor, at_ms FROM alert_commands FINAL WHERE at_ms >= %(since)s "
            "ORDER BY at_ms, command_id", {"since": max(0, since_ms)})]

    def silences(self, now_ms: int) -> list[Silence]:
        rows = self._execute(
            "SELECT silence_id, matcher_names, matcher_values, starts_at_ms, ends_at_ms, created_by, comment "
            "FROM silences FINAL WHERE ends_at_ms > %(now)s", {"now": now_ms})
        return [Silence(sid, tuple(zip(names, values, strict=True)), int(starts), int(ends), by, comment)
                for sid, names, values, starts, ends, by, comment in rows]

    def lease(self) -> LeaseView | None:
        """The holder of the highest epoch: its earliest claim (ties: the smaller holder id)."""
        rows = self._execute(
            "SELECT epoch, holder, min(claimed_at_ms) AS claimed, max(renewed_at_ms) FROM alerter_lease "
            "WHERE epoch = (SELECT max(epoch) FROM alerter_lease) GROUP BY epoch, holder "
            "ORDER BY claimed, holder LIMIT 1")
        if not rows:
            return None
        epoch, holder, claimed, renewed = rows[0]
        return LeaseView(int(epoch), str(holder), int(claimed), int(renewed))

    def claim(self, epoch: int, holder: str, now_ms: int, claimed_at_ms: int | None = None) -> None:
        self._insert("alerter_lease", ("epoch", "holder", "claimed_at_ms", "renewed_at_ms"),
                     [(epoch, holder, now_ms if claimed_at_ms is None else claimed_at_ms, now_ms)])

    def load_states(self) -> tuple[list[Series], dict[str, Any]]:
        """Every series' stored state and the progress row."""
        rows = self._execute("SELECT fingerprint, series_json FROM alert_state FINAL")
        series, progress = [], {}
        for fp, text in rows:
            if fp == "":
                progress = json.loads(text)
            else:
                series.append(Series.from_dict(json.loads(text)))
        return series, progress

    def latest_events(self, fingerprints: Collection[str]) -> list[AlertEvent]:
        if not fingerprints:
            return []
        rows = self._execute(
            f"SELECT {', '.join(_EVENT_COLUMNS)} FROM alert_events WHERE fingerprint IN %(fps)s "
            "ORDER BY at_ms DESC LIMIT 1 BY fingerprint", {"fps": tuple(fingerprints)})
        return [event_from_row(r) for r in rows]

    def existing_event_ids(self, ids: Collection[str], since_ms: int) -> set[str]:
        if not ids:
            return set()
        return {r[0] for r in self._execute(
            "SELECT event_id FROM alert_events WHERE window_end_ms >= %(since)s AND event_id IN %(ids)s",
            {"ids": tuple(ids), "since": since_ms})}

    def notification_status(self, since_ms: int) -> dict[tuple[str, str], tuple[str, int, int, Notification]]:
        """(notification id, receiver) -> (latest status, attempts, first logged at, notification) since a time."""
        rows = self._execute(
            "SELECT notification_id, receiver, argMax(status, at_ms), max(attempt), min(at_ms), any(group_key), "
            "any(reason), any(event_ids), argMax(payload, length(payload)) FROM alert_notifications "
            "WHERE at_ms >= %(since)s GROUP BY notification_id, receiver", {"since": since_ms})
        return {(nid, receiver): (status, int(attempt), int(first),
                                  Notification(nid, receiver, key, reason, json.loads(text) if text else {}, "",
                                               tuple(ids)))
                for nid, receiver, status, attempt, first, key, reason, ids, text in rows}

    def open_cases(self, known_since_ms: int) -> list[Case]:
        rows = self._execute(
            f"SELECT {', '.join(_CASE_COLUMNS)} FROM cases FINAL "
            "WHERE status != 'closed' OR opened_at_ms >= %(since)s", {"since": known_since_ms})
        return [Case(*r) for r in rows]

    # ------------------------------------------------------------------------------------------------ writes

    def write_events(self, events: Iterable[AlertEvent], epoch: int) -> None:
        self._insert("alert_events", _EVENT_COLUMNS, [(
            e.event_id, e.fingerprint, e.rule, e.rule_kind, e.severity, e.family, e.tenant, e.channel,
            [k for k, _ in e.labels], [v for _, v in e.labels], e.from_state, e.to_state, e.cause, e.actor,
            e.window_kind, e.window_start_ms // 1000, e.window_end_ms // 1000, e.window_start_ms, e.window_end_ms,
            e.value, e.threshold, [k for k, _ in e.values], [float(v) for _, v in e.values], e.message,
            e.completeness.partitions, list(e.completeness.closed_by_watermark),
            list(e.completeness.closed_by_idle), list(e.completeness.channels_reporting),
            list(e.completeness.channels_expected), e.active_since_ms, e.at_ms, epoch) for e in events])

    def write_states(self, series: Iterable[Series], progress: dict[str, Any], version: int, epoch: int) -> None:
        """Changed series and the progress row in one insert: a crash leaves both or neither."""
        rows = [(s.fingerprint, s.rule, s.tenant, s.channel, s.state, s.since_ms, s.value, s.acked_by,
                 min(s.escalation_level, 255), s.window_end_ms, json.dumps(s.as_dict()), version, epoch)
                for s in series]
        rows.append(("", "", "", "", "progress", 0, None, "", 0, int(progress.get("judged_until_ms", 0)),
                     json.dumps(progress), version, epoch))
        self._insert("alert_state", _STATE_COLUMNS, rows)

    def write_deliveries(self, rows: Sequence[DeliveryRow], epoch: int) -> None:
        self._insert("alert_notifications", _NOTIFICATION_COLUMNS, [(
            r.notification.notification_id, r.notification.receiver, r.notification.group_key,
            r.notification.reason, r.status, r.attempt, r.http_status, r.error[:500],
            list(r.notification.event_ids),
            json.dumps(r.notification.payload) if r.status in ("pending", "silenced") else "", r.at_ms, epoch)
            for r in rows])

    def write_cases(self, changes: Sequence[CaseChange], now_ms: int) -> None:
        self._insert("cases", _CASE_COLUMNS, [tuple(c.case.as_dict()[k] for k in _CASE_COLUMNS) for c in changes])
        self._insert("case_history", ("case_id", "at_ms", "action", "status", "detail", "actor"),
                     [(c.case.case_id, now_ms, c.action, c.case.status, c.detail, c.actor) for c in changes])

    def write_command(self, command_id: str, action: str, target: str, actor: str, comment: str,
                      at_ms: int) -> None:
        self._insert("alert_commands", ("command_id", "action", "target", "actor", "comment", "at_ms"),
                     [(command_id, action, target, actor, comment, at_ms)])

    def write_silence(self, silence: Silence, now_ms: int) -> None:
        self._insert("silences", ("silence_id", "matcher_names", "matcher_values", "starts_at_ms", "ends_at_ms",
                                  "created_by", "comment", "updated_at_ms"),
                     [(silence.silence_id, [k for k, _ in silence.matchers], [v for _, v in silence.matchers],
                       silence.starts_at_ms, silence.ends_at_ms, silence.created_by, silence.comment, now_ms)])

    # ------------------------------------------------------------------------------------------------ operators

    def current_alerts(self, states: Collection[str]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._execute(
            "SELECT fingerprint, rule, tenant, channel, state, since_ms, value, acked_by, escalation_level "
            "FROM alert_current WHERE state IN %(states)s ORDER BY state, rule, tenant, channel",
            {"states": tuple(states)})]

    def alerts_with_latest_event(self, fingerprint: str | None, since_ms: int) -> list[tuple[Any, ...]]:
        """Each series' current state with its latest transition: one series by fingerprint, or those that changed
        since since_ms plus every active one."""
        params: dict[str, object]
        if fingerprint is not None:
            where, params = "c.fingerprint = %(fp)s", {"fp": fingerprint}
        else:
            where = "c.since_ms >= %(since)s OR c.state IN ('firing', 'pending', 'no_data')"
            params = {"since": since_ms}
        # Inner names differ from the columns: ClickHouse 18.16 reads `max(x) AS x` as an aggregate inside itself.
        return [tuple(r) for r in self._execute(
            "SELECT c.fingerprint, c.rule, c.tenant, c.channel, c.state, c.since_ms, c.acked_by, e_family, "
            "e_severity, e_kind, e_start, e_end, e_value, e_threshold, e_message, e_at, e_rule_kind "
            "FROM alert_current AS c ANY LEFT JOIN ("
            "SELECT fingerprint, argMax(family, at_ms) AS e_family, argMax(severity, at_ms) AS e_severity, "
            "argMax(window_kind, at_ms) AS e_kind, argMax(window_start_ms, at_ms) AS e_start, "
            "argMax(window_end_ms, at_ms) AS e_end, argMax(value, at_ms) AS e_value, "
            "argMax(threshold, at_ms) AS e_threshold, argMax(message, at_ms) AS e_message, max(at_ms) AS e_at, "
            "argMax(rule_kind, at_ms) AS e_rule_kind FROM alert_events GROUP BY fingerprint) AS e USING fingerprint "
            f"WHERE {where} ORDER BY c.since_ms DESC LIMIT 500", params)]

    def transitions_of(self, fingerprint: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._execute(
            "SELECT from_state, to_state, cause, actor, window_end_ms, message, at_ms FROM alert_events FINAL "
            "WHERE fingerprint = %(fp)s ORDER BY at_ms", {"fp": fingerprint})]

    def commands_on(self, fingerprint: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._execute(
            "SELECT action, actor, comment, at_ms FROM alert_commands FINAL WHERE target = %(fp)s ORDER BY at_ms",
            {"fp": fingerprint})]

    def list_cases(self, statuses: Collection[str], limit: int) -> list[Case]:
        rows = self._execute(
            f"SELECT {', '.join(_CASE_COLUMNS)} FROM cases FINAL WHERE status IN %(statuses)s "
            "ORDER BY opened_at_ms DESC LIMIT %(limit)s", {"statuses": tuple(statuses), "limit": limit})
        return [Case(*r) for r in rows]
