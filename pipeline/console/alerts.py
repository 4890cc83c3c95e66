"""Alerts as the console shows and acts on them, behind one small interface (AlertStore). The alerter's lifecycle
tables back it (pipeline/app/alert_admin.py LifecycleAlertStore): states pending, firing, resolved and no_data from
`alert_current`, transitions from `alert_events`; acknowledging and resolving write `alert_commands`, silencing
writes `silences`, and the alerter applies them; follow-up cases come from `cases`."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

ACTIONS = ("acknowledge", "silence", "resolve")


class UnknownAlert(LookupError):
    pass


class AlertStore(Protocol):
    def list(self, seconds: int, now_ms: int) -> list[dict[str, Any]]: ...

    def get(self, alert_id: str, now_ms: int) -> dict[str, Any] | None: ...

    def act(self, alert_id: str, action: str, actor: str, note: str, silenced_until_ms: int,
            now_ms: int) -> dict[str, Any]: ...

    def cases(self, now_ms: int, everything: bool = False) -> builtins.list[dict[str, Any]]:
        """Follow-up cases (open and escalated, or all), each with `sla_remaining_ms` (negative: overdue)."""


def console_state(lifecycle_state: str, acked_by: str, silenced: bool) -> str:
    """What the console shows: the alerter's state, except that a silence mutes an active series (silenced) and an
    acknowledged firing alert shows as acknowledged."""
    if silenced and lifecycle_state in ("firing", "pending", "no_data"):
        return "silenced"
    if lifecycle_state == "firing" and acked_by:
        return "acknowledged"
    return lifecycle_state
