"""Step 1, decode: Confluent-framed Avro bytes -> event dicts, a whole fetch at a time."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import fastavro

from pipeline.contract.wire import HEADER_SIZE, MAGIC_BYTE, FramingError, unframe
from pipeline.core.avro_plan import Decoder, compile_decoder

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
    """Decode every value; a bad one becomes a Rejection and never stops the others. Each schema's compiled decoder
    (avro_plan) reads what it is sure of; every other record goes to fastavro, the reference, as before."""
    out = DecodedBatch([], [], [], [])
    indexes, events, schema_ids = out.indexes, out.events, out.schema_ids
    known_id, known_schema, known_decoder = -1, None, None  # the last schema id seen: a batch mostly has one
    for index, value in enumerate(values):
        if type(value) is bytes and len(value) > HEADER_SIZE and value[0] == MAGIC_BYTE:
            schema_id = _SCHEMA_ID(value, 1)[0]
            if schema_id != known_id:
                known_id, known_schema = schema_id, schema_for(schema_id)
                known_decoder = None if known_schema is None else _decoder_of(known_schema)
            if known_decoder is not None:
                try:
                    event = known_decoder(value, HEADER_SIZE)
                except Exception:  # not sure: fastavro decides, below
                    pass
                else:
                    indexes.append(index)
                    events.append(event)
                    schema_ids.append(schema_id)
                    continue
        _decode_with_fastavro(index, value, schema_for, out)
    return out


def decode_batch_with_fastavro(values: Sequence[bytes | None], schema_for: SchemaLookup) -> DecodedBatch:
    """decode_batch with fastavro alone: the reference the compiled decoders are held to, and the bench's yardstick."""
    out = DecodedBatch([], [], [], [])
    for index, value in enumerate(values):
        _decode_with_fastavro(index, value, schema_for, out)
    return out


def _decode_with_fastavro(index: int, value: bytes | None, schema_for: SchemaLookup, out: DecodedBatch) -> None:
    try:
        schema_id, body = unframe(value)  # type: ignore[arg-type]
    except FramingError as exc:
        out.rejections.append(Rejection(index, UNDECODABLE, str(exc)))
        return
    schema = schema_for(schema_id)
    if schema is None:
        out.rejections.append(Rejection(index, UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the registry"))
        return
    stream = BytesIO(body)
    try:
        event = fastavro.schemaless_reader(stream, schema, None)
    except Exception as exc:  # fastavro raises many types on corrupt bodies; all mean the same here
        out.rejections.append(Rejection(index, UNDECODABLE, f"Avro body does not match schema "
                                                           f"{schema_id}: {type(exc).__name__}: {exc}"))
        return
    if stream.tell() != len(body):
        out.rejections.append(Rejection(index, UNDECODABLE, f"{len(body) - stream.tell()} trailing bytes "
                                                           f"after the Avro body (wrong schema id?)"))
        return
    out.indexes.append(index)
    out.events.append(event)  # type: ignore[arg-type]  # a record schema reads as a dict
    out.schema_ids.append(schema_id)


_SCHEMA_ID = struct.Struct(">I").unpack_from
# Compiled decoders by schema object (the registry hands out one parsed schema per id); bounded, in case a caller
# builds a new schema object per lookup.
_DECODERS: dict[int, tuple[ParsedSchema, Decoder | None]] = {}


def _decoder_of(schema: ParsedSchema) -> Decoder | None:
    found = _DECODERS.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    if len(_DECODERS) >= 64:
        _DECODERS.clear()
    decoder = compile_decoder(schema)
    _DECODERS[id(schema)] = (schema, decoder)
    return decoder
