"""The demo's worker ends with the demo, also when the demo is ended by a hang-up (its terminal closed)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.settings import to_env
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def worker_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "pipeline.cli worker" in line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.parametrize("ending", [signal.SIGHUP, signal.SIGTERM], ids=["sighup", "sigterm"])
def test_a_demo_ended_by_a_hang_up_stops_its_worker(ending, isolated, tmp_path):
    env = {**os.environ, **to_env(isolated), "TOUCHPOINT_STACK__STATE_DIR": str(tmp_path), "COLUMNS": "200"}
    with (tmp_path / "demo.out").open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--duration", "120", "--rate", "20"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    workers: list[int] = []
    try:
        workers = wait_until(lambda: worker_children(demo.pid), 60, "the demo's worker")
        wait_until(lambda: "4/4" in (tmp_path / "demo.out").read_text(), 60, "the demo publishing")
        time.sleep(3)
        demo.send_signal(ending)
        demo.wait(timeout=45)
        wait_until(lambda: not any(alive(w) for w in workers), 40, "the worker to end after the demo")
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
