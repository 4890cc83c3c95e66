"""`touchpoint init`: everything a deployment needs before workers start, idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.adapters.clickhouse import apply_migrations, claim_database
from pipeline.adapters.identity_log import changelog_topic
from pipeline.adapters.kafka import ensure_topics
from pipeline.contract.registry import contract_schemas, open_registry
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class InitReport:
    topics_created: list[str]
    schema_ids: list[int]
    migrations_applied: list[str]


def initialise(settings: Settings) -> InitReport:
    kafka = settings.kafka
    created = ensure_topics(kafka.bootstrap_servers, {kafka.topic: kafka.partitions, kafka.dead_letter_topic: 1},
                            kafka.replication_factor)
    # The identity table's changelog, as Faust would create it: one partition, compacted.
    created += ensure_topics(kafka.bootstrap_servers, {changelog_topic(settings): 1}, kafka.replication_factor,
                             config={"cleanup.policy": "compact"})
    registry = open_registry(settings.registry.url)
    ids = [registry.register(settings.registry.subject, schema) for schema in contract_schemas()]
    applied = apply_migrations(settings.clickhouse)
    claim_database(settings.clickhouse, kafka.consumer_group, kafka.topic)
    return InitReport(created, ids, [f"{m.version:04d}_{m.name}" for m in applied])
