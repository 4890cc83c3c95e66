"""What operators do to alerts and cases (`touchpoint alerts ...`, `touchpoint cases ...`): list them, and record
acknowledgements, manual resolutions, silences and case closures. Commands are rows in ClickHouse that the active
alerter applies in its next cycle, so the engine stays the only writer of alert states."""

from __future__ import annotations

import builtins
import time
import uuid
from typing import Any

from pipeline.adapters.alert_store import AlertStore
from pipeline.console.alerts import UnknownAlert, console_state
from pipeline.core.cases import Case
from pipeline.core.notify import Silence
from pipeline.settings import Settings

ACTIVE_STATES = ("pending", "firing", "no_data")
ALL_STATES = ("inactive", "pending", "firing", "resolved", "no_data")


class AdminError(ValueError):
    """An operator's mistake, told in one line."""


def _store(settings: Settings) -> AlertStore:
    return AlertStore(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)


def list_alerts(settings: Settings, everything: bool = False) -> list[tuple[Any, ...]]:
    store = _store(settings)
    try:
        return store.current_alerts(ALL_STATES if everything else ACTIVE_STATES)
    finally:
        store.close()


def _fingerprint(store: AlertStore, prefix: str) -> str:
    matches = [row[0] for row in store.current_alerts(ALL_STATES) if row[0].startswith(prefix)]
    if not matches:
        raise AdminError(f"no alert with fingerprint {prefix!r} (see `touchpoint alerts list --all`)")
    if len(matches) > 1:
        raise AdminError(f"fingerprint {prefix!r} is ambiguous: {', '.join(matches[:5])}")
    return matches[0]


def command(settings: Settings, action: str, target: str, actor: str, comment: str = "") -> str:
    """Record an ack / resolve (target: a fingerprint or its prefix) or close_case (target: a case id)."""
    store = _store(settings)
    try:
        if action in ("ack", "resolve"):
            target = _fingerprint(store, target)
        elif action == "close_case":
            if not any(c.case_id.startswith(target) for c in store.list_cases(("open", "escalated"), 100_000)):
                raise AdminError(f"no open case with id {target!r} (see `touchpoint cases list`)")
            target = next(c.case_id for c in store.list_cases(("open", "escalated"), 100_000)
                          if c.case_id.startswith(target))
        store.write_command(uuid.uuid4().hex, action, target, actor, comment, int(time.time() * 1000))
        return target
    finally:
        store.close()


def silence(settings: Settings, matchers: list[str], duration_s: float, actor: str, comment: str) -> Silence:
    pairs = []
    for matcher in matchers:
        name, sep, value = matcher.partition("=")
        if not sep or not name.strip():
            raise AdminError(f"matcher {matcher!r} must be label=value (e.g. tenant=bank, rule=cx_csat_low)")
        pairs.append((name.strip(), value.strip()))
    if not pairs:
        raise AdminError("a silence needs at least one label=value matcher")
    if duration_s <= 0:
        raise AdminError("the silence's duration must be positive")
    now = int(time.time() * 1000)
    made = Silence(uuid.uuid4().hex[:12], tuple(sorted(pairs)), now, now + int(duration_s * 1000), actor, comment)
    store = _store(settings)
    try:
        store.write_silence(made, now)
    finally:
        store.close()
    return made


def expire_silence(settings: Settings, silence_id: str) -> None:
    store = _store(settings)
    try:
        now = int(time.time() * 1000)
        found = [s for s in store.silences(now) if s.silence_id == silence_id]
        if not found:
            raise AdminError(f"no active silence {silence_id!r}")
        s = found[0]
        store.write_silence(Silence(s.silence_id, s.matchers, s.starts_at_ms, now, s.created_by, s.comment), now)
    finally:
        store.close()


def list_cases(settings: Settings, everything: bool = False, limit: int = 200) -> list[Case]:
    store = _store(settings)
    try:
        return store.list_cases(("open", "escalated", "closed") if everything else ("open", "escalated"), limit)
    finally:
        store.close()


