"""Confluent wire format: byte 0 = 0 (magic), bytes 1-4 = schema id (big-endian), then the Avro body."""

from __future__ import annotations

import struct

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
HEADER_SIZE = HEADER.size


class FramingError(ValueError):
    """The bytes are not a Confluent-framed message."""


def frame(schema_id: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def unframe(message: bytes) -> tuple[int, memoryview]:
    """Split a framed message into (schema id, Avro body) without copying the body."""
    if message is None or len(message) < HEADER_SIZE:
        raise FramingError(f"message of {0 if message is None else len(message)} bytes is shorter than the "
                           f"{HEADER_SIZE}-byte Confluent header")
    magic, schema_id = HEADER.unpack_from(message)
    if magic != MAGIC_BYTE:
        raise FramingError(f"magic byte is {magic}, expected {MAGIC_BYTE}")
    return schema_id, memoryview(message)[HEADER_SIZE:]
