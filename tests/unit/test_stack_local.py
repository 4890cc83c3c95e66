"""The local Apache Kafka broker's generated files, without starting it."""

import base64

from pipeline.stack.local import new_cluster_id, render_kafka_config


def test_kafka_cluster_ids_never_start_with_a_dash():
    """The storage tool took an id starting with "-" for an option (seen in a test run: format failed)."""
    ids = [new_cluster_id() for _ in range(2_000)]  # about 1 in 64 random ids starts with "-"
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)


def test_server_properties_listen_on_loopback_with_data_under_the_state_dir(tmp_path):
    server, log4j = render_kafka_config(tmp_path, "127.0.0.1", 29092, 29093)
    settings = dict(line.split("=", 1) for line in server.splitlines() if line and not line.startswith("#"))
    assert settings["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert settings["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert settings["log.dirs"] == f"{tmp_path}/data" and settings["process.roles"] == "broker,controller"
    assert "rootLogger.level = WARN" in log4j
