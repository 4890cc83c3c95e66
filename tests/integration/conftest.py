"""Fixtures for tests on the real local stack: each test gets its own topic, consumer group and database,
and real `touchpoint worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.adapters.clickhouse import connect
from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
from pipeline.app.bootstrap import initialise
from pipeline.contract.registry import open_registry
from pipeline.settings import Settings, to_env


def isolated_settings(stack_settings: Settings, run: str) -> Settings:
    """The stack's settings with a topic, group and database of this run's own, and short windows."""
    settings = stack_settings.model_copy(deep=True)
    settings.kafka.topic = f"it-{run}"
    settings.kafka.dead_letter_topic = f"it-{run}.deadletter"
    settings.kafka.consumer_group = f"it-{run}"
    settings.kafka.partitions = 4
    settings.clickhouse.database = f"it_{run}"
    settings.metrics_port = 0
    settings.window.size_s = 10
    settings.window.allowed_lateness_s = 2
    settings.window.idle_close_s = 1
    settings.batch.max_events = 2_000
    settings.batch.max_wait_s = 0.2
    return settings


@pytest.fixture
def isolated(stack_settings: Settings) -> Iterator[Settings]:
    settings = isolated_settings(stack_settings, uuid.uuid4().hex[:8])
    initialise(settings)
    yield settings
    connect(settings.clickhouse, database="default").execute(f"DROP DATABASE IF EXISTS {settings.clickhouse.database}")


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.app.cli", "worker"], stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, **to_env(settings)})

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-40:])


@pytest.fixture
def start_worker(isolated: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings | None = None) -> WorkerProcess:
        worker = WorkerProcess(settings or isolated, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def publisher(isolated: Settings) -> Iterator[TouchpointPublisher]:
    registry = open_registry(isolated.registry.url)
    publisher = TouchpointPublisher(isolated.kafka.bootstrap_servers, isolated.kafka.topic,
                                    TouchpointEncoder(registry, isolated.registry.subject, 1))
    yield publisher
    publisher.close()


@pytest.fixture
def ch(isolated: Settings) -> Any:
    client = connect(isolated.clickhouse)
    yield client
    client.disconnect()


def is_apache_kafka(settings: Settings) -> bool:
    """Apache Kafka reports every setting of a topic (segment.ms among them); Tansu only those it was given."""
    from pipeline.adapters.kafka import topic_configs

    configs = topic_configs(settings.kafka.bootstrap_servers, [settings.kafka.topic]).get(settings.kafka.topic)
    return "segment.ms" in (configs or {})


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, worker: WorkerProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"worker exited with {worker.process.returncode} while waiting for {what}:\n"
                        f"{worker.log_tail()}")
        time.sleep(0.2)
    tail = f"\nworker log:\n{worker.log_tail()}" if worker else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r}){tail}")


def read_topic(settings: Settings, topic: str, partitions: int, expected: int, timeout_s: float = 30) -> list[Any]:
    """Every record of a topic, read with a manually assigned kafka-python consumer (no group on Tansu)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=1_000)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(consumer)
    consumer.close()
    return records
