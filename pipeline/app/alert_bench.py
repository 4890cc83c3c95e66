"""`touchpoint bench --alerts`: the alerter judging 10,000 active series (50 tenants x 10 channels x 20 rules) per
window, and the time from a window's close (the checkpoint that closes it on the last partition is written) to each
of its notifications arriving at a webhook on loopback.

Cells are written as four workers would (ClickHouseSink.write_cells, then the checkpoints), into a database of its
own; every window, 10 % of the (tenant, channel, indicator) series flip between healthy and breaching, so about
1,000 transitions (grouped into notifications per rule and tenant) and as many Kafka records come out per window.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.settings import Settings

INDICATORS = ("error_rate", "csat", "task_success_rate", "fcr", "escalation_rate", "apdex", "sla_breach_rate",
              "repeat_contact_rate", "queue_abandonment", "funnel_abandonment")
CHANNELS = ("WEB", "MOBILE_APP", "CONTACT_CENTRE", "CHATBOT", "EMAIL", "SOCIAL", "HELPDESK", "SURVEY", "STORE",
            "BILLING")


@dataclass(frozen=True, slots=True)
class AlertBenchResult:
    series: int
    windows: int
    transitions_per_window: float
    notifications: int
    judge_ms_p50: float  # one cycle's judging of all series of a window (engine only)
    cycle_ms_p50: float  # a whole cycle: reads, judging, writes
    close_to_sent_ms_p50: float
    close_to_sent_ms_p99: float
    close_to_sent_ms_max: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rules() -> list[dict[str, Any]]:
    return [{"name": f"{indicator}_{level}", "indicator": indicator, "comparison": "above", "threshold": threshold,
             "min_count": 10} for indicator in INDICATORS for level, threshold in (("high", 0.5), ("very_high", 0.7))]


def run_alert_bench(settings: Settings, *, tenants: int = 50, windows: int = 6, flip_share: float = 0.1,
                    seed: int = 11) -> AlertBenchResult:
    from pipeline.adapters.clickhouse import ClickHouseSink, apply_migrations, drop_database
    from pipeline.app.alerter import Alerter
    from pipeline.core.aggregate import Checkpoint, WindowCell

    run = uuid.uuid4().hex[:8]
    bench = settings.model_copy(deep=True)
    bench.clickhouse.database = f"alertbench_{run}"
    bench.kafka.topic = f"alertbench-{run}"
    bench.kafka.consumer_group = f"alertbench-{run}"
    bench.kafka.partitions = 4
    bench.window.idle_close_s = 3600  # the checkpoints alone close windows
    bench.alerting.topic = f"alertbench-{run}.alerts"
    bench.alerting.rules = _rules()
    bench.alerting.cases.enabled = False
    received: list[tuple[float, dict[str, Any]]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                received.append((time.time(), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bench.alerting.receivers = [{"name": "hook", "kind": "webhook", "url": f"http://127.0.0.1:"
                                 f"{server.server_address[1]}/", "timeout_s": 5}]
    bench.alerting.routes = [{"receiver": "hook"}]
    apply_migrations(bench.clickhouse)
    sink = ClickHouseSink(bench.clickhouse, bench.kafka.consumer_group, bench.kafka.topic)
    alerter = Alerter(bench)
    rng = random.Random(seed)
    pane = bench.window.size_s * 1000
    now = int(time.time() * 1000)
    first_end = now - now % pane - (windows + 2) * pane
    keys = [(f"tenant-{t:02d}", c, i) for t in range(tenants) for c in CHANNELS for i in INDICATORS]
    bad = {k for k in keys if rng.random() < 0.5}
    closed_at: dict[int, float] = {}
    judge_ms: list[float] = []
    cycle_ms: list[float] = []
    transitions: list[int] = []
    stop = threading.Event()
    def cycles() -> None:
        while not stop.is_set():
            engine = alerter.engine  # replaced at takeover
            judge = type(engine).judge

            def timed_judge(*args: Any, _engine: Any = engine, _judge: Any = judge, **kwargs: Any) -> Any:
                started = time.perf_counter()
                out = _judge(_engine, *args, **kwargs)
                judge_ms.append((time.perf_counter() - started) * 1000)
                return out

            engine.judge = timed_judge  # type: ignore[method-assign]
            started = time.perf_counter()
            report = alerter.cycle()
            if report.windows:
                cycle_ms.append((time.perf_counter() - started) * 1000)
                transitions.append(report.events)
            stop.wait(bench.alerting.cycle_s)

    try:
        # The first window creates every series (half of them breaching): the warm-up, not measured.
        thread = threading.Thread(target=cycles, daemon=True)
        for w in range(windows + 1):
            end = first_end + w * pane
            if w:
                bad ^= {k for k in keys if rng.random() < flip_share}
            cells = [WindowCell("1m", end - pane, end, tenant, channel, "customer", "", "", indicator, p, 25.0,
                                25.0 * (0.9 if (tenant, channel, indicator) in bad else 0.1), ())
                     for tenant, channel, indicator in keys for p in range(4)]
            sink.write_cells(cells, int(time.time() * 1000))
            written = int(time.time() * 1000)
            sink.write_checkpoints([Checkpoint(p, w + 1, w + 1, end, end) for p in range(4)], written)
            closed_at[end] = time.time()
            if w == 0:
                alerter.progress = {}
                thread.start()
            deadline = time.time() + 120
            while time.time() < deadline and len(transitions) < w + 1:
                time.sleep(0.05)
            while time.time() < deadline and (alerter.dispatcher is None or alerter.dispatcher.backlog()):
                time.sleep(0.05)
            time.sleep(0.5)  # the sends in flight land before the next window closes
    finally:
        stop.set()
        time.sleep(0.5)
        alerter.close()
        server.shutdown()
        sink.client.disconnect()
        drop_database(bench.clickhouse)
    measured_ends = sorted(closed_at)[1:]
    latencies = []
    for at, body in received:
        for alert in body["alerts"]:
            end = int(time.mktime(time.strptime(alert["touchpoint"]["window_end"][:19], "%Y-%m-%dT%H:%M:%S"))
                      - time.timezone) * 1000
            if end in measured_ends and body["touchpoint"]["reason"] == "transition":
                latencies.append((at - closed_at[end]) * 1000)
                break
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    return AlertBenchResult(
        series=len(keys) * 2, windows=len(measured_ends),
        transitions_per_window=statistics.mean(transitions[1:]) if len(transitions) > 1 else 0.0,
        notifications=len(latencies), judge_ms_p50=statistics.median(judge_ms[1:]) if len(judge_ms) > 1 else 0.0,
        cycle_ms_p50=statistics.median(cycle_ms[1:]) if len(cycle_ms) > 1 else 0.0,
        close_to_sent_ms_p50=statistics.median(latencies) if latencies else float("nan"),
        close_to_sent_ms_p99=p99, close_to_sent_ms_max=latencies[-1] if latencies else float("nan"))


def print_alert_bench(settings: Settings, console: Any, as_json: bool) -> None:
    result = run_alert_bench(settings)
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    per_window = result.notifications / max(result.windows, 1)
    console.print(f"{result.series:,} active series, {result.windows} windows measured, "
                  f"{result.transitions_per_window:,.0f} transitions and {per_window:,.0f} webhook notifications "
                  "per window")
    console.print(f"judging one window: {result.judge_ms_p50:,.0f} ms (p50); whole cycle with reads and writes: "
                  f"{result.cycle_ms_p50:,.0f} ms (p50)")
    console.print(f"window close -> notification received: p50 {result.close_to_sent_ms_p50:,.0f} ms, "
                  f"p99 {result.close_to_sent_ms_p99:,.0f} ms, max {result.close_to_sent_ms_max:,.0f} ms")
