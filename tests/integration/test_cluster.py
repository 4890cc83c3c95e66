"""clickhouse.cluster on a real cluster: two ClickHouse 18.16 shards and a ZooKeeper on loopback, started by the
project's own stack code (pipeline.stack.local.LocalCluster) on free ports under a temporary directory; a real
`touchpoint worker` writes through the Distributed tables and BI reads them, from either server, with exact
counts. The broker is the shared stack's."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
from pipeline.app.bootstrap import initialise
from pipeline.app.erasure import forget
from pipeline.contract.registry import open_registry
from pipeline.settings import Settings
from pipeline.stack.local import LocalCluster, ShardPorts
from tests import reference
from tests.integration.conftest import WorkerProcess, isolated_settings, wait_until
from tests.integration.test_pipeline import (
    all_windows_closed,
    assert_alerts_follow_the_rules,
    assert_values_equal,
    stored_values,
    traffic,
)

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a child that exited but was not reaped yet is gone too
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


@pytest.fixture(scope="module")
def cluster(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a pipeline of its own (topic, group, database) on a two-shard cluster started for this module."""
    base = stack_settings.model_copy(deep=True)
    base.stack.state_dir = tmp_path_factory.mktemp("cluster")
    local = LocalCluster("touchpoint_it", free_port(), tuple(ShardPorts(free_port(), free_port(), free_port())
                                                             for _ in range(2)))
    pids = [status.pid for status in local.up(base, timeout_s=60)]
    assert len(pids) == 3 and all(pids)
    try:
        settings = local.settings(isolated_settings(base, uuid.uuid4().hex[:8]))
        initialise(settings)
        yield settings
    finally:
        local.down(base)
        assert not [pid for pid in pids if pid is not None and alive(pid)], "a cluster server outlived the test"


def shards(settings: Settings) -> list[Any]:
    """A client on each server of the cluster (the settings point at the first)."""
    ports = [row[0] for row in connect(settings.clickhouse).execute(
        "SELECT port FROM system.clusters WHERE cluster = %(c)s ORDER BY shard_num",
        {"c": settings.clickhouse.cluster})]
    assert len(ports) == 2
    return [connect(settings.clickhouse.model_copy(update={"port": port})) for port in ports]


def test_migrations_make_replicated_tables_on_each_shard_and_distributed_tables_over_them(cluster):
    for server in shards(cluster):
        engines = dict(server.execute("SELECT name, engine FROM system.tables WHERE database = currentDatabase()"))
        assert engines["touchpoints_local"] == "ReplicatedReplacingMergeTree"
        assert engines["touchpoints"] == engines["indicator_cells"] == engines["journeys"] == "Distributed"
        assert engines["pipeline_owner_local"] == "ReplicatedMergeTree"
        assert engines["touchpoints_unique"] == engines["persons"] == "View"
        assert server.execute("SELECT count() FROM schema_migrations")[0][0] == len(
            {row[0] for row in server.execute("SELECT version FROM schema_migrations")})  # each recorded once
        # the column added by a later migration (0005) reaches the Distributed table too
        assert server.execute("SELECT count() FROM system.columns WHERE database = currentDatabase() "
                              "AND table = 'touchpoints' AND name = 'resolved_from'")[0][0] == 1
    assert initialise(cluster).migrations_applied == []  # again: nothing to do


def test_a_worker_writes_across_two_shards_and_bi_reads_exact_counts_from_either(cluster, tmp_path: Path):
    registry = open_registry(cluster.registry.url)
    publisher = TouchpointPublisher(cluster.kafka.bootstrap_servers, cluster.kafka.topic,
                                    TouchpointEncoder(registry, cluster.registry.subject, 1))
    events = traffic(3_000, start_ms=int(time.time() * 1000) - 120_000, seed=5)
    worker = WorkerProcess(cluster, tmp_path / "worker.log")
    first, second = shards(cluster)
    try:
        publisher.publish_many(events)
        publisher.publish_many(events[:300])  # the same events again: they must fold across the cluster
        publisher.flush()
        wait_until(lambda: all_windows_closed(first, cluster, events[-1]["event_time"]), 90, "all windows closed",
                   worker)
    finally:
        publisher.close()
        assert worker.stop() == 0, worker.log_tail()

    expected = reference.indicator_values(events, cluster.window.size_s * 1000)
    for server in (first, second):
        assert server.execute("SELECT count(), uniqExact(event_id) FROM touchpoints FINAL")[0] == (3_000, 3_000)
        assert server.execute("SELECT count() FROM touchpoints_unique")[0][0] == 3_000
        assert_values_equal(stored_values(server), expected)
        # the views that join persons' aliases read them across the cluster (GLOBAL JOIN)
        assert server.execute("SELECT sum(touchpoint_count) FROM persons")[0][0] == 3_000
        assert server.execute("SELECT count() FROM touchpoints_by_person")[0][0] == 3_000

    # The alerter (its lease, states and transitions in Distributed tables) judges what the workers stored.
    fired = assert_alerts_follow_the_rules(second, cluster, expected, events[-1]["event_time"])
    assert ("ux_error_rate_high", "bank", "MOBILE_APP") in fired

    on_shard = [server.execute("SELECT count() FROM touchpoints_local FINAL")[0][0] for server in (first, second)]
    assert min(on_shard) > 500 and sum(on_shard) == 3_000  # both shards hold rows, each row once
    cells = [set(server.execute("SELECT DISTINCT source_partition FROM indicator_cells_local"))
             for server in (first, second)]
    assert cells[0] and cells[1] and not cells[0] & cells[1]  # a Kafka partition's cells on one shard
    persons = [set(server.execute("SELECT DISTINCT person_id FROM role_transitions_local"))
               for server in (first, second)]
    assert persons[0] and persons[1] and not persons[0] & persons[1]  # a person's role changes together

    # Erasure deletes on every shard (ALTER ... ON CLUSTER on the local tables) and waits for all of them.
    # (A web visitor: an anonymous id of their own, linked to no one else.)
    [(visitor, rows)] = first.execute(
        "SELECT anonymous_id, count() FROM touchpoints FINAL WHERE anonymous_id != 'a-1' AND user_id IS NULL "
        "AND customer_id IS NULL GROUP BY anonymous_id ORDER BY count() DESC LIMIT 1")
    report = forget(cluster, f"anonymous_id:{visitor}", settle_s=0.5)
    assert report.rows_before >= rows > 0  # (before folding: the copies sent twice count twice)
    for server in (first, second):
        assert server.execute("SELECT count() FROM touchpoints FINAL WHERE anonymous_id = %(a)s",
                              {"a": visitor})[0][0] == 0
        assert server.execute("SELECT count() FROM touchpoints_unique")[0][0] == 3_000 - rows
