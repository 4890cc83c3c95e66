"""The compiled Avro decoder reads exactly what fastavro, the reference decoder, reads, and leaves it the rest."""

import io
import re
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contract.registry import contract_schemas, parse_for_decoding
from pipeline.contract.wire import frame
from pipeline.core import decode
from pipeline.core.avro_plan import NotExact, compile_decoder
from pipeline.core.decode import decode_batch, decode_batch_with_fastavro
from tests.factories import encode, schema_for, touchpoint

SCHEMAS = {i + 1: parse_for_decoding(s) for i, s in enumerate(contract_schemas())}


def _values(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Any value of an Avro type, large numbers and odd text included."""
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    kind = schema if isinstance(schema, str) else "union" if isinstance(schema, list) else schema["type"]
    if isinstance(kind, (dict, list)):
        return _values(kind, named)
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "int":
        return st.integers(-(2**31), 2**31 - 1)
    if kind == "long":
        return st.integers(-(2**63), 2**63 - 1)
    if kind == "double":
        return st.floats(allow_nan=False)
    if kind == "string":
        return st.text(max_size=12)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "union":
        return st.one_of(*(_values(branch, named) for branch in schema))
    if kind == "map":
        return st.dictionaries(st.text(max_size=6), _values(schema["values"], named), max_size=4)
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: _values(f["type"], named) for f in schema["fields"]})
    raise AssertionError(f"no strategy for {kind}")


def _reference(values: list[bytes | None], monkeypatch: pytest.MonkeyPatch) -> decode.DecodedBatch:
    return decode_batch_with_fastavro(values, SCHEMAS.get)


def _same(ours: decode.DecodedBatch, reference: decode.DecodedBatch) -> None:
    assert ours.indexes == reference.indexes and ours.schema_ids == reference.schema_ids
    assert [repr(e) for e in ours.events] == [repr(e) for e in reference.events]  # key order and value types too

    def detail(text: str) -> str:
        return re.sub(r"0x[0-9a-f]+", "0x", text)  # fastavro names its stream object in some messages

    assert ([(r.index, r.reason, detail(r.detail)) for r in ours.rejections]
            == [(r.index, r.reason, detail(r.detail)) for r in reference.rejections])


@pytest.mark.parametrize("schema_id", sorted(SCHEMAS))
def test_every_contract_schema_gets_a_compiled_decoder(schema_id):
    decoder = compile_decoder(SCHEMAS[schema_id])
    assert decoder is not None
    event = touchpoint(survey={"kind": "NPS", "score": 9, "scale_min": 0, "scale_max": 10, "about_channel": None},
                       attributes={"results": "0", "query": "fees"})
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, SCHEMAS[schema_id], event)
    value = frame(schema_id, buffer.getvalue())
    assert decoder(value, 5) == fastavro.schemaless_reader(io.BytesIO(value[5:]), schema_for(schema_id), None)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_decoded_records_equal_fastavros(data):
    schema_id = data.draw(st.sampled_from(sorted(SCHEMAS)))
    schema = SCHEMAS[schema_id]
    records = data.draw(st.lists(_values(schema, schema["__named_schemas"]), min_size=1, max_size=5))
    values: list[bytes | None] = []
    for record in records:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, record)
        values.append(frame(schema_id, buffer.getvalue()))
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = _reference(values, monkeypatch)
    ours = decode_batch(values, SCHEMAS.get)
    _same(ours, reference)
    assert not ours.rejections


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupt_records_get_fastavros_verdict(data):
    """Flipped, cut, appended and reframed bytes: whatever fastavro makes of them, decode_batch makes of them."""
    event = touchpoint(event_type="contact", channel="CHATBOT", journey_id="case-1",
                       contact={"queue_ms": 1_000, "handle_ms": 2_000, "first_response_ms": 500, "resolved": True,
                                "escalated": False, "agent_id": "a"}, attributes={"k": "v"})
    values: list[bytes | None] = []
    for _ in range(data.draw(st.integers(1, 6))):
        raw = bytearray(encode(event, data.draw(st.sampled_from([1, 2]))))
        for _ in range(data.draw(st.integers(0, 3))):
            action = data.draw(st.sampled_from(["set", "cut", "append", "schema", "none"]))
            if action == "set" and raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            elif action == "cut":
                raw = raw[:data.draw(st.integers(0, len(raw)))]
            elif action == "append":
                raw += data.draw(st.binary(min_size=1, max_size=3))
            elif action == "schema" and len(raw) >= 5:
                raw[1:5] = data.draw(st.sampled_from([b"\x00\x00\x00\x03", b"\x00\x00\x00\x09"]))
        values.append(None if data.draw(st.integers(0, 20)) == 0 else bytes(raw))
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = _reference(values, monkeypatch)
    _same(decode_batch(values, SCHEMAS.get), reference)


def test_what_the_compiled_decoder_is_unsure_of_is_left_to_fastavro():
    schema = SCHEMAS[1]
    decoder = compile_decoder(schema)
    assert decoder is not None
    value = encode(touchpoint(), 1)
    with pytest.raises(NotExact):
        decoder(value + b"\x00", 5)  # trailing bytes
    with pytest.raises(IndexError):
        decoder(value[:-1], 5)  # cut short
    fixed = {"type": "record", "name": "F", "fields": [{"name": "f", "type": {"type": "fixed", "name": "X",
                                                                              "size": 2}}]}
    assert compile_decoder(fastavro.parse_schema(fixed)) is None  # an unknown type: fastavro reads it all
    timestamp = {"type": "record", "name": "T", "fields": [{"name": "t", "type": {"type": "long",
                                                                                "logicalType": "timestamp-millis"}}]}
    assert compile_decoder(fastavro.parse_schema(timestamp)) is None  # fastavro would make it a datetime


@pytest.mark.parametrize("body, why", [
    (b"\x02\x00", "boolean byte"),  # fastavro reads any non-zero byte as true; the plan leaves that to it
    (b"\x01\x80\x80\x80\x80\x10", "int range"),
])
def test_the_compiled_decoder_leaves_bytes_fastavro_reads_leniently_to_fastavro(body: bytes, why: str) -> None:
    schema = fastavro.parse_schema({"type": "record", "name": "Probe",
                                    "fields": [{"name": "flag", "type": "boolean"}, {"name": "n", "type": "int"}]})
    decoder = compile_decoder(schema)
    assert decoder is not None
    for flag in (b"\x00", b"\x01"):
        exact = flag + b"\x02"
        assert decoder(exact, 0) == fastavro.schemaless_reader(io.BytesIO(exact), schema)
    with pytest.raises(NotExact, match=why):
        decoder(body, 0)
