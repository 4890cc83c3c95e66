"""The pipeline-health alert rules fire where they should, checked by Prometheus's own rule tester."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus; scripts/setup.sh installs it)")
def test_promtool_rule_tests_pass():
    check = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_liveness_alerts_are_in_the_rule_tests():
    text = RULE_TESTS.read_text()
    for alert in ("TouchpointClickHouseInsertsFailing", "TouchpointFlushStale", "TouchpointEventLoopStuck"):
        assert f"alertname: {alert}" in text
