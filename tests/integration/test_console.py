"""The operations console on the real stack, in a real browser (Debian's chromium, headless, through Selenium and
Debian's chromedriver): generated bank and hospital traffic and a conversion journey go through a real worker and
a real `touchpoint alerter`, then the page must show the seeds' quadrants, a chart with points, the alerter's
states, an acknowledgement that reaches the alerter's tables in ClickHouse, follow-up cases with SLA countdowns
and the journey's roles in order, with no console errors. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
from pipeline.app.bootstrap import initialise
from pipeline.console.app import create_app
from pipeline.contract.registry import open_registry
from pipeline.generate.scenarios import generate
from pipeline.settings import Settings, to_env
from tests.factories import touchpoint
from tests.integration.conftest import WorkerProcess, isolated_settings

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "test-token-" + uuid.uuid4().hex[:6]
CONVERSION = ("ck-conv-1", "shop-u-conv-1", "shop-c-conv-1")  # anonymous, user and customer id of one person


def conversion_journey(start_ms: int) -> list[dict[str, Any]]:
    """A visitor browses (prospect), signs in and uses the product (user), then buys (customer)."""
    anonymous, user, customer = CONVERSION
    base = {"tenant": "shop", "channel": "WEB", "role": "prospect"}
    return [
        touchpoint("conv-1", start_ms, anonymous_id=anonymous, **base),
        touchpoint("conv-2", start_ms + 20_000, anonymous_id=anonymous, user_id=user, **base),
        touchpoint("conv-3", start_ms + 40_000, event_type="purchase", anonymous_id=anonymous, user_id=user,
                   customer_id=customer, amount={"minor_units": 4200, "currency": "EUR"}, **base),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, timeout_s: float, what: str, worker: WorkerProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"worker exited while waiting for {what}:\n{worker.log_tail()}")
        time.sleep(0.5)
    tail = f"\n{worker.log_tail()}" if worker is not None else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r}){tail}")


@pytest.fixture(scope="module")
def console_stack(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One database, topic and worker for the module (the browser tests read the same traffic)."""
    run = uuid.uuid4().hex[:8]
    settings = isolated_settings(stack_settings, run)
    settings.console.token = TOKEN
    settings.alerting.topic = f"it-{run}.alerts"
    settings.alerting.cycle_s = 0.3
    settings.alerting.lease_ttl_s = 3
    settings.alerting.start_lookback_s = 1_200  # the ten minutes of traffic and the time to store them
    # The default rules but the seasonal one: ten minutes of traffic have no weeks of history to compare with.
    settings.alerting.rules = [r for r in settings.alerting.rules if r.get("kind") != "seasonal"]
    initialise(settings)
    logs = tmp_path_factory.mktemp("console-worker")
    worker = WorkerProcess(settings, logs / "worker.log")
    alerter: subprocess.Popen[bytes] | None = None
    ch = connect(settings.clickhouse)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        encoder = TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject, 1)
        publisher = TouchpointPublisher(settings.kafka.bootstrap_servers, settings.kafka.topic, encoder)
        # Ten minutes of event time up to now: the bank's failing app, the hospital's bad visit, one conversion.
        now_ms = int(time.time() * 1000)
        start_ms = now_ms - 600_000
        events = [*generate("banking_app", 5_000, seed=3, start_ms=start_ms, events_per_s=8.5),
                  *generate("hospital_booking", 5_000, seed=4, start_ms=start_ms, events_per_s=8.5),
                  *conversion_journey(start_ms + 120_000)]
        events.sort(key=lambda e: e["event_time"])
        publisher.publish_many(events)
        for value in (b"not avro at all", b"\x00\x00\x00\x00\x63" + b"\x02" * 20):  # undecodable, unknown schema
            publisher.publish_raw(value, key=b"broken")
        publisher.close()
        last_ms = max(e["event_time"] for e in events)

        def closed() -> bool:
            rows = ch.execute("SELECT partition, max(closed_before_ms) FROM pipeline_checkpoints GROUP BY partition")
            return len(rows) == 4 and all(c > last_ms - last_ms % 10_000 for _, c in rows)

        _wait(closed, 180, "every window closed", worker)
        # The one alerting path: the alerter beside the worker. Started once the past ten minutes are stored: an
        # alerter that has already judged up to now does not go back for windows backfilled after it.
        with (logs / "alerter.log").open("a") as alerter_log:
            alerter = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "alerter"], stdout=alerter_log,
                                       stderr=subprocess.STDOUT, env={**os.environ, **to_env(settings)})
        deadline = time.monotonic() + 120
        while not ch.execute("SELECT count() FROM alert_current WHERE state = 'firing'")[0][0]:
            if time.monotonic() > deadline or alerter.poll() is not None:
                pytest.fail("no firing alert from the alerter:\n" + (logs / "alerter.log").read_text()[-3000:])
            time.sleep(0.5)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=_free_port(),
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        _wait(lambda: server.started, 20, "the console to listen")
        yield {"settings": settings, "base": f"http://127.0.0.1:{server.config.port}", "ch": ch, "worker": worker}
    finally:
        if alerter is not None and alerter.poll() is None:
            alerter.send_signal(signal.SIGTERM)
            try:
                alerter.wait(timeout=20)
            except subprocess.TimeoutExpired:
                alerter.kill()
                alerter.wait()
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=10)
        worker.stop()
        ch.disconnect()
        connect(settings.clickhouse, database="default").execute(
            f"DROP DATABASE IF EXISTS {settings.clickhouse.database}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver are not installed: run scripts/setup.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], f"console errors in the page: {errors}"
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _screenshot(driver: Any, path: Path, section: str) -> None:
    """The whole page (not only the window), and the section under test on its own."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height), 6000)))
    driver.save_screenshot(str(path))
    driver.find_element("id", section).screenshot(str(path.with_name(f"{path.stem}-{section}.png")))


def _until(driver: Any, script: str, timeout_s: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.3).until(lambda d: d.execute_script(script))


def test_overview_puts_the_bank_and_the_hospital_in_their_quadrants(console_stack, browser, tmp_path):
    browser.get(console_stack["base"] + "/")
    dots = _until(browser, "const d = [...document.querySelectorAll('#quadrant .tenant-dot')];"
                           "return d.length >= 2 ? d.map(g => [g.dataset.tenant, g.dataset.quadrant, "
                           "Number(g.dataset.ux), Number(g.dataset.cx)]) : null;")
    placed = {tenant: (quadrant, ux, cx) for tenant, quadrant, ux, cx in dots}
    assert placed["bank"][0] == "bad UX, good CX", placed
    assert placed["hospital"][0] == "good UX, bad CX", placed
    assert placed["bank"][1] < 0.5 <= placed["bank"][2] and placed["hospital"][2] < 0.5 <= placed["hospital"][1]
    # Each axis names the indicators it is built from, in the note and per tenant.
    note = browser.find_element("id", "overview-note").text
    assert "error_rate" in note and "task_success_rate" in note and "csat" in note and "fcr" in note
    bank_row = browser.find_element("css selector", "#overview-table tr[data-tenant='bank']").text
    assert "error_rate" in bank_row and "csat" in bank_row
    _screenshot(browser, tmp_path / "overview.png", "overview")


def test_an_indicator_chart_has_points_with_n_and_an_interval(console_stack, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    browser.get(console_stack["base"] + "/")
    _until(browser, "return document.querySelectorAll('#s-tenant option').length > 0")
    Select(browser.find_element("id", "s-tenant")).select_by_visible_text("bank")
    _until(browser, "return [...document.querySelectorAll('#s-channel option')].some(o => o.value == 'MOBILE_APP')")
    Select(browser.find_element("id", "s-channel")).select_by_visible_text("MOBILE_APP")
    Select(browser.find_element("id", "s-indicator")).select_by_value("error_rate")
    points = _until(browser, "const c = document.getElementById('chart');"
                             "return c.dataset.indicator == 'error_rate' && Number(c.dataset.points) > 0 "
                             "? Number(c.dataset.points) : null;")
    assert points >= 10  # ten minutes of 10-second panes
    assert browser.find_elements("css selector", "#chart canvas")
    rows = browser.find_elements("css selector", "#series-table tr")
    assert len(rows) > 1 and " to " in rows[1].text  # a rate's row shows its interval
    Select(browser.find_element("id", "s-kind")).select_by_value("15m")
    _until(browser, "return document.querySelector('.u-title') && "
                    "document.querySelector('.u-title').textContent.includes('15-minute')")
    _screenshot(browser, tmp_path / "chart.png", "indicators")


def test_acknowledging_an_alert_in_the_page_changes_its_state_in_clickhouse(console_stack, browser, tmp_path):
    ch = console_stack["ch"]
    browser.get(console_stack["base"] + "/")
    browser.execute_script(f"const t = document.getElementById('token'); t.value = '{TOKEN}';"
                           "t.dispatchEvent(new Event('change'));")
    alert_id = _until(browser, "const r = document.querySelector(\"#alerts-table tr[data-state='firing']\");"
                               "return r ? r.dataset.alertId : null;")
    current = "SELECT state, acked_by FROM alert_current WHERE fingerprint = %(id)s"
    assert ch.execute(current, {"id": alert_id}) == [("firing", "")]
    assert ch.execute("SELECT count() FROM alert_commands WHERE target = %(id)s", {"id": alert_id})[0][0] == 0
    row = browser.find_element("css selector", f"#alerts-table tr[data-alert-id='{alert_id}']")
    row.find_element("css selector", "button[data-action='acknowledge']").click()
    _until(browser, f"const r = document.querySelector(\"#alerts-table tr[data-alert-id='{alert_id}']\");"
                    "return r && r.dataset.state == 'acknowledged';")
    commands = ch.execute("SELECT action, actor FROM alert_commands FINAL WHERE target = %(id)s", {"id": alert_id})
    assert commands == [("ack", "console")]
    assert ch.execute(current, {"id": alert_id}) == [("firing", "console")]  # the alerter applied it
    api = httpx.get(f"{console_stack['base']}/api/alerts/{alert_id}").json()
    assert api["state"] == "acknowledged" and api["acked_by"] == "console"
    assert [h["action"] for h in api["history"] if "cause" not in h] == ["ack"]
    assert any(h["action"].endswith("->firing") for h in api["history"])  # the alerter's transition to firing
    _screenshot(browser, tmp_path / "alerts.png", "alerts")


def test_the_page_shows_the_alerters_states_and_cases_with_sla_countdowns(console_stack, browser, tmp_path):
    ch = console_stack["ch"]
    browser.get(console_stack["base"] + "/#alerts")
    shown = _until(browser, "const r = [...document.querySelectorAll('#alerts-table tr[data-alert-id]')];"
                            "return r.length ? r.map(x => [x.dataset.alertId, x.dataset.state]) : null;")
    stored = dict(ch.execute("SELECT fingerprint, state FROM alert_current WHERE fingerprint != '' "
                             "AND state IN ('pending', 'firing', 'no_data')"))
    page = dict(shown)
    assert set(stored) <= set(page)  # every active series is on the page, with the alerter's state
    assert all(page[fp] == state or page[fp] in ("acknowledged", "silenced") for fp, state in stored.items())
    rules = {rule for (rule,) in ch.execute("SELECT rule FROM alert_current WHERE state = 'firing'")}
    assert {"ux_error_rate_high", "cx_csat_low"} <= rules, rules  # the bank's failing app, the hospital's visit
    # A follow-up case as the alerter stores it (test_alerter.py covers the alerter opening cases from detractors).
    from pipeline.adapters.alert_store import AlertStore as LifecycleTables
    from pipeline.core.cases import Case, CaseChange

    settings = console_stack["settings"]
    now_ms = int(time.time() * 1000)
    tables = LifecycleTables(settings.clickhouse, settings.kafka.consumer_group, settings.kafka.topic)
    try:
        tables.write_cases([CaseChange(Case("console-case-1", "hospital", "p-console-1", "nps_detractor",
                                            "cx-follow-up", "open", now_ms, now_ms + 48 * 3_600_000,
                                            "console-detractor-1", "SURVEY", 2.0), "opened", "NPS 2")], now_ms)
    finally:
        tables.close()
    open_cases = {case_id for (case_id,) in ch.execute("SELECT case_id FROM cases FINAL WHERE status != 'closed'")}
    browser.get(console_stack["base"] + "/#cases")
    rows = _until(browser, "const r = [...document.querySelectorAll('#cases-table tr[data-case-id]')];"
                           f"return r.length >= {len(open_cases)} ? r.map(x => [x.dataset.caseId, "
                           "x.querySelector('.sla').textContent]) : null;")
    assert {case_id for case_id, _ in rows} == open_cases
    assert all(" h " in sla and "min" in sla for _, sla in rows)  # 48 h SLA counting down
    _screenshot(browser, tmp_path / "cases.png", "cases")


def test_a_journey_shows_the_roles_of_a_conversion_in_order(console_stack, browser, tmp_path):
    browser.get(console_stack["base"] + "/#journey")
    field = browser.find_element("id", "j-identifier")
    field.send_keys(f"customer_id:{CONVERSION[2]}")
    browser.find_element("id", "j-search").click()
    roles = _until(browser, "const r = [...document.querySelectorAll('#journey-touchpoints tr.touchpoint')];"
                            "return r.length >= 3 ? r.map(x => x.dataset.role) : null;")
    assert roles == ["prospect", "user", "customer"]
    text = browser.find_element("id", "journey-result").text
    assert "first_use" in text  # the role change is listed with its cause
    assert browser.find_element("id", "j-erase").is_enabled()
    _screenshot(browser, tmp_path / "journey.png", "journey")


def test_health_shows_partitions_and_dead_letters_decoded_or_hex(console_stack, browser, tmp_path):
    browser.get(console_stack["base"] + "/#health")
    reasons = _until(browser, "const r = [...document.querySelectorAll('#health-dead tr td:first-child')];"
                              "return r.length >= 2 ? r.map(x => x.textContent) : null;")
    assert {"undecodable", "unknown_schema"} <= set(reasons)
    assert "hex 6e6f7420" in browser.find_element("id", "health-dead").text  # "not " in hex
    partitions = browser.find_elements("css selector", "#health-partitions tr")
    assert len(partitions) == 1 + 4
    _screenshot(browser, tmp_path / "health.png", "health")


def test_the_api_is_described_by_its_openapi_schema_and_actions_need_the_token(console_stack):
    base = console_stack["base"]
    schema = httpx.get(f"{base}/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/api/overview", "/api/series", "/api/alerts", "/api/alerts/{alert_id}/{action}", "/api/journey",
                 "/api/persons/erase", "/api/health", "/api/deadletters", "/api/cases"):
        assert path in schema["paths"], path
    overview = httpx.get(f"{base}/api/overview").json()
    assert {t["tenant"] for t in overview["tenants"]} >= {"bank", "hospital"}
    alert_id = httpx.get(f"{base}/api/alerts").json()[0]["alert_id"]
    assert httpx.post(f"{base}/api/alerts/{alert_id}/resolve").status_code == 401
    assert httpx.post(f"{base}/api/alerts/{alert_id}/resolve",
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{base}/api/persons/erase", json={"identifier": "user_id:x"}).status_code == 401
    done = httpx.post(f"{base}/api/alerts/{alert_id}/silence", json={"minutes": 5},
                      headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert done["state"] == "silenced"
    dead = httpx.get(f"{base}/api/deadletters", params={"reason": "undecodable"}).json()
    assert [d["reason"] for d in dead["dead_letters"]] == ["undecodable"] and dead["by_reason"]["unknown_schema"] == 1


def test_the_erase_button_erases_the_person_with_the_token_and_audits_it(console_stack, browser, tmp_path):
    # Last in the module: it deletes the conversion journey the journey test reads.
    ch = console_stack["ch"]
    identifier = f"user_id:{CONVERSION[1]}"
    assert ch.execute("SELECT count() FROM touchpoints WHERE has(resolved_from, %(i)s)", {"i": identifier})[0][0] > 0
    browser.get(console_stack["base"] + "/#journey")
    browser.execute_script(f"const t = document.getElementById('token'); t.value = '{TOKEN}';"
                           "t.dispatchEvent(new Event('change'));")
    browser.find_element("id", "j-identifier").send_keys(identifier)
    browser.find_element("id", "j-search").click()
    _until(browser, "return document.querySelectorAll('#journey-touchpoints tr.touchpoint').length == 3")
    browser.find_element("id", "j-erase").click()
    browser.switch_to.alert.accept()  # the page asks before erasing
    _until(browser, "return document.getElementById('status').textContent.startsWith('erased')", 150)
    _until(browser, "return document.getElementById('journey-result').textContent.includes('No touchpoints')")
    persons = ch.execute("SELECT count() FROM touchpoints WHERE hasAny(resolved_from, %(ids)s)",
                         {"ids": [f"anonymous_id:{CONVERSION[0]}", identifier, f"customer_id:{CONVERSION[2]}"]})
    assert persons[0][0] == 0
    audit = ch.execute("SELECT reason FROM identity_audit WHERE action = 'erasure'")
    assert len(audit) == 1 and "3 touchpoints" in audit[0][0]
    _screenshot(browser, tmp_path / "erased.png", "journey")
