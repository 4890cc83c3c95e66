"""A decoder compiled from one Avro schema: the schema's fields read in straight-line Python, no per-field lookups.

fastavro interprets the schema for every value it reads; this reads a touchpoint about twice as fast by turning the
schema into one function once. It is a fast path only: whatever it is not sure to read exactly as fastavro does (a
truncated or corrupt body, an index out of range, a boolean byte other than 0 or 1, a varint longer than 9 bytes,
an int outside 32 bits, invalid UTF-8, trailing bytes) raises, and decode.decode_batch then asks fastavro, the
reference, for that record. A schema with a type it does not know gets no compiled decoder at all.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import fastavro

Decoder = Callable[[bytes, int], dict[str, Any]]  # (buffer, start of the body) -> the record; raises when unsure

_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class NotExact(ValueError):
    """A value the compiled decoder leaves to fastavro."""


class Unsupported(ValueError):
    """A schema the compiled decoder cannot read."""


def _varint(buf: bytes, pos: int, first: int) -> tuple[int, int]:
    """The unsigned varint that starts with byte `first` (continuation bit set) and goes on at pos."""
    value, shift = first & 0x7F, 7
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 56:  # a tenth byte: past 63 bits, where fastavro's 64-bit arithmetic is the reference
            raise NotExact("varint longer than 9 bytes")


class _Writer:
    """Python source of one decoder, built field by field."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self.names = 0
        self.depth = 0

    def local(self) -> str:
        self.names += 1
        return f"v{self.names}"

    def constant(self, value: Any) -> str:
        name = f"c{len(self.constants)}"
        self.constants[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def long(self, indent: int, target: str) -> None:
        self.emit(indent, "x = b[p]; p += 1")
        self.emit(indent, "if x & 0x80: x, p = _varint(b, p, x)")
        self.emit(indent, f"{target} = (x >> 1) ^ -(x & 1)")

    def read(self, schema: Any, indent: int, target: str) -> None:  # noqa: C901 (one branch per Avro type)
        """Lines that read one value of `schema` at p into the local `target`."""
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, dict) and "logicalType" in schema:
            raise Unsupported("logical types (fastavro converts them)")
        kind = schema if isinstance(schema, str) else "union" if isinstance(schema, list) else schema.get("type")
        if isinstance(kind, (dict, list)):  # {"type": {...}}: a nested type
            self.read(kind, indent, target)
            return
        if kind == "null":
            self.emit(indent, f"{target} = None")
        elif kind == "boolean":
            self.emit(indent, "x = b[p]; p += 1")
            self.emit(indent, "if x > 1: raise NotExact('boolean byte')")
            self.emit(indent, f"{target} = x == 1")
        elif kind == "long":
            self.long(indent, target)
        elif kind == "int":
            self.long(indent, target)
            self.emit(indent, f"if not {_INT_MIN} <= {target} <= {_INT_MAX}: raise NotExact('int range')")
        elif kind == "double":
            self.emit(indent, f"{target} = _double(b, p)[0]; p += 8")
        elif kind == "float":
            self.emit(indent, f"{target} = _float(b, p)[0]; p += 4")
        elif kind in ("string", "bytes"):
            self.emit(indent, "x = b[p]; p += 1")
            self.emit(indent, "if x & 0x80: x, p = _varint(b, p, x)")
            self.emit(indent, "n = x >> 1")  # the length; an odd x (zigzag) would be negative
            self.emit(indent, "if x & 1 or p + n > end: raise NotExact('length')")
            self.emit(indent, f"{target} = b[p:p + n]{'.decode()' if kind == 'string' else ''}; p += n")
        elif kind == "enum":
            symbols = self.constant(tuple(schema["symbols"]))
            if len(schema["symbols"]) > 64:
                raise Unsupported("an enum of more than 64 symbols")
            # An index is one byte, 2 x index (zigzag): a longer or negative one goes to fastavro.
            self.emit(indent, "x = b[p]; p += 1")
            self.emit(indent, "if x & 0x81: raise NotExact('enum index')")
            self.emit(indent, f"{target} = {symbols}[x >> 1]")
        elif kind == "union":
            if len(schema) > 64:
                raise Unsupported("a union of more than 64 branches")
            self.emit(indent, "x = b[p]; p += 1")  # the branch index, one byte as for enums
            for index, branch in enumerate(schema):
                self.emit(indent, f"{'if' if index == 0 else 'elif'} x == {2 * index}:")
                self.read(branch, indent + 1, target)
            self.emit(indent, "else: raise NotExact('union index')")
        elif kind == "record":
            self.depth += 1
            if self.depth > 8:
                raise Unsupported("records nested too deep (a recursive schema?)")
            fields = []
            for field in schema["fields"]:
                local = self.local()
                self.read(field["type"], indent, local)
                fields.append(f"{field['name']!r}: {local}")
            self.emit(indent, f"{target} = {{{', '.join(fields)}}}")
            self.depth -= 1
        elif kind in ("map", "array"):
            is_map = kind == "map"
            items, count, item = self.local(), self.local(), self.local()
            self.emit(indent, f"{items} = {{}}" if is_map else f"{items} = []")
            self.long(indent, count)
            self.emit(indent, f"while {count}:")
            self.emit(indent + 1, f"if {count} < 0: raise NotExact('block with a size')")
            self.emit(indent + 1, f"for _ in range({count}):")
            if is_map:
                key = self.local()
                self.read("string", indent + 2, key)
                self.read(schema["values"], indent + 2, item)
                self.emit(indent + 2, f"{items}[{key}] = {item}")
            else:
                self.read(schema["items"], indent + 2, item)
                self.emit(indent + 2, f"{items}.append({item})")
            self.long(indent + 1, count)
            self.emit(indent, f"{target} = {items}")
        else:
            raise Unsupported(f"Avro type {kind!r}")


def compile_decoder(schema: Any) -> Decoder | None:
    """The compiled decoder of a parsed schema (fastavro.parse_schema), or None when it has a type this cannot read.
    The decoder reads one body from `start` to the end of the buffer and raises when anything is not exactly as
    fastavro would read it."""
    if not isinstance(schema, dict) or "__named_schemas" not in schema:
        schema = fastavro.parse_schema(schema)  # as fastavro's reader does with a schema not parsed yet
    writer = _Writer(schema["__named_schemas"])
    try:
        writer.read(schema, 1, "record")
    except Unsupported:
        return None
    source = "\n".join(["def decode(b, p):", "    end = len(b)", *writer.lines,
                        "    if p != end: raise NotExact('trailing bytes')",
                        "    return record"])
    scope: dict[str, Any] = {"_varint": _varint, "_double": _DOUBLE, "_float": _FLOAT, "NotExact": NotExact,
                             **writer.constants}
    exec(compile(source, "<avro decoder>", "exec"), scope)  # the source holds no text of the schema but repr()s
    decoder: Decoder = scope["decode"]
    return decoder
