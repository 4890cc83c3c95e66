import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.stack.local import _host_port, render_clickhouse_config, render_cluster_config, render_zookeeper_config


def test_clickhouse_config_keeps_everything_under_the_project_home():
    config, users = render_clickhouse_config(Path("/srv/tp/clickhouse"), 19000, 18123)
    assert "<tcp_port>19000</tcp_port>" in config and "<http_port>18123</http_port>" in config
    assert "<listen_host>127.0.0.1</listen_host>" in config
    assert "/var/lib/clickhouse" not in config and "<path>/srv/tp/clickhouse/data/</path>" in config
    assert "<ip>127.0.0.1</ip>" in users


def test_bootstrap_address_parsing():
    assert _host_port("127.0.0.1:19092") == ("127.0.0.1", 19092)
    assert _host_port("kafka-1:9092,kafka-2:9092") == ("kafka-1", 9092)


def test_a_cluster_servers_config_names_every_shard_its_own_macros_and_zookeeper():
    shards = [("127.0.0.1", 29001), ("127.0.0.1", 29002)]
    second = render_cluster_config("tp", shards, ("127.0.0.1", 29181), 2, 29009)
    config, _ = render_clickhouse_config(Path("/srv/tp/shard2"), 29002, 28124, second)
    root = ET.fromstring(config)  # well-formed, one document
    replicas = root.findall("remote_servers/tp/shard/replica")
    assert [(r.findtext("host"), int(r.findtext("port") or 0)) for r in replicas] == shards
    assert all(s.findtext("internal_replication") == "true" for s in root.findall("remote_servers/tp/shard"))
    assert root.findtext("macros/shard") == "2" and root.findtext("macros/replica") == "127.0.0.1-29002"
    assert root.findtext("zookeeper/node/port") == "29181" and root.findtext("distributed_ddl/path")
    assert root.findtext("interserver_http_port") == "29009" and root.findtext("tcp_port") == "29002"
    first = render_cluster_config("tp", shards, ("127.0.0.1", 29181), 1, 29008)
    assert re.search(r"<replica>127.0.0.1-29001</replica>", first)  # replica names differ across servers


def test_zookeeper_listens_on_loopback_only_with_its_data_under_the_home():
    config = dict(line.split("=", 1) for line in render_zookeeper_config(Path("/srv/tp/zk"), "127.0.0.1", 29181)
                  .splitlines() if "=" in line and not line.startswith("#"))
    assert config["clientPortAddress"] == "127.0.0.1" and config["clientPort"] == "29181"
    assert config["dataDir"] == "/srv/tp/zk/data" and config["admin.enableServer"] == "false"
