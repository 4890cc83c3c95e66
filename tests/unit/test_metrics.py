"""/metrics listens on loopback unless the metrics_host setting says otherwise."""

import socket

from pipeline.adapters import metrics
from pipeline.settings import Settings


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_listen_on_loopback_by_default(monkeypatch):
    monkeypatch.delenv("TOUCHPOINT_METRICS_HOST", raising=False)
    assert Settings().metrics_host == "127.0.0.1"
    server = metrics.serve(free_port())
    try:
        assert server is not None and server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_host_setting_is_used(monkeypatch):
    server = metrics.serve(free_port(), host="127.0.0.2")
    try:
        assert server is not None and server.server_address[0] == "127.0.0.2"
    finally:
        server.shutdown()
        server.server_close()


def test_port_zero_serves_nothing():
    assert metrics.serve(0) is None
