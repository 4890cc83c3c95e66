from pathlib import Path

from pipeline.stack.local import _host_port, render_clickhouse_config


def test_clickhouse_config_keeps_everything_under_the_project_home():
    config, users = render_clickhouse_config(Path("/srv/tp/clickhouse"), 19000, 18123)
    assert "<tcp_port>19000</tcp_port>" in config and "<http_port>18123</http_port>" in config
    assert "<listen_host>127.0.0.1</listen_host>" in config
    assert "/var/lib/clickhouse" not in config and "<path>/srv/tp/clickhouse/data/</path>" in config
    assert "<ip>127.0.0.1</ip>" in users


def test_bootstrap_address_parsing():
    assert _host_port("127.0.0.1:19092") == ("127.0.0.1", 19092)
    assert _host_port("kafka-1:9092,kafka-2:9092") == ("kafka-1", 9092)
