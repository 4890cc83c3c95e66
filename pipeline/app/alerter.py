"""`touchpoint alerter`: the one alert engine of the cluster.

Each cycle the active alerter (the holder of the lease row in ClickHouse) reads the checkpoints of every partition,
judges every window all of them have closed (an idle partition counts as closed, and the alert says so) with the
pure core, opens and escalates follow-up cases, plans notifications, and writes, in this order: the planned
notifications ('pending' in the delivery log), the transitions (alert_events), the cases, then the series states
with the progress in one insert. A standby that takes over restores the states and progress and judges the next
windows; a transition its predecessor already wrote has the same id and is not written, produced or sent again;
a planned notification not yet logged as sent is sent again (at least once). Deliveries (webhooks, the log, the
Kafka topic) run on one thread per receiver with retries and backoff, so a receiver that is down delays only itself.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.adapters.alert_store import AlertStore, DeliveryRow, PartitionProgress
from pipeline.core.alerting import (
    AlertEngine,
    AlertEvent,
    Completeness,
    State,
    parse_rules,
    seasonal_hours,
)
from pipeline.core.cases import CaseBook, CaseChange, CaseConfig, case_labels
from pipeline.core.evaluate import WindowTotal
from pipeline.core.indicators import BY_ID
from pipeline.core.notify import (
    Notification,
    Planner,
    Receiver,
    Silence,
    backoff_s,
    group_key,
    iso,
    parse_receivers,
    parse_routes,
    payload,
    routes_for,
)
from pipeline.settings import SCHEMAS_DIR, Settings

log = logging.getLogger("touchpoint.alerter")
alert_log = logging.getLogger("touchpoint.alerts")
KAFKA_RECEIVER = "kafka"
Send = Callable[[Notification], tuple[bool, int, str]]  # -> (delivered, http status, error)
SendMany = Callable[[list[Notification]], list[tuple[bool, int, str]]]  # a receiver that batches (Kafka)
BATCH = 500


# ------------------------------------------------------------------------------------------------ delivery


@dataclass(order=True)
class _Attempt:
    due_ms: int
    seq: int
    notification: Notification = field(compare=False)
    attempt: int = field(compare=False, default=0)
    first_ms: int = field(compare=False, default=0)


class Dispatcher:
    """Per receiver, `concurrency` threads over its own retry queue; outcomes are logged in batches by a flusher
    thread (every 0.1 s), so a crash repeats at most the sends of that last moment."""

    def __init__(self, senders: Mapping[str, Send], retry_initial_s: float, retry_max_s: float,
                 give_up_after_s: float, clock: Callable[[], float] = time.time,
                 record: Callable[[list[DeliveryRow]], None] | None = None, concurrency: int = 4,
                 batch_senders: Mapping[str, SendMany] | None = None) -> None:
        self.senders: dict[str, Send | None] = {**dict(senders), **dict.fromkeys(batch_senders or {})}
        self.batch_senders = dict(batch_senders or {})
        self.record = record
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self.give_up_ms = int(give_up_after_s * 1000)
        self.clock = clock
        self._queues: dict[str, list[_Attempt]] = {name: [] for name in self.senders}
        self._wake = {name: threading.Condition() for name in self.senders}
        self._log: list[DeliveryRow] = []
        self._log_lock = threading.Lock()
        self._stop = threading.Event()
        self._seq = 0
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True, name=f"deliver-{name}-{n}")
                         for name in self.senders
                         for n in range(1 if name in self.batch_senders else max(1, concurrency))]
        if record is not None:
            self._threads.append(threading.Thread(target=self._flush_loop, daemon=True, name="delivery-log"))
        for thread in self._threads:
            thread.start()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def submit(self, notification: Notification, attempts_done: int = 0, first_ms: int | None = None) -> None:
        name = notification.receiver
        if name not in self.senders:
            self._record(DeliveryRow(notification, "abandoned", attempts_done, self._now_ms(),
                                     error=f"no receiver named {name!r}"))
            return
        with self._wake[name]:
            self._seq += 1
            heapq.heappush(self._queues[name], _Attempt(self._now_ms(), self._seq, notification, attempts_done,
                                                        self._now_ms() if first_ms is None else first_ms))
            self._wake[name].notify()

    def backlog(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _record(self, row: DeliveryRow) -> None:
        with self._log_lock:
            self._log.append(row)

    def take_log(self) -> list[DeliveryRow]:
        with self._log_lock:
            rows, self._log = self._log, []
        return rows

    def _flush_loop(self) -> None:
        assert self.record is not None
        while not self._stop.wait(0.1):
            self.flush()

    def flush(self) -> None:
        rows = self.take_log()
        if rows and self.record is not None:
            try:
                self.record(rows)
            except Exception:  # ClickHouse away for a moment: keep the rows for the next flush
                log.exception("could not write the delivery log; retrying")
                with self._log_lock:
                    self._log[:0] = rows

    def _run(self, name: str) -> None:
        queue, wake = self._queues[name], self._wake[name]
        single, many = self.senders[name], self.batch_senders.get(name)
        while not self._stop.is_set():
            with wake:
                while not self._stop.is_set() and (not queue or queue[0].due_ms > self._now_ms()):
                    wake.wait(timeout=0.05 if not queue else min(0.5, (queue[0].due_ms - self._now_ms()) / 1000))
                if self._stop.is_set():
                    return
                items = [heapq.heappop(queue)]
                while many is not None and queue and len(items) < BATCH and queue[0].due_ms <= self._now_ms():
                    items.append(heapq.heappop(queue))
            notifications = [item.notification for item in items]
            try:
                if many is not None:
                    outcomes = many(notifications)
                else:
                    assert single is not None
                    outcomes = [single(notifications[0])]
            except Exception as exc:  # a receiver's failure is logged and retried, never raised into the engine
                outcomes = [(False, 0, f"{type(exc).__name__}: {exc}")] * len(items)
            for item, (delivered, status, error) in zip(items, outcomes, strict=True):
                self._settle(name, item, delivered, status, error)

    def _settle(self, name: str, item: _Attempt, delivered: bool, status: int, error: str) -> None:
        attempt = item.attempt + 1
        now = self._now_ms()
        if delivered:
            self._record(DeliveryRow(item.notification, "sent", attempt, now, status))
            return
        if now - item.first_ms >= self.give_up_ms:
            self._record(DeliveryRow(item.notification, "abandoned", attempt, now, status, error))
            return
        self._record(DeliveryRow(item.notification, "failed", attempt, now, status, error))
        item.due_ms = now + int(backoff_s(attempt, self.retry_initial_s, self.retry_max_s) * 1000)
        item.attempt = attempt
        with self._wake[name]:
            heapq.heappush(self._queues[name], item)

    def stop(self) -> None:
        self._stop.set()
        for name in self.senders:
            with self._wake[name]:
                self._wake[name].notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self.flush()


def webhook_sender(receiver: Receiver) -> Send:
    """POST the JSON payload; one kept-alive connection per sending thread."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(receiver.url)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    local = threading.local()

    def connection() -> http.client.HTTPConnection:
        if getattr(local, "conn", None) is None:
            kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            local.conn = kind(url.hostname or "", url.port, timeout=receiver.timeout_s)
        conn: http.client.HTTPConnection = local.conn
        return conn

    def send(notification: Notification) -> tuple[bool, int, str]:
        body = json.dumps(notification.payload).encode()
        for retry in (False, True):  # a kept-alive connection the server closed is reopened once
            conn = connection()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close" or response.version == 10:
                    conn.close()
                    local.conn = None
                ok = 200 <= response.status < 300
                return ok, response.status, "" if ok else f"HTTP {response.status}"
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                local.conn = None
                if retry or isinstance(exc, TimeoutError):
                    return False, 0, str(exc) or type(exc).__name__
        return False, 0, "unreachable"
    return send


