"""The runner's rules on the real stack: records of any size become dead letters, a stop is bounded whatever the
broker does, and the demo's worker ends with the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.app.bootstrap import initialise
from pipeline.settings import Settings, to_env
from tests.factories import touchpoint
from tests.integration.conftest import read_topic, wait_until

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_record_too_large_to_dead_letter_whole_still_becomes_a_dead_letter_and_the_partition_moves_on(
        isolated, publisher, start_worker, ch):
    now = int(time.time() * 1000)
    huge = b"\x07" + os.urandom(1_040_000)  # not Avro; with the dead-letter headers it is over the 1 MiB limit
    worker = start_worker()
    publisher.publish(touchpoint("before", now - 1_000))
    publisher.publish_raw(huge, key=b"anonymous:a-1")
    publisher.publish(touchpoint("after", now))
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 2, 60, "both good rows", worker)
    [dead] = read_topic(isolated, isolated.kafka.dead_letter_topic, 1, expected=1)
    headers = dict(dead.headers)
    assert dead.value is None
    assert headers["reason"] == b"undecodable" and headers["source.size"] == str(len(huge)).encode()
    assert headers["payload"].startswith(b"omitted")
    assert worker.process.poll() is None  # still running: the partition was not stopped


def test_sigterm_ends_the_worker_within_30_s_while_the_broker_is_down(isolated, tmp_path, start_worker, ch):
    from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
    from pipeline.contract.registry import open_registry
    from pipeline.stack import local

    own: Settings = isolated.model_copy(deep=True)  # a broker of this test's own, which it can stop
    own.stack.state_dir = tmp_path / "stack"
    own.kafka.bootstrap_servers = f"127.0.0.1:{_free_port()}"
    local.up(own)  # ClickHouse answers already: only the broker starts
    try:
        initialise(own)
        worker = start_worker(own)
        publisher = TouchpointPublisher(own.kafka.bootstrap_servers, own.kafka.topic,
                                        TouchpointEncoder(open_registry(own.registry.url), own.registry.subject, 1))
        now = int(time.time() * 1000)
        for n in range(200):
            publisher.publish(touchpoint(f"e{n}", now - 1_000, anonymous_id=f"a-{n}"))
        publisher.close()
        wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 200, 60, "the rows", worker)
    finally:
        local.down(own)  # the broker goes away under the running worker
    time.sleep(5)
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        worker.process.kill()
        pytest.fail(f"the worker was still running 40 s after SIGTERM:\n{worker.log_tail()}")
    assert time.monotonic() - started < 30


def _children(pid: int, command_word: str | None = None) -> list[int]:
    """Processes whose parent is pid and whose command line has command_word (from /proc: no extra package)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
                        and (command_word is None
                             or command_word.encode() in (entry / "cmdline").read_bytes().split(b"\0"))):
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_demos_worker_and_alerter_end_when_the_demo_is_hung_up(isolated, tmp_path):
    env = {**os.environ, **to_env(isolated), "TOUCHPOINT_STACK__STATE_DIR": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "demo", "--duration", "120", "--rate", "20"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def commands() -> dict[int, str]:
            found = {}
            for pid in _children(demo.pid):
                try:
                    found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:  # ended meanwhile
                    continue
            return found

        started = wait_until(lambda: (found := commands()) and any(c.endswith("pipeline.app.cli alerter ")
                                                                   for c in found.values()) and found,
                             60, "the demo's worker and alerter")
        kinds = {command.split("pipeline.app.cli ", 1)[-1].strip() for command in started.values()}
        assert {"worker", "alerter"} <= kinds, kinds  # the alerter runs beside the worker
        time.sleep(3)
        demo.send_signal(signal.SIGHUP)  # what closing the terminal does
        demo.wait(timeout=40)
        wait_until(lambda: not any(_alive(pid) for pid in started), 35,
                   "the worker and the alerter to end after the hang-up")
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in _children(demo.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_second_pipeline_is_refused_a_database_that_holds_another_pipelines_cells(isolated, tmp_path):
    other = isolated.model_copy(deep=True)
    other.kafka.topic, other.kafka.consumer_group = f"{isolated.kafka.topic}-b", f"{isolated.kafka.consumer_group}-b"
    env = {**os.environ, **to_env(other)}
    for command in (["init"], ["worker"]):
        result = subprocess.run([sys.executable, "-m", "pipeline.app.cli", *command], env=env, capture_output=True,
                                text=True, timeout=60)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2, output
        assert "Traceback" not in output
        assert isolated.kafka.consumer_group in output and "TOUCHPOINT_CLICKHOUSE__DATABASE" in output
    initialise(isolated)  # the owner itself is welcome again
