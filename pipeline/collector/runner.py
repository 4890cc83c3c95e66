"""Start a `touchpoint collector` process with given settings and wait until it answers (tests and the bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.settings import Settings, to_env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CollectorProcess:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.url = f"http://{settings.collector.host}:{settings.collector.port}"
        self.log_path = log_path
        with log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "collector"], stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, **to_env(settings)})

    def wait_ready(self, timeout_s: float = 60, broker: bool = True) -> None:
        """Until /healthz answers (200 when `broker`: the producer is connected)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"collector exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except urllib.error.HTTPError as exc:
                if not broker and exc.code == 503:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"collector did not answer on {self.url} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
