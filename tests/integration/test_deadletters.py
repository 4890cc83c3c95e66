"""Dead letters as a tool on the real stack: touchpoints written with a schema the worker's registry lacks are
dead-lettered; once the registry has it, `deadletters replay` re-publishes them with their event ids, a worker
counts each once, and replaying them again counts nothing twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
from pipeline.contract.registry import open_registry
from pipeline.settings import SCHEMAS_DIR, to_env
from tests.factories import task
from tests.integration.conftest import read_topic, wait_until

pytestmark = pytest.mark.integration


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **to_env(settings)}, timeout=120)


def test_dead_letters_are_listed_and_replayed_once_the_cause_is_fixed_without_double_counting(
        isolated, start_worker, ch, tmp_path):
    # The worker's registry knows schema 1 only: records written with schema 2 are dead-lettered (unknown_schema).
    registry_dir = tmp_path / "registry"
    registry_dir.mkdir()
    for avsc in SCHEMAS_DIR.glob("*.avsc"):
        shutil.copy(avsc, registry_dir)
    manifest = json.loads((SCHEMAS_DIR / "registry.json").read_text())
    manifest["schemas"] = [s for s in manifest["schemas"] if s["id"] == 1]
    (registry_dir / "registry.json").write_text(json.dumps(manifest))
    broken = isolated.model_copy(deep=True)
    broken.registry.url = f"file://{registry_dir / 'registry.json'}"

    now_ms = int(time.time() * 1000)
    start_ms = now_ms - now_ms % 10_000 - 60_000
    v2 = TouchpointPublisher(isolated.kafka.bootstrap_servers, isolated.kafka.topic,
                             TouchpointEncoder(open_registry(isolated.registry.url), isolated.registry.subject, 2))
    failed = [task("FAILURE" if i % 4 == 0 else "SUCCESS", event_id=f"v2-{i}", event_time=start_ms + i * 100,
                   channel="MOBILE_APP", user_id=f"u{i % 7}") for i in range(40)]
    v2.publish_many(failed)
    v2.close()
    worker = start_worker(broken)
    read_topic(isolated, isolated.kafka.dead_letter_topic, 1, 40, timeout_s=60)
    wait_until(lambda: ch.execute("SELECT count() FROM pipeline_checkpoints")[0][0] > 0, 60, "a checkpoint", worker)
    assert ch.execute("SELECT count() FROM touchpoints")[0][0] == 0
    worker.stop()

    listed = cli(isolated, "deadletters", "list", "--reason", "unknown_schema", "--since", "10m", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert sorted(d["event_id"] for d in letters) == sorted(e["event_id"] for e in failed)
    assert all(d["problem_now"] is None for d in letters)  # the registry the CLI uses has schema 2: they decode
    assert cli(isolated, "deadletters", "list", "--reason", "undecodable", "--json").stdout.strip() == ""
    bad_since = cli(isolated, "deadletters", "list", "--since", "yesterday-ish")
    assert bad_since.returncode == 2 and "--since" in bad_since.stdout and "Traceback" not in bad_since.stderr

    dry = cli(isolated, "deadletters", "replay", "--reason", "unknown_schema", "--dry-run")
    assert "would replay 40" in dry.stdout, dry.stdout
    replayed = cli(isolated, "deadletters", "replay", "--reason", "unknown_schema")
    assert "replayed 40" in replayed.stdout, replayed.stdout + replayed.stderr
    assert cli(isolated, "deadletters", "replay", "--reason", "unknown_schema").stdout.count("replayed 0") == 1

    fixed = start_worker()  # the whole registry now
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL WHERE counted = 1")[0][0] == 40, 90,
               "the replayed touchpoints counted", fixed)

    def error_rate_counts() -> tuple[float, float]:
        return tuple(ch.execute("SELECT sum(total), sum(count) FROM indicator_cells FINAL "
                                "WHERE window_kind = '1m' AND indicator = 'error_rate'")[0])

    wait_until(lambda: error_rate_counts()[1] == 40, 60, "every pane closed", fixed)
    assert error_rate_counts() == (10.0, 40.0)
    def read_so_far() -> int:
        return ch.execute("SELECT sum(r) FROM (SELECT partition, max(read_offset) AS r FROM pipeline_checkpoints "
                          "GROUP BY partition)")[0][0]

    before = read_so_far()
    again = cli(isolated, "deadletters", "replay", "--reason", "unknown_schema", "--again")
    assert "replayed 40" in again.stdout
    wait_until(lambda: read_so_far() >= before + 40, 60, "the second replay read and checkpointed", fixed)
    assert ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] == 40
    assert ch.execute("SELECT count() FROM touchpoints FINAL WHERE counted = 1")[0][0] == 40
    assert error_rate_counts() == (10.0, 40.0)
    assert ch.execute("SELECT count() FROM dead_letter_replays FINAL")[0][0] == 40