def log_sender(notification: Notification) -> tuple[bool, int, str]:
    alert_log.warning("%s", json.dumps(notification.payload, sort_keys=True))
    return True, 0, ""


class TransitionProducer:
    """Transitions to Kafka, Avro in the Confluent wire format, keyed by fingerprint."""

    def __init__(self, settings: Settings) -> None:
        import fastavro
        from kafka import KafkaProducer

        from pipeline.adapters.kafka import ensure_topics
        from pipeline.contract.registry import load_schema_file, open_registry
        from pipeline.contract.wire import frame

        alerting = settings.alerting
        ensure_topics(settings.kafka.bootstrap_servers, {alerting.topic: 1}, settings.kafka.replication_factor)
        schema = load_schema_file(SCHEMAS_DIR / "alert_transition.v1.avsc")
        self.schema_id = open_registry(settings.registry.url).register(alerting.subject, schema)
        self.parsed = fastavro.parse_schema(schema)
        self.topic = alerting.topic
        self._frame = frame
        self._writer = fastavro.schemaless_writer
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                                      linger_ms=5, retries=5)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buffer = io.BytesIO()
        self._writer(buffer, self.parsed, dict(record))
        return bytes(self._frame(self.schema_id, buffer.getvalue()))

    def send_many(self, notifications: list[Notification]) -> list[tuple[bool, int, str]]:
        futures = [self.producer.send(self.topic, key=n.payload["fingerprint"].encode(), value=self.encode(n.payload))
                   for n in notifications]
        self.producer.flush(timeout=15)
        outcomes = []
        for future in futures:
            try:
                future.get(timeout=0)
                outcomes.append((True, 0, ""))
            except Exception as exc:
                outcomes.append((False, 0, f"{type(exc).__name__}: {exc}"))
        return outcomes

    def close(self) -> None:
        self.producer.close(timeout=5)


