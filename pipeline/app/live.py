"""The terminal side of the product: paced publishing of generated traffic, the live view, and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from pipeline.settings import Settings


def publish_paced(settings: Settings, scenario: str, count: int, *, rate: float, seed: int = 0,
                  schema_version: int = 1, stop: threading.Event | None = None) -> int:
    """Publish generated events in real time: each is sent when the wall clock reaches its event time."""
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
    from pipeline.contract.registry import open_registry
    from pipeline.generate.scenarios import generate

    encoder = TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject, schema_version)
    publisher = TouchpointPublisher(settings.kafka.bootstrap_servers, settings.kafka.topic, encoder)
    sent = 0
    try:
        for event in generate(scenario, count, seed=seed, start_ms=int(time.time() * 1000), events_per_s=rate,
                              schema_version=schema_version):
            if stop is not None and stop.is_set():
                break
            wait_s = event["event_time"] / 1000 - time.time()
            if wait_s > 0.05:
                publisher.flush()
                time.sleep(wait_s)
            publisher.publish(event)
            sent += 1
    finally:
        publisher.close()
    return sent


STATE_STYLE = {"firing": "[red]firing[/]", "pending": "[yellow]pending[/]", "no_data": "[magenta]no_data[/]",
               "resolved": "[green]resolved[/]"}


def _percent(num: float | None, den: float | None) -> str:
    return "-" if not den or num is None else f"{num / den:.0%} [dim]({den:.0f})[/]"


def _pooled(cells: dict[tuple[str, str], dict[str, tuple[float, float]]], tenant: str, indicator: str) -> float | None:
    num = sum(v[indicator][0] for (t, _), v in cells.items() if t == tenant and indicator in v)
    den = sum(v[indicator][1] for (t, _), v in cells.items() if t == tenant and indicator in v)
    return num / den if den else None


def _threshold(settings: Settings, indicator: str, default: float) -> float:
    """The first threshold rule's threshold for the indicator, so the verdicts agree with the alerter's."""
    return next((float(rule["threshold"]) for rule in settings.alerting.rules
                 if rule.get("kind", "threshold") == "threshold" and rule.get("indicator") == indicator
                 and "threshold" in rule), default)


def snapshot(settings: Settings, minutes: int) -> Group:
    """One rendering of the live view from ClickHouse."""
    from pipeline.adapters.clickhouse_queries import ConsoleQueries

    queries = ConsoleQueries(settings.clickhouse)
    seconds = minutes * 60
    cells: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for tenant, channel, indicator, num, den in queries.live_indicators(seconds):
        cells.setdefault((tenant, channel), {})[indicator] = (num, den)
    volume, persons = queries.touchpoint_volume(seconds)
    table = Table(title=f"CX and UX indicators, closed 1-minute windows of the last {minutes} min "
                        f"({volume} touchpoints from {persons} persons)")
    for column in ("tenant", "channel", "CX: CSAT", "UX: task success", "UX: error rate"):
        table.add_column(column)
    for (tenant, channel), values in sorted(cells.items()):
        table.add_row(tenant, channel, _percent(*values.get("csat", (None, None))),
                      _percent(*values.get("task_success_rate", (None, None))),
                      _percent(*values.get("error_rate", (None, None))))
    verdicts = Table(title="Per tenant: UX (the product) against CX (the journey)")
    for column in ("tenant", "UX", "CX"):
        verdicts.add_column(column)
    for tenant in sorted({t for t, _ in cells}):
        ux = _pooled(cells, tenant, "error_rate")
        cx = _pooled(cells, tenant, "csat")
        ux_text = "-" if ux is None else f"{ux:.0%} of product interactions failed"
        cx_text = "-" if cx is None else f"CSAT {cx:.0%}"
        if ux is not None:
            ux_text = ("[red]bad[/] " if ux > _threshold(settings, "error_rate", 0.15) else "[green]good[/] ") + ux_text
        if cx is not None:
            cx_text = ("[red]bad[/] " if cx < _threshold(settings, "csat", 0.6) else "[green]good[/] ") + cx_text
        verdicts.add_row(tenant, ux_text, cx_text)
    alerts = Table(title="Alerts (states from `touchpoint alerter`)")
    for column in ("since (UTC)", "state", "severity", "rule", "tenant", "channel", "message"):
        alerts.add_column(column)
    for since_ms, state, severity, rule, tenant, channel, message in queries.live_alerts(seconds):
        since = datetime.fromtimestamp(since_ms / 1000, tz=UTC).strftime("%H:%M:%S")
        alerts.add_row(since, STATE_STYLE.get(state, state), severity or "", rule, tenant, channel, message or "")
    queries.close()
    stamp = datetime.now(UTC).strftime("%H:%M:%S UTC")
    note = f"[dim]{stamp} - indicators appear when a window closes (its end + lateness)[/]"
    return Group(table, verdicts, alerts, note)


def watch(settings: Settings, console: Console, *, refresh_s: float, minutes: int, once: bool) -> None:
    if once:
        console.print(snapshot(settings, minutes))
        return
    with Live(snapshot(settings, minutes), console=console, refresh_per_second=1) as live:
        while True:
            time.sleep(refresh_s)
            live.update(snapshot(settings, minutes))


def _start_console(settings: Settings) -> subprocess.Popen[bytes]:
    """The operations console beside the terminal view, with a fresh action token unless one is set."""
    import secrets

    token = settings.console.token or secrets.token_urlsafe(12)
    log_path = settings.stack.state_dir / "demo-console.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "console"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TOUCHPOINT_CONSOLE__TOKEN": token})
    print(f"operations console: http://{settings.console.host}:{settings.console.port}/ "
          f"(action token {token}; logs: {log_path})", flush=True)
    return process


def _start_alerter(settings: Settings) -> subprocess.Popen[bytes]:
    """The alert engine beside the worker: it judges the windows the worker closes (one active per cluster)."""
    log_path = settings.stack.state_dir / "demo-alerter.log"
    # The worker closes idle windows after 5 s: the alerter counts a partition idle as soon.
    env = {**os.environ, "TOUCHPOINT_WINDOW__IDLE_CLOSE_S": "5"}
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "alerter"], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    print(f"alerter started (logs: {log_path})", flush=True)
    return process


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_demo(settings: Settings, console: Console, *, duration_s: float, rate: float) -> None:
    """Stack up, init, a worker and an alerter, generated traffic of every scenario, and the live view until done."""
    from pipeline.app.bootstrap import initialise
    from pipeline.stack import local

    console.print("[bold]1/4[/] starting the local stack (Tansu broker, ClickHouse server)")
    local.up(settings)
    console.print("[bold]2/4[/] creating topics, registering schemas, applying migrations")
    initialise(settings)
    console.print("[bold]3/4[/] starting a worker and an alerter (logs: .touchpoint/demo-worker.log, demo-alerter.log)")
    log_path = settings.stack.state_dir / "demo-worker.log"
    # A short idle close lets the last windows close soon after the traffic stops.
    env = {**os.environ, "TOUCHPOINT_WINDOW__IDLE_CLOSE_S": "5", "TOUCHPOINT_METRICS_PORT": "9108"}
    with log_path.open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "worker"], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
    alerter = _start_alerter(settings)
    operations_console = _start_console(settings)
    console.print(f"[bold]4/4[/] publishing {duration_s:.0f} s of traffic at {rate:g}/s: banking app with "
                  "intermittent failures, hospital booking then a bad visit, and ordinary traffic; "
                  "metrics at http://127.0.0.1:9108/metrics")
    stop = threading.Event()
    shares = {"banking_app": 0.3, "hospital_booking": 0.3, "mixed": 0.4}
    threads = [threading.Thread(target=publish_paced, daemon=True,
                                args=(settings, name, int(rate * share * duration_s)),
                                kwargs={"rate": rate * share, "seed": n, "stop": stop})
               for n, (name, share) in enumerate(shares.items())]
    for thread in threads:
        thread.start()
    # Until traffic stops, plus one window, the lateness and the idle close, so the last minute closes too.
    deadline = time.time() + duration_s + settings.window.size_s + settings.window.allowed_lateness_s + 10
    # A closed terminal (SIGHUP) or a kill must stop the worker and the alerter too: end through the `finally` below.
    for stop_signal in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(stop_signal, _exit_on_signal)
    try:
        with Live(snapshot(settings, 10), console=console, refresh_per_second=1) as live:
            while time.time() < deadline:
                time.sleep(2)
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {worker.returncode}; see {log_path}")
                if alerter.poll() is not None:
                    raise RuntimeError(f"the alerter exited with code {alerter.returncode}; see "
                                       f"{settings.stack.state_dir / 'demo-alerter.log'}")
                live.update(snapshot(settings, 10))
    finally:
        stop.set()
        for process in (worker, alerter, operations_console):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    console.print("\ndone; the stack stays up (`touchpoint stack down` stops it), `touchpoint console` serves the "
                  "operations console again. Query ClickHouse for more, "
                  "e.g. clickhouse-client --port "
                  f"{settings.clickhouse.port} -d {settings.clickhouse.database} "
                  "-q 'SELECT * FROM alert_current FINAL'")
