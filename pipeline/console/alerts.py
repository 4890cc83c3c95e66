"""Alerts as the console shows and acts on them, behind one small interface (AlertStore), so the alert
lifecycle engine can replace today's store (the `alerts` table plus operators' actions in `alert_actions`)."""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.adapters.clickhouse_queries import ConsoleQueries

ACTIONS = ("acknowledge", "silence", "resolve")


class UnknownAlert(LookupError):
    pass


class AlertStore(Protocol):
    def list(self, seconds: int, now_ms: int) -> list[dict[str, Any]]: ...

    def get(self, alert_id: str, now_ms: int) -> dict[str, Any] | None: ...

    def act(self, alert_id: str, action: str, actor: str, note: str, silenced_until_ms: int,
            now_ms: int) -> dict[str, Any]: ...


def alert_state(alert: dict[str, Any], last_action: dict[str, Any] | None, now_ms: int, firing_for_ms: int) -> str:
    """firing while its window ended within `firing_for_ms`, else ended; an operator's newest action overrides:
    resolved, silenced (until its time), acknowledged (while it would fire)."""
    recent = alert["window_end_ms"] >= now_ms - firing_for_ms
    if last_action is not None:
        action = last_action["action"]
        if action == "resolve":
            return "resolved"
        if action == "silence" and last_action["silenced_until_ms"] > now_ms:
            return "silenced"
        if action == "acknowledge":
            return "acknowledged" if recent else "ended"
    return "firing" if recent else "ended"


class ClickHouseAlertStore:
    """Today's store: alerts from `alerts FINAL`, actions appended to `alert_actions`."""

    def __init__(self, queries: ConsoleQueries, firing_for_ms: int) -> None:
        self.queries = queries
        self.firing_for_ms = firing_for_ms

    def _with_state(self, alerts: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
        actions = self.queries.latest_alert_actions([a["alert_id"] for a in alerts])
        for alert in alerts:
            last = actions.get(alert["alert_id"])
            alert["last_action"] = last
            alert["state"] = alert_state(alert, last, now_ms, self.firing_for_ms)
        return alerts

    def list(self, seconds: int, now_ms: int) -> list[dict[str, Any]]:
        return self._with_state(self.queries.alerts(seconds), now_ms)

    def get(self, alert_id: str, now_ms: int) -> dict[str, Any] | None:
        alert = self.queries.alert(alert_id)
        if alert is None:
            return None
        alert = self._with_state([alert], now_ms)[0]
        alert["history"] = self.queries.alert_history(alert_id)
        return alert

    def act(self, alert_id: str, action: str, actor: str, note: str, silenced_until_ms: int,
            now_ms: int) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        alert = self.queries.alert(alert_id)
        if alert is None:
            raise UnknownAlert(alert_id)
        self.queries.record_alert_action(alert, action, actor, note, silenced_until_ms, now_ms)
        found = self.get(alert_id, now_ms)
        assert found is not None
        return found