def transition_record(event: AlertEvent) -> dict[str, Any]:
    """The Avro record (schemas/alert_transition.v1.avsc) of a transition; JSON-safe, so it is logged as is."""
    return {
        "event_id": event.event_id, "fingerprint": event.fingerprint, "rule": event.rule,
        "rule_kind": event.rule_kind, "severity": event.severity, "family": event.family, "tenant": event.tenant,
        "channel": event.channel, "labels": event.label_map(), "from_state": event.from_state,
        "to_state": event.to_state, "cause": event.cause, "actor": event.actor, "window_kind": event.window_kind,
        "window_start": event.window_start_ms, "window_end": event.window_end_ms, "value": event.value,
        "threshold": event.threshold, "values": {k: float(v) for k, v in event.values}, "message": event.message,
        "partitions": event.completeness.partitions,
        "closed_by_watermark": list(event.completeness.closed_by_watermark),
        "closed_by_idle": list(event.completeness.closed_by_idle),
        "channels_reporting": list(event.completeness.channels_reporting),
        "channels_expected": list(event.completeness.channels_expected), "at": event.at_ms,
    }


# ------------------------------------------------------------------------------------------------ the engine


@dataclass
class CycleReport:
    active: bool
    windows: int = 0
    events: int = 0
    notifications: int = 0
    cases: int = 0
    horizon_ms: int = 0
    took_over: bool = False


def closed_horizon(progress: Sequence[PartitionProgress], partitions: Sequence[int], now_ms: int, idle_ms: int,
                   pane_ms: int) -> tuple[int, dict[int, int], set[int]]:
    """(horizon, closed_before per partition, idle partitions): windows ending at or before the horizon are
    closed on every partition that is not idle. When every partition is idle, wall-clock time closes windows, so
    silence itself is judged (and raises no_data)."""
    closed = {p.partition: p.closed_before_ms for p in progress}
    written = {p.partition: p.written_at_ms for p in progress}
    idle = {p for p in partitions if now_ms - written.get(p, 0) > idle_ms}
    active = [closed.get(p, 0) for p in partitions if p not in idle]
    if active:
        horizon = min(active)
    else:
        horizon = max([*closed.values(), now_ms - idle_ms])
    return horizon - horizon % pane_ms, closed, idle


