"""Every Kafka topic the project creates and the settings production needs, stated once; `touchpoint init`
creates the missing topics with them and sets them on topics that exist (pipeline/adapters/kafka.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.settings import Settings

HOUR_MS = 3_600_000
DEAD_LETTER_HEADROOM_BYTES = 64 * 1024  # the reason, source offset and headers a dead letter adds to the record


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def identity_changelog_topic(settings: Settings) -> str:
    """Faust names a table's changelog `<app id>-<table>-changelog`; the app id is the consumer group."""
    return f"{settings.kafka.consumer_group}-{settings.identity.table}-changelog"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    kafka = settings.kafka
    return [
        # Touchpoints are a stream: kept for the replay horizon, then deleted.
        TopicSpec(kafka.topic, kafka.partitions, {
            "cleanup.policy": "delete",
            "retention.ms": str(int(kafka.retention_hours * HOUR_MS)),
            "max.message.bytes": str(kafka.max_message_bytes),
        }),
        # Dead letters wait for an operator longer, and any record the touchpoint topic took fits with its reason.
        TopicSpec(kafka.dead_letter_topic, 1, {
            "cleanup.policy": "delete",
            "retention.ms": str(int(kafka.dead_letter_retention_days * 24 * HOUR_MS)),
            "max.message.bytes": str(kafka.max_message_bytes + DEAD_LETTER_HEADROOM_BYTES),
        }),
        # The identity log (pipeline/adapters/identity_log.py): state keyed per operation, never expired, compacted.
        TopicSpec(identity_changelog_topic(settings), 1, {
            "cleanup.policy": "compact",
            "retention.ms": "-1",
        }),
    ]
