"""What goes to the dead-letter topic for a rejected record: its original bytes and the reason, or, when the
record is too large for the broker to take again with headers, the reason, its size and where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.processor import DeadLetter

# Room kept for the record's key, headers and the broker's per-record overhead under the producer's size limit.
HEADROOM_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter_message(dead: DeadLetter, source_topic: str, max_message_bytes: int) -> DeadLetterMessage:
    """The message for a dead letter. A record whose bytes cannot be carried (over the limit) still gets a dead
    letter, without its value: a dead letter the broker refused would stop the partition for good."""
    record = dead.record
    value: bytes | None = record.value
    size = len(value) if value is not None else 0
    headers = [("reason", dead.reason.encode()), ("detail", dead.detail.encode()), ("channel", dead.channel.encode()),
               ("source.topic", source_topic.encode()), ("source.partition", str(record.partition).encode()),
               ("source.offset", str(record.offset).encode()), ("source.size", str(size).encode())]
    key = record.key
    if size + len(key or b"") > max_message_bytes - HEADROOM_BYTES:
        headers.append(("payload", b"omitted: larger than the dead-letter topic takes; read it at the source offset"))
        value = None
        if key is not None and len(key) > HEADROOM_BYTES // 2:
            key = None
    return DeadLetterMessage(key, value, headers)
