"""The collector on the real stack: touchpoints sent by curl, by the browser snippet in headless Chromium and by
the two webhook mappings arrive in ClickHouse exactly once; a broker that freezes or dies mid-load gets 503s and
nothing unacknowledged is ever reported accepted."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.collector.keys import key_digest
from pipeline.collector.runner import CollectorProcess, free_port
from pipeline.generate.scenarios import generate
from pipeline.settings import Settings, TenantSettings, WriteKeySettings
from tests.integration.conftest import read_topic, wait_until

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
BANK_KEY = "tpk_it_bank_" + uuid.uuid4().hex
HOSPITAL_KEY = "tpk_it_hospital_" + uuid.uuid4().hex


def _with_collector(settings: Settings, cors_origins: list[str] | None = None, **collector: Any) -> Settings:
    out = settings.model_copy(deep=True)
    out.collector.port = free_port()
    out.collector.tenants = [
        TenantSettings(name="bank", keys=[WriteKeySettings(id="it", sha256=key_digest(BANK_KEY))]),
        TenantSettings(name="hospital", cors_origins=cors_origins or [],
                       keys=[WriteKeySettings(id="it", sha256=key_digest(HOSPITAL_KEY))]),
    ]
    for name, value in collector.items():
        setattr(out.collector, name, value)
    return out


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[[Settings], CollectorProcess]]:
    started: list[CollectorProcess] = []

    def start(settings: Settings, broker: bool = True) -> CollectorProcess:
        process = CollectorProcess(settings, tmp_path / f"collector-{len(started)}.log")
        started.append(process)
        process.wait_ready(60, broker=broker)
        return process

    yield start
    for process in started:
        process.stop()


def _curl(url: str, key: str, body: bytes, tmp_path: Path, gzipped: bool = False) -> tuple[int, dict[str, Any]]:
    payload = tmp_path / f"body-{uuid.uuid4().hex}.json"
    payload.write_bytes(gzip.compress(body) if gzipped else body)
    command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {key}",
               "-H", "Content-Type: application/json", "--data-binary", f"@{payload}", url]
    if gzipped:
        command[6:6] = ["-H", "Content-Encoding: gzip"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_and_webhooks_arrive_in_clickhouse_exactly_once(isolated: Settings, start_worker: Any, ch: Any,
                                                             start_collector: Any, tmp_path: Path) -> None:
    collector = start_collector(_with_collector(isolated))
    url = collector.url + "/v1/touchpoints"
    start_ms = int(time.time() * 1000) - 120_000
    events = [e for e in generate("banking_app", 600, seed=5, start_ms=start_ms, events_per_s=10.0,
                                  schema_version=3) if e["tenant"] == "bank"][:500]
    bad = {**events[0], "event_id": "bad-1", "identifiers": {"anonymous_id": "null"}}
    batches = [events[i:i + 100] for i in range(0, len(events), 100)]
    batches[0] = [*batches[0], bad]
    for number, batch in enumerate(batches):
        body = json.dumps(batch).encode()
        status, answer = _curl(url, BANK_KEY, body, tmp_path, gzipped=number % 2 == 1)
        assert status == 200, answer
        assert answer["accepted"] == len([e for e in batch if e is not bad])
        # A sender that did not see the answer sends the same batch again: counted once.
        status, again = _curl(url, BANK_KEY, body, tmp_path)
        assert status == 200 and again["accepted"] == answer["accepted"]
    rejected = [r for r in _curl(url, BANK_KEY, json.dumps([bad]).encode(), tmp_path)[1]["results"]]
    assert rejected[0]["status"] == "rejected" and "no identifier" in rejected[0]["detail"]
    status, other = _curl(url, HOSPITAL_KEY, json.dumps(events[:1]).encode(), tmp_path)
    assert status == 403 and "bank" in other["error"]

    hooks = {"typeform": "typeform_form_response.json", "zendesk": "zendesk_ticket_created.json"}
    for source, fixture in [*hooks.items(), ("zendesk", "zendesk_ticket_status_changed.json")]:
        status, answer = _curl(f"{collector.url}/v1/webhooks/{source}", BANK_KEY,
                               (FIXTURES / fixture).read_bytes(), tmp_path)
        assert status == 200 and answer["accepted"] >= 1, answer

    worker = start_worker()
    expected = len(events) + 2 + 2  # two survey answers from Typeform, two ticket events from Zendesk
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] >= expected, 120,
               f"{expected} touchpoints", worker)
    time.sleep(2)  # anything late or doubled would show up now
    assert ch.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (expected, expected)
    assert ch.execute("SELECT count() FROM touchpoints WHERE event_id = 'bad-1'")[0][0] == 0
    surveys = ch.execute("SELECT survey_kind, survey_score, survey_scale_max, user_id FROM touchpoints FINAL "
                         "WHERE event_id LIKE 'typeform:%' ORDER BY survey_kind")
    assert surveys == [("CSAT", 2, 5, "u-20417"), ("NPS", 9, 10, "u-20417")]
    tickets = ch.execute("SELECT event_type, outcome, resolved, journey_id FROM touchpoints FINAL "
                         "WHERE event_id LIKE 'zendesk:%' ORDER BY event_type")
    assert tickets == [("ticket_opened", None, None, "zendesk-ticket:48213"),
                       ("ticket_resolved", "SUCCESS", 1, "zendesk-ticket:48213")]


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Book an appointment</title></head>
<body style="font-family: sans-serif">
<div id="notice"></div>
<h1>Book an appointment</h1>
<p id="intro">Choose a clinic, a day and a time. We send you a confirmation by email and a reminder the day
before. You can move or cancel the appointment until the evening before.</p>
<button id="book" style="font-size: 24px; padding: 12px">Book</button>
<script async src="{collector}/v1/snippet.js" data-key="{key}" data-flow="book_appointment"
        data-app-version="portal-test"></script>
<script>
  // A late banner pushes the content down: a layout shift the person did not cause (CLS).
  setTimeout(() => {{ document.getElementById('notice').style.height = '180px'; }}, 300);
  document.getElementById('book').addEventListener('click', () => {{
    const task = window.touchpoint.start('book_appointment');
    const until = performance.now() + 150;
    while (performance.now() < until) {{}}  // a slow handler: the interaction is slow to paint (INP)
    document.getElementById('book').textContent = 'Booked';
    task.success();
  }});
</script>
</body></html>
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.skipif(shutil.which("chromedriver") is None, reason="chromium-driver is not installed")
def test_browser_snippet_sends_page_views_tasks_and_web_vitals(isolated: Settings, start_worker: Any, ch: Any,
                                                               start_collector: Any, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    site.mkdir()
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    settings = _with_collector(isolated, cors_origins=[page_origin])
    collector = start_collector(settings)
    (site / "book.html").write_text(PAGE.format(collector=collector.url, key=HOSPITAL_KEY))
    handler = lambda *a: _QuietHandler(*a, directory=str(site))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", page_port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = start_worker()

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-background-networking"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"{page_origin}/book.html")
        wait_until(lambda: driver.execute_script("return !!window.touchpoint"), 20, "the snippet to load")
        time.sleep(1.0)  # the banner shifts the layout
        driver.find_element(By.ID, "book").click()
        wait_until(lambda: driver.find_element(By.ID, "book").text == "Booked", 10, "the click")
        time.sleep(1.0)  # web-vitals processes the interaction when the page is idle
        driver.get("about:blank")  # leaving hides the page: the snippet sends its batch with sendBeacon
    finally:
        time.sleep(1.0)
        driver.quit()
        server.shutdown()

    rows = wait_until(lambda: ch.execute(
        "SELECT event_type, channel, tenant, device_class, flow, outcome, duration_ms, lcp_ms, inp_ms, cls, "
        "app_version, anonymous_id FROM touchpoints FINAL ORDER BY event_type") if ch.execute(
        "SELECT count() FROM touchpoints")[0][0] >= 2 else None, 60, "the browser's touchpoints", worker)
    by_type = {row[0]: row for row in rows}
    assert set(by_type) == {"page_view", "task"}
    page, task = by_type["page_view"], by_type["task"]
    assert page[1:5] == ("WEB", "hospital", "DESKTOP", "book_appointment")
    assert page[7] is not None and page[7] > 0, "LCP measured"
    assert page[8] is not None and page[8] >= 100, "INP of the slow click measured"
    assert page[9] is not None and page[9] > 0, "CLS of the late banner measured"
    assert task[5] == "SUCCESS" and task[6] >= 150 and task[10] == "portal-test"
    assert page[11] == task[11] and page[11], "one anonymous visitor"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Settings]:
    """A Tansu broker of this test alone (its own port and state dir): the shared one is never stopped."""
    from pipeline.adapters.kafka import ensure_topics
    from pipeline.stack.local import Broker

    settings = Settings()
    settings.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"
    settings.kafka.topic = "fault-" + uuid.uuid4().hex[:8]
    settings.stack.state_dir = tmp_path / "broker"
    broker = Broker(settings)
    broker.up(60)
    try:
        ensure_topics(settings.kafka.bootstrap_servers, {settings.kafka.topic: 2})
        yield settings
    finally:
        pid = broker.pid_file.read_text().strip() if broker.pid_file.exists() else ""
        if pid.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGCONT)  # a frozen broker cannot act on SIGTERM
        broker.down()


Answer = tuple[int, Any, float, str | None]


def _load(url: str, batches: list[list[dict[str, Any]]], pause: Callable[[int], None]) -> list[Answer]:
    """Post the batches from four senders; returns (status, body, seconds, Retry-After) per request, in the
    order of the batches."""
    answers: dict[int, Answer] = {}
    lock = threading.Lock()

    def send(number: int) -> None:
        pause(number)
        started = time.monotonic()
        response = httpx.post(url, content=json.dumps(batches[number]).encode(), timeout=60,
                              headers={"Authorization": f"Bearer {BANK_KEY}"})
        with lock:
            answers[number] = (response.status_code, response.json(), time.monotonic() - started,
                               response.headers.get("retry-after"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(len(batches))))
    return [answers[number] for number in range(len(batches))]


def _batches(count: int) -> list[list[dict[str, Any]]]:
    start_ms = int(time.time() * 1000) - 60_000
    events = list(generate("mixed", count * 100, seed=9, start_ms=start_ms, events_per_s=200.0, schema_version=3))
    for event in events:
        event["tenant"] = "bank"
    return [events[i:i + 100] for i in range(0, len(events), 100)]


def test_frozen_broker_gets_503_and_nothing_unacknowledged_is_accepted(start_collector: Any,
                                                                        own_broker: Settings) -> None:
    from pipeline.stack.local import Broker

    broker_settings = own_broker
    broker = Broker(broker_settings)
    pid = int(broker.pid_file.read_text())
    settings = _with_collector(broker_settings, ack_timeout_s=2.0, retry_after_s=3, max_unacked_events=2_000)
    try:
        collector = start_collector(settings)
        batches = _batches(60)

        def freeze_midway(number: int) -> None:
            if number == 20:
                os.kill(pid, signal.SIGSTOP)  # the broker stops answering, mid-load
            if number == 44:
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)

        answers = _load(collector.url + "/v1/touchpoints", batches, freeze_midway)
    finally:
        os.kill(pid, signal.SIGCONT)
    refused = [a for a in answers if a[0] == 503]
    assert refused, "some requests met the frozen broker"
    assert all(a[3] == "3" for a in refused), "503 carries Retry-After"
    assert max(a[2] for a in answers) < 2.0 + 1.5, "bounded wait: the ack timeout and some slack"
    assert all(a[0] == 200 for a in answers[:16]), "before the freeze every request is delivered"
    assert all(a[0] == 200 for a in answers[-3:]), "after the thaw it delivers again"
    assert collector.rss_mib() < 300, "bounded memory"
    accepted = {r["event_id"] for status, body, _, _ in answers for r in body.get("results", [])
                if r["status"] == "accepted"}
    records = read_topic(broker_settings, broker_settings.kafka.topic, 2, expected=len(accepted), timeout_s=30)
    from pipeline.contract.registry import open_registry, parse_for_decoding
    from pipeline.core.decode import decode_batch

    registry = open_registry(broker_settings.registry.url)
    on_topic = {e["event_id"] for e in decode_batch(
        [r.value for r in records], lambda i: parse_for_decoding(registry.schema(i))).events}  # type: ignore[arg-type]
    assert accepted <= on_topic, f"{len(accepted - on_topic)} events reported accepted are not on the topic"


def test_dead_broker_gets_503_until_it_is_back(start_collector: Any, own_broker: Settings) -> None:
    from pipeline.stack.local import Broker

    broker_settings = own_broker
    broker = Broker(broker_settings)
    settings = _with_collector(broker_settings, ack_timeout_s=2.0, retry_after_s=2)
    collector = start_collector(settings)
    batches = _batches(30)

    def kill_midway(number: int) -> None:
        if number == 10:
            broker.down()  # the broker process is gone, mid-load
        time.sleep(0.05)

    answers = _load(collector.url + "/v1/touchpoints", batches, kill_midway)
    assert all(a[0] == 200 for a in answers[:6]), "before the broker dies every request is delivered"
    assert any(a[0] == 503 for a in answers[10:]), "after, 503"
    assert all(a[3] == "2" for a in answers if a[0] == 503)
    assert max(a[2] for a in answers) < 2.0 + 1.5
    for status, body, _, _ in answers:
        if status == 503 and "results" in body:
            assert {r["status"] for r in body["results"]} <= {"accepted", "unavailable", "rejected"}
            assert body["unavailable"] > 0
    Broker(broker_settings).up(60)  # back (empty: Tansu keeps its log in memory)
    retry = wait_until(lambda: httpx.post(collector.url + "/v1/touchpoints", timeout=30,
                                          content=json.dumps(batches[-1]).encode(),
                                          headers={"Authorization": f"Bearer {BANK_KEY}"}).status_code == 200,
                       60, "the collector to deliver again")
    assert retry
