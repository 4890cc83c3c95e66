import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import fastavro
import pytest

from pipeline.contract.registry import FileSchemaRegistry, HttpSchemaRegistry, RegistryError, contract_schemas
from pipeline.contract.wire import FramingError, frame, unframe
from pipeline.core.decode import UNDECODABLE, UNKNOWN_SCHEMA, decode_batch
from pipeline.settings import SCHEMAS_DIR
from tests.factories import V1, V2, encode, schema_for, touchpoint


def test_frame_round_trip_keeps_schema_id_and_body():
    schema_id, body = unframe(frame(70000, b"avro"))
    assert schema_id == 70000 and bytes(body) == b"avro"


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x01\x00\x00\x00\x01xx"])
def test_unframe_rejects_short_or_wrong_magic(raw):
    with pytest.raises(FramingError):
        unframe(raw)


def test_every_field_of_the_contract_is_documented():
    for schema in contract_schemas():
        stack = [schema]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if node.get("type") == "record":
                    for field in node["fields"]:
                        assert field.get("doc"), f"{node['name']}.{field['name']} has no doc"
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


def test_v2_reader_reads_v1_records_and_v1_reader_reads_v2_records():
    event = touchpoint()
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, V1, event)
    as_v2 = fastavro.schemaless_reader(io.BytesIO(buffer.getvalue()), V1, V2)
    assert as_v2["sentiment"] is None and as_v2["event_id"] == event["event_id"]
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, V2, {**event, "sentiment": 0.5, "app_version": "1.2", "rage_clicks": 3})
    as_v1 = fastavro.schemaless_reader(io.BytesIO(buffer.getvalue()), V2, V1)
    assert "sentiment" not in as_v1 and as_v1["tenant"] == "bank"


def test_file_registry_ids_match_the_manifest():
    registry = FileSchemaRegistry(SCHEMAS_DIR / "registry.json")
    v1, v2, v3 = contract_schemas()
    assert registry.register("touchpoints-value", v1) == 1
    assert registry.register("touchpoints-value", v2) == 2
    assert registry.register("touchpoints-value", v3) == 3
    assert registry.latest("touchpoints-value")[0] == 3
    assert registry.version("touchpoints-value", 1) == (1, v1)
    assert registry.schema(99) is None
    with pytest.raises(RegistryError):
        registry.register("touchpoints-value", {**v1, "doc": "changed", "fields": v1["fields"][:3]})


def test_decode_batch_separates_good_from_bad_without_stopping():
    good_v1, good_v2 = encode(touchpoint("a")), encode({**touchpoint("b"), "sentiment": 0.1,
                                                          "app_version": None, "rage_clicks": None}, 2)
    values = [good_v1, b"junk", encode(touchpoint("c"), 1)[:-3], b"\x00\x00\x00\x00\x09" + b"\x02",
              good_v2, None]
    decoded = decode_batch(values, schema_for)
    assert [e["event_id"] for e in decoded.events] == ["a", "b"]
    assert decoded.schema_ids == [1, 2]
    reasons = {r.index: r.reason for r in decoded.rejections}
    assert reasons == {1: UNDECODABLE, 2: UNDECODABLE, 3: UNKNOWN_SCHEMA, 5: UNDECODABLE}


class _ConfluentApi(BaseHTTPRequestHandler):
    """Just the endpoints of the Confluent REST API the client calls, answering as the docs describe."""

    schemas: ClassVar[dict[int, str]] = {}

    def _reply(self, code: int, body: dict) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        for schema_id, text in self.schemas.items():
            if text == payload["schema"]:
                return self._reply(200, {"id": schema_id})
        schema_id = len(self.schemas) + 100
        self.schemas[schema_id] = payload["schema"]
        return self._reply(200, {"id": schema_id})

    def do_GET(self):
        if self.path.startswith("/schemas/ids/"):
            schema_id = int(self.path.rsplit("/", 1)[1])
            if schema_id in self.schemas:
                return self._reply(200, {"schema": self.schemas[schema_id]})
            return self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        if "/versions/" in self.path and self.schemas:
            ids = sorted(self.schemas)
            wanted = self.path.rsplit("/", 1)[1]
            chosen = ids[-1] if wanted == "latest" else ids[int(wanted) - 1] if int(wanted) <= len(ids) else None
            if chosen is not None:
                return self._reply(200, {"id": chosen, "version": ids.index(chosen) + 1,
                                         "schema": self.schemas[chosen]})
        return self._reply(404, {"error_code": 40401, "message": "Subject not found"})

    def log_message(self, *args):
        pass


def test_http_registry_client_speaks_the_confluent_api():
    server = HTTPServer(("127.0.0.1", 0), _ConfluentApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HttpSchemaRegistry(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(RegistryError):
            client.latest("touchpoints-value")
        v1, v2 = contract_schemas()[:2]
        first, second = client.register("touchpoints-value", v1), client.register("touchpoints-value", v2)
        assert first != second and client.register("touchpoints-value", v1) == first
        fresh = HttpSchemaRegistry(f"http://127.0.0.1:{server.server_port}")
        assert fresh.schema(second)["fields"][-1]["name"] == "rage_clicks"
        assert fresh.schema(12345) is None
        assert fresh.latest("touchpoints-value")[0] == second
        assert fresh.version("touchpoints-value", 1) == (first, v1)
        with pytest.raises(RegistryError):
            fresh.version("touchpoints-value", 7)
    finally:
        server.shutdown()
