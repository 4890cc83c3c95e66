"""What operators do to alerts and cases (`touchpoint alerts ...`, `touchpoint cases ...`): list them, and record
acknowledgements, manual resolutions, silences and case closures. Commands are rows in ClickHouse that the active
alerter applies in its next cycle, so the engine stays the only writer of alert states."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pipeline.adapters.alert_store import AlertStore
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