class LifecycleAlertStore:
    """The console's alert interface (pipeline/console/alerts.py AlertStore: list, get, act) over the alerter's
    tables: an alert is a series (alert_id = fingerprint) with its current state, latest transition, and history
    of transitions and operators' commands. Acknowledge and resolve become commands the alerter applies; silence
    mutes the series (rule, tenant, channel) until the given time."""

    def __init__(self, settings: Settings) -> None:
        self.store = _store(settings)

    def _rows(self, fingerprint: str | None = None, since_ms: int = 0) -> list[dict[str, Any]]:
        keys = ("alert_id", "rule", "tenant", "channel", "lifecycle_state", "since_ms", "acked_by", "family",
                "severity", "window_kind", "window_start_ms", "window_end_ms", "value", "threshold", "message",
                "fired_at_ms", "rule_kind")
        return [dict(zip(keys, row, strict=True)) for row in self.store.alerts_with_latest_event(fingerprint, since_ms)]

    def _with_state(self, alerts: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
        silences = self.store.silences(now_ms)
        for alert in alerts:
            labels = {"alertname": alert["rule"], "rule": alert["rule"], "tenant": alert["tenant"],
                      "channel": alert["channel"], "severity": alert["severity"], "family": alert["family"]}
            muted = next((s for s in silences if s.mutes(labels, now_ms)), None)
            alert["state"] = console_state(alert["lifecycle_state"], alert["acked_by"], muted is not None)
            alert["silenced_until_ms"] = muted.ends_at_ms if muted is not None else 0
            alert["last_action"] = None
        return alerts

    def list(self, seconds: int, now_ms: int) -> list[dict[str, Any]]:
        return self._with_state(self._rows(since_ms=now_ms - seconds * 1000), now_ms)

    def get(self, alert_id: str, now_ms: int) -> dict[str, Any] | None:
        found = self._with_state(self._rows(fingerprint=alert_id), now_ms)
        if not found:
            return None
        alert = found[0]
        transitions = self.store.transitions_of(alert_id)
        commands = self.store.commands_on(alert_id)
        alert["history"] = sorted(
            [{"action": f"{a}->{b}", "cause": cause, "actor": actor, "window_end_ms": end, "note": message,
              "at_ms": at} for a, b, cause, actor, end, message, at in transitions]
            + [{"action": action, "actor": actor, "note": comment, "at_ms": at}
               for action, actor, comment, at in commands], key=lambda h: h["at_ms"])
        return alert

    def act(self, alert_id: str, action: str, actor: str, note: str, silenced_until_ms: int,
            now_ms: int) -> dict[str, Any]:
        alert = self.get(alert_id, now_ms)
        if alert is None:
            raise UnknownAlert(alert_id)
        if action == "acknowledge":
            self.store.write_command(uuid.uuid4().hex, "ack", alert_id, actor, note, now_ms)
        elif action == "resolve":
            self.store.write_command(uuid.uuid4().hex, "resolve", alert_id, actor, note, now_ms)
        elif action == "silence":
            matchers = (("channel", alert["channel"]), ("rule", alert["rule"]), ("tenant", alert["tenant"]))
            self.store.write_silence(Silence(uuid.uuid4().hex[:12], matchers, now_ms, silenced_until_ms, actor, note),
                                     now_ms)
        else:
            raise ValueError(f"unknown action {action!r}; one of acknowledge, silence, resolve")
        found = self.get(alert_id, now_ms)
        assert found is not None
        return found

    def cases(self, now_ms: int, everything: bool = False) -> builtins.list[dict[str, Any]]:
        statuses = ("open", "escalated", "closed") if everything else ("open", "escalated")
        out = []
        for case in self.store.list_cases(statuses, 500):
            row = case.as_dict()
            row["sla_remaining_ms"] = case.sla_due_ms - now_ms if case.status != "closed" else 0
            out.append(row)
        return out

    def close(self) -> None:
        self.store.close()