class Alerter:
    def __init__(self, settings: Settings, *, holder: str | None = None, senders: Mapping[str, Send] | None = None,
                 clock: Callable[[], float] = time.time, produce: bool = True) -> None:
        self.settings = settings
        alerting = settings.alerting
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.store = AlertStore(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
        self.rules = parse_rules(alerting.rules)
        self.receivers = parse_receivers(alerting.receivers)
        self.routes = parse_routes(alerting.routes, self.receivers)
        self.pane_ms = settings.window.size_s * 1000
        self.lengths = {"1m": self.pane_ms, "session": self.pane_ms, "15m": settings.window.hopping_size_s * 1000}
        self.idle_ms = int((settings.window.idle_close_s + settings.batch.max_wait_s) * 1000)
        self.ttl_ms = int(alerting.lease_ttl_s * 1000)
        self.case_config = CaseConfig(sla_ms=int(alerting.cases.sla_hours * 3_600_000),
                                      queues=tuple(sorted(alerting.cases.queues.items())),
                                      reasons=tuple(alerting.cases.reasons))
        self._senders = dict(senders) if senders is not None else None
        self.produce = produce
        self.producer: TransitionProducer | None = None
        self._log_store: AlertStore | None = None
        self.epoch: int | None = None
        self.dispatcher: Dispatcher | None = None
        self._reset()

    def _reset(self) -> None:
        self.engine = AlertEngine(self.rules, self.lengths)
        self.planner = Planner(self.routes, {})
        self.casebook = CaseBook(self.case_config)
        self.progress: dict[str, Any] = {}
        self.version = 0
        self.last_events: dict[str, AlertEvent] = {}
        self.applied_commands: set[str] = set()
        self.planned: set[tuple[str, str]] = set()  # (notification id, receiver) already in the delivery log
        self._written: dict[str, str] = {}  # fingerprint -> JSON of the state last written
        self._history: dict[int, list[WindowTotal]] = {}
        self._closed: list[CaseChange] = []  # cases closed by operators, written with the cycle's changes

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -------------------------------------------------------------------------------------------- the lease

    def hold_lease(self) -> bool:
        """Renew the lease when held; claim the next epoch when its holder stopped renewing. True when active."""
        view = self.store.lease()
        now = self.now_ms()
        if self.epoch is not None:
            if view is not None and view.epoch == self.epoch and view.holder == self.holder:
                self.store.claim(self.epoch, self.holder, now, view.claimed_at_ms)
                return True
            log.warning("lease of epoch %s lost to %s", self.epoch, view.holder if view else "nobody")
            self.step_down()
            return False
        if view is not None and view.holder != self.holder and now - view.renewed_at_ms <= self.ttl_ms:
            return False
        epoch = (view.epoch if view else 0) + 1
        self.store.claim(epoch, self.holder, now)
        time.sleep(min(1.0, self.ttl_ms / 5000))  # lets a concurrent claim of the same epoch land; earliest wins
        view = self.store.lease()
        if view is None or view.epoch != epoch or view.holder != self.holder:
            return False
        self.epoch = epoch
        self.take_over()
        return True

    def step_down(self) -> None:
        self.epoch = None
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher = None
        self._reset()

    def still_holding(self) -> bool:
        view = self.store.lease()
        return view is not None and view.epoch == self.epoch and view.holder == self.holder

    def _make_senders(self) -> tuple[dict[str, Send], dict[str, SendMany]]:
        if self._senders is not None:
            return dict(self._senders), {}
        senders: dict[str, Send] = {}
        for receiver in self.receivers.values():
            senders[receiver.name] = webhook_sender(receiver) if receiver.kind == "webhook" else log_sender
        if not self.produce:
            return senders, {}
        if self.producer is None:
            self.producer = TransitionProducer(self.settings)
        return senders, {KAFKA_RECEIVER: self.producer.send_many}

    def take_over(self) -> None:
        """Restore the lifecycle states, progress, cases and unfinished deliveries from ClickHouse."""
        self._reset()
        series, progress = self.store.load_states()
        self.engine.restore(series)
        self._written = {s.fingerprint: json.dumps(s.as_dict()) for s in series}
        self.progress = progress
        self.version = int(progress.get("version", 0))
        cases_until = int(progress.get("cases_until_ms", 0))
        self.casebook.restore(self.store.open_cases(cases_until - self.settings.alerting.case_lookback_s * 1000))
        firing = [s.fingerprint for s in series if s.state in (State.FIRING, State.NO_DATA)]
        self.last_events = {e.fingerprint: e for e in self.store.latest_events(firing)}
        senders, batch_senders = self._make_senders()
        self.dispatcher = Dispatcher(senders, self.settings.alerting.retry_initial_s,
                                     self.settings.alerting.retry_max_s, self.settings.alerting.give_up_after_s,
                                     self.clock, self._log_deliveries, self.settings.alerting.delivery_concurrency,
                                     batch_senders)
        now = self.now_ms()
        resent = 0
        since = now - int(self.settings.alerting.give_up_after_s * 1000)
        for key, (status, attempts, first, notification) in self.store.notification_status(since).items():
            self.planned.add(key)
            if notification.reason in ("transition", "repeat"):
                self.planner.last_sent_ms[notification.group_key] = max(
                    self.planner.last_sent_ms.get(notification.group_key, 0), first)
            if status in ("pending", "failed") and notification.payload:
                self.dispatcher.submit(notification, attempts, first)
                resent += 1
        log.warning("alerter %s active (epoch %s): %d series, %d open cases, %d deliveries resumed", self.holder,
                    self.epoch, len(series), len(self.casebook.open), resent)

    # -------------------------------------------------------------------------------------------- a cycle

    def cycle(self) -> CycleReport:
        started_active = self.epoch is not None
        if not self.hold_lease():
            return CycleReport(active=False)
        report = CycleReport(active=True, took_over=not started_active)
        now = self.now_ms()
        checkpoints = self.store.checkpoints()
        partitions = sorted(set(range(self.settings.kafka.partitions)) | {p.partition for p in checkpoints})
        horizon, closed, _idle = closed_horizon(checkpoints, partitions, now, self.idle_ms, self.pane_ms)
        report.horizon_ms = horizon
        judged = int(self.progress.get("judged_until_ms", 0))
        if not judged:
            judged = max(0, horizon - self.settings.alerting.start_lookback_s * 1000)
            judged -= judged % self.pane_ms
        ends = list(range(judged + self.pane_ms, horizon + 1, self.pane_ms))
        ends = ends[:self.settings.alerting.max_windows_per_cycle]
        events: list[AlertEvent] = []
        if ends:
            totals_by_end = self._totals(ends, partitions)
            for end in ends:
                completeness = Completeness(len(partitions),
                                            tuple(p for p in partitions if closed.get(p, 0) >= end),
                                            tuple(p for p in partitions if closed.get(p, 0) < end))
                events += self.engine.judge(end, totals_by_end.get(end, []), now, completeness,
                                            self._baselines(end))
            judged = ends[-1]
            report.windows = len(ends)
        events += self._apply_commands(now)
        case_changes = self._cases(horizon, now)
        for event in events:
            self.last_events[event.fingerprint] = event
        # Transitions a predecessor already wrote (it died before saving the states) were planned by it too.
        earliest = min((e.window_end_ms for e in events), default=0)
        known = self.store.existing_event_ids({e.event_id for e in events}, earliest)
        new_events = [e for e in events if e.event_id not in known]
        silences = self.store.silences(now)
        notes = self.planner.transitions(new_events, silences, now)
        notes += self.planner.follow_ups(self.engine.series.values(), self.last_events, silences, now)
        notes += self._case_notifications(case_changes, silences, now)
        if self.dispatcher is not None and KAFKA_RECEIVER in self.dispatcher.senders:
            notes += [Notification(e.event_id, KAFKA_RECEIVER, e.fingerprint, "transition", transition_record(e),
                                   "", (e.event_id,)) for e in new_events]
        if not self.still_holding():  # fencing: a deposed alerter writes nothing
            log.warning("lease lost during the cycle; its results are dropped")
            self.step_down()
            return CycleReport(active=False)
        fresh = [n for n in notes if (n.notification_id, n.receiver) not in self.planned]
        self.store.write_deliveries([DeliveryRow(n, "silenced" if n.silenced_by else "pending", 0, now,
                                                 error=f"silence {n.silenced_by}" if n.silenced_by else "")
                                     for n in fresh], self.epoch or 0)
        # The pending rows are the outbox: from here a successor finds and sends what this one could not.
        assert self.dispatcher is not None
        for n in fresh:
            self.planned.add((n.notification_id, n.receiver))
            if not n.silenced_by:
                self.dispatcher.submit(n, 0, now)
        self.store.write_events(new_events, self.epoch or 0)
        self.store.write_cases(case_changes, now)
        self.progress.update(judged_until_ms=judged, cases_until_ms=max(int(self.progress.get("cases_until_ms", 0)),
                                                                        horizon))
        self.version += 1
        self.progress["version"] = self.version
        changed = []
        for s in self.engine.series.values():
            text = json.dumps(s.as_dict())
            if self._written.get(s.fingerprint) != text:
                changed.append(s)
                self._written[s.fingerprint] = text
        self.store.write_states(changed, self.progress, self.version, self.epoch or 0)
        report.events, report.notifications, report.cases = len(events), len(fresh), len(case_changes)
        return report

    def _log_deliveries(self, rows: list[DeliveryRow]) -> None:
        if self._log_store is None:  # a connection of its own: logging never waits for the cycle's queries
            self._log_store = AlertStore(self.settings.clickhouse, self.settings.kafka.consumer_group,
                                         self.settings.kafka.topic)
        self._log_store.write_deliveries(rows, self.epoch or 0)

    def flush_deliveries(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.flush()

    def _totals(self, ends: Sequence[int], partitions: Sequence[int]) -> dict[int, list[WindowTotal]]:
        """One query per window kind for every window ending in the judged range."""
        by_end: dict[int, list[WindowTotal]] = {}
        for kind, indicators in sorted(self.engine.indicators().items()):
            wanted = set(BY_ID) if "*" in indicators else indicators
            for total in self.store.window_totals(ends[0] - self.pane_ms, ends[-1], partitions, wanted, kind):
                by_end.setdefault(total.window_end_ms, []).append(total)
        return by_end

    def _baselines(self, end_ms: int) -> dict[tuple[str, str, str], list[float]]:
        seasonal = [r for r in self.rules if r.kind == "seasonal"]
        if not seasonal:
            return {}
        weeks = max(r.weeks for r in seasonal)
        hours = seasonal_hours(end_ms - self.pane_ms, weeks)
        missing = [h for h in hours if h not in self._history]
        if missing:
            fetched = self.store.hourly_history(missing, {r.indicator for r in seasonal})
            for h in missing:
                self._history[h] = [t for t in fetched if t.window_start_ms == h]
            while len(self._history) > 4 * weeks:
                del self._history[min(self._history)]
        out: dict[tuple[str, str, str], list[float]] = {}
        for h in hours:
            for t in self._history.get(h, []):
                value = t.value
                if value is not None:
                    out.setdefault((t.tenant, t.channel, t.indicator), []).append(value)
        return out

    def _apply_commands(self, now: int) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        since = int(self.progress.get("commands_until_ms", now - 3_600_000)) - 60_000
        latest = since
        for command_id, action, target, actor, at_ms in self.store.commands(since):
            latest = max(latest, at_ms)
            if command_id in self.applied_commands:
                continue
            self.applied_commands.add(command_id)
            if action == "ack":
                self.engine.acknowledge(target, actor, now)
            elif action == "resolve":
                event = self.engine.resolve_by_hand(target, actor, now)
                if event is not None:
                    events.append(event)
            elif action == "close_case":
                change = self.casebook.close(target, actor, now)
                if change is not None:
                    self._closed.append(change)
        self.progress["commands_until_ms"] = latest
        return events

    def _cases(self, horizon: int, now: int) -> list[CaseChange]:
        changes, self._closed = list(self._closed), []
        if not self.settings.alerting.cases.enabled:
            return changes
        since = int(self.progress.get("cases_until_ms", 0)) or horizon - self.settings.alerting.case_lookback_s * 1000
        changes += self.casebook.observe(self.store.detractor_facts(since, horizon), now)
        changes += self.casebook.tick(now)
        return changes

    def _case_notifications(self, changes: Sequence[CaseChange], silences: Sequence[Silence],
                            now: int) -> list[Notification]:
        out = []
        for change in changes:
            if change.action != "escalated":
                continue
            case = change.case
            labels = dict(case_labels(case))
            muted = next((s.silence_id for s in silences if s.mutes(labels, now)), "")
            for route in routes_for(labels, self.routes):
                key = group_key(route, labels)
                nid = f"case-{case.case_id}-{case.escalation_level}-{route.receiver}"
                alert = {"status": "firing", "labels": {**labels, "case_id": case.case_id},
                         "annotations": {"summary": f"follow-up case {case.case_id} ({case.reason}) for person "
                                                    f"{case.person_id} in queue {case.queue}: {change.detail}"},
                         "startsAt": iso(case.opened_at_ms), "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
                         "fingerprint": case.case_id,
                         "touchpoint": {"case": case.as_dict()}}
                out.append(Notification(nid, route.receiver, key, "case",
                                        payload(route.receiver, key, {"queue": case.queue}, [alert], "case", nid),
                                        muted, ()))
        return out

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.producer is not None:
            self.producer.close()
        if self._log_store is not None:
            self._log_store.close()
        self.store.close()


def run_alerter(settings: Settings, *, holder: str | None = None) -> None:
    """Run cycles until SIGTERM/SIGINT; a standby keeps checking the lease every cycle."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from clickhouse_driver.errors import ServerException

    alerter = Alerter(settings, holder=holder)
    try:
        alerter.store.lease()
    except ServerException as exc:
        alerter.store.close()
        if exc.code in (60, 81):  # unknown table / database
            raise SystemExit(f"ClickHouse database {settings.clickhouse.database} has no alerting tables: run "
                             "`touchpoint init` first") from None
        raise
    log.warning("alerter %s started (standby until it holds the lease)", alerter.holder)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                report = alerter.cycle()
                if report.events or report.cases:
                    log.info("cycle: %d windows, %d transitions, %d notifications, %d case changes",
                             report.windows, report.events, report.notifications, report.cases)
            except Exception:  # ClickHouse away for a moment: step down, the lease decides who goes on
                log.exception("cycle failed; stepping down until the next cycle")
                alerter.step_down()
            stop.wait(max(0.0, settings.alerting.cycle_s - (time.monotonic() - started)))
    finally:
        alerter.close()
