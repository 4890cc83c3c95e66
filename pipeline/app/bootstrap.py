"""`touchpoint init`: everything a deployment needs before workers start, idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.adapters.clickhouse import apply_migrations, claim_database
from pipeline.adapters.kafka import apply_topics
from pipeline.contract.registry import contract_schemas, open_registry
from pipeline.settings import Settings
from pipeline.topics import topic_specs


@dataclass(frozen=True, slots=True)
class InitReport:
    topics_created: list[str]
    topics_reconfigured: list[str]
    schema_ids: list[int]
    migrations_applied: list[str]


def initialise(settings: Settings) -> InitReport:
    kafka = settings.kafka
    created, reconfigured = apply_topics(kafka.bootstrap_servers, topic_specs(settings), kafka.replication_factor)
    registry = open_registry(settings.registry.url)
    ids = [registry.register(settings.registry.subject, schema) for schema in contract_schemas()]
    applied = apply_migrations(settings.clickhouse)
    claim_database(settings.clickhouse, kafka.consumer_group, kafka.topic)
    return InitReport(created, reconfigured, ids, [f"{m.version:04d}_{m.name}" for m in applied])
