"""`touchpoint publish` checks the whole file before sending: sizes and encodings are bad lines by number."""

import json

import pytest

from pipeline.adapters.kafka import TouchpointEncoder, read_jsonl
from pipeline.contract.registry import open_registry
from pipeline.generate.scenarios import generate
from pipeline.settings import Settings

NOW_MS = 1_767_225_600_000


@pytest.fixture
def encoder():
    settings = Settings()
    return TouchpointEncoder(open_registry(settings.registry.url), settings.registry.subject)


def events(count):
    return list(generate("mixed", count, seed=3, start_ms=NOW_MS - 60_000, events_per_s=100, schema_version=3))


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_binary_garbage_is_a_numbered_bad_line_not_a_decode_error(tmp_path, encoder):
    good = [json.dumps(e).encode() for e in events(3)]
    path = write_lines(tmp_path / "t.jsonl", [good[0], b"\x00\xff\xfe\x9c binary \xe0\x80", good[1], good[2]])
    accepted, bad = read_jsonl(path, encoder, NOW_MS, 300_000)
    assert [n for n, _ in accepted] == [1, 3, 4]
    assert [(b.line_number, b.reason.split(":")[0]) for b in bad] == [(2, "not UTF-8 text")]
    assert "column 2" in bad[0].reason


def test_a_10_mb_line_is_reported_by_number_and_the_lines_after_it_are_read(tmp_path, encoder):
    sample = events(3)
    huge = dict(sample[1], attributes={"blob": "x" * 10_000_000})
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(e).encode() for e in (sample[0], huge, sample[2])])
    accepted, bad = read_jsonl(path, encoder, NOW_MS, 300_000, max_record_bytes=1_048_576)
    assert [n for n, _ in accepted] == [1, 3]
    assert [b.line_number for b in bad] == [2] and "10,000," in bad[0].reason


def test_a_record_over_the_broker_limit_is_a_bad_line_before_sending(tmp_path, encoder):
    sample = events(2)
    big = dict(sample[0], attributes={"blob": "y" * 1_100_000})  # under 4x the limit as JSON, over it as Avro
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(big).encode(), json.dumps(sample[1]).encode()])
    accepted, bad = read_jsonl(path, encoder, NOW_MS, 300_000, max_record_bytes=1_048_576)
    assert [n for n, _ in accepted] == [2]
    assert [b.line_number for b in bad] == [1] and "kafka.max_message_bytes" in bad[0].reason
