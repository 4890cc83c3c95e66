"""Operators' everyday mistakes end in one line naming the cause and exit code 2, not a traceback.
No server is needed: the addresses here answer nothing."""

import os
import socket
import subprocess
import sys

import pytest

from pipeline.app.erasure import refusal
from pipeline.settings import Settings


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def touchpoint_cli(*args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOUCHPOINT_")}
    return subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True,
                          env={**clean, "COLUMNS": "300", **env}, timeout=120)


def assert_one_line(result, *expected):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("TOUCHPOINT_CLICKHOUSE__PORT", "99999", "clickhouse.port"),
    ("TOUCHPOINT_METRICS_PORT", "-1", "metrics_port"),
    ("TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:99999", "kafka.bootstrap_servers"),
    ("TOUCHPOINT_KAFKA__PARTITIONS", "zero", "kafka.partitions"),
    ("TOUCHPOINT_STACK__BROKER", "redpanda", "stack.broker"),
])
def test_an_invalid_setting_is_named_with_its_variable(variable, value, named):
    result = touchpoint_cli("stack", "status", **{variable: value})
    assert_one_line(result, f"invalid setting {named}", variable, value)


def test_an_unknown_identifier_kind_in_the_identity_policy_is_named():
    result = touchpoint_cli("stack", "status", TOUCHPOINT_IDENTITY__MAX_VALUES='{"emial_sha256": 2}')
    assert_one_line(result, "invalid setting identity.max_values", "TOUCHPOINT_IDENTITY__MAX_VALUES",
                    "unknown identifier kinds ['emial_sha256']")


def test_a_negative_restate_horizon_is_named():
    result = touchpoint_cli("stack", "status", TOUCHPOINT_IDENTITY__RESTATE_HORIZON_S="-5")
    assert_one_line(result, "invalid setting identity.restate_horizon_s", "TOUCHPOINT_IDENTITY__RESTATE_HORIZON_S")


def test_an_unmerge_of_something_that_is_not_an_audit_id_is_one_line():
    assert_one_line(touchpoint_cli("identity", "unmerge", "not-an-id"), "is not an audit id", "identity audit")


def test_the_allowed_values_of_a_setting_are_listed():
    result = touchpoint_cli("stack", "status", TOUCHPOINT_STACK__BROKER="redpanda")
    assert_one_line(result, "'auto', 'kafka' or 'tansu'")


def test_an_unreachable_broker_is_named():
    address = f"127.0.0.1:{free_port()}"
    result = touchpoint_cli("init", TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS=address)
    assert_one_line(result, f"cannot reach the Kafka broker at {address}", "TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS")


def test_an_unreachable_clickhouse_is_named():
    port = free_port()
    result = touchpoint_cli("forget", "user_id:u-1", TOUCHPOINT_CLICKHOUSE__PORT=str(port))
    assert_one_line(result, f"cannot reach ClickHouse at 127.0.0.1:{port}", "TOUCHPOINT_CLICKHOUSE__PORT")


def test_an_unreachable_registry_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    path = tmp_path / "t.jsonl"
    path.write_text("{}\n")
    result = touchpoint_cli("publish", str(path), TOUCHPOINT_REGISTRY__URL=url)
    assert_one_line(result, "schema registry", url, "TOUCHPOINT_REGISTRY__URL")


@pytest.mark.parametrize("identifier", ["", " ", "user_id:", "user_id:NULL", "anonymous", "guest", "email_sha256:0"])
def test_forget_refuses_blank_or_blocked_identifiers(identifier):
    assert refusal(identifier, Settings().identity.core().blocked_values) is not None


@pytest.mark.parametrize("identifier", ["user_id:u-42", "u-42", "customer_id:guest-7"])
def test_forget_takes_real_identifiers(identifier):
    assert refusal(identifier, Settings().identity.core().blocked_values) is None


def test_forget_of_a_blank_identifier_exits_non_zero_before_touching_any_server():
    # ClickHouse and the broker answer nothing here: the refusal comes first, so nothing can be written.
    result = touchpoint_cli("forget", "", TOUCHPOINT_CLICKHOUSE__PORT=str(free_port()),
                            TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    assert_one_line(result, "refusing to forget", "nothing was erased")

