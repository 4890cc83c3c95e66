"""Step 1, decode: Confluent-framed Avro bytes -> event dicts, a whole fetch at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import fastavro

from pipeline.contract.wire import FramingError, unframe

ParsedSchema = Any
SchemaLookup = Callable[[int], ParsedSchema | None]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one input record cannot go on; it goes to the dead-letter topic with this reason."""

    index: int
    reason: str  # short, stable code: a metric label and a header value
    detail: str  # human explanation for the operator


UNDECODABLE = "undecodable"
UNKNOWN_SCHEMA = "unknown_schema"


@dataclass(slots=True)
class DecodedBatch:
    indexes: list[int]  # position in the input of each decoded event
    events: list[dict[str, Any]]
    schema_ids: list[int]
    rejections: list[Rejection]


def decode_batch(values: Sequence[bytes | None], schema_for: SchemaLookup) -> DecodedBatch:
    """Decode every value; a bad one becomes a Rejection and never stops the others."""
    out = DecodedBatch([], [], [], [])
    reader = fastavro.schemaless_reader
    for index, value in enumerate(values):
        try:
            schema_id, body = unframe(value)  # type: ignore[arg-type]
        except FramingError as exc:
            out.rejections.append(Rejection(index, UNDECODABLE, str(exc)))
            continue
        schema = schema_for(schema_id)
        if schema is None:
            out.rejections.append(
                Rejection(index, UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the registry")
            )
            continue
        stream = BytesIO(body)
        try:
            event = reader(stream, schema, None)
        except Exception as exc:  # fastavro raises many types on corrupt bodies; all mean the same here
            out.rejections.append(Rejection(index, UNDECODABLE, f"Avro body does not match schema "
                                                               f"{schema_id}: {type(exc).__name__}: {exc}"))
            continue
        if stream.tell() != len(body):
            out.rejections.append(Rejection(index, UNDECODABLE, f"{len(body) - stream.tell()} trailing bytes "
                                                               f"after the Avro body (wrong schema id?)"))
            continue
        out.indexes.append(index)
        out.events.append(event)  # type: ignore[arg-type]  # a record schema reads as a dict
        out.schema_ids.append(schema_id)
    return out
