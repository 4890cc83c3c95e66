"""Schema registries behind one small interface: a file-backed one for the local stack, and a client for a
Confluent-compatible registry over HTTP for production."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import fastavro

from pipeline.settings import SCHEMAS_DIR

Schema = dict[str, Any]


class RegistryError(RuntimeError):
    """The registry could not answer (unreachable, unknown subject, rejected schema)."""


class SchemaRegistry(Protocol):
    def schema(self, schema_id: int) -> Schema | None:
        """The writer schema with this id, or None when the registry does not know it."""

    def register(self, subject: str, schema: Schema) -> int:
        """Register (idempotently) and return the schema id."""

    def latest(self, subject: str) -> tuple[int, Schema]:
        """The newest (id, schema) registered under the subject."""

    def version(self, subject: str, version: int) -> tuple[int, Schema]:
        """(id, schema) of one version of the subject; ids are the registry's, versions the subject's."""


def load_schema_file(path: Path) -> Schema:
    return json.loads(path.read_text())


def canonical(schema: Schema) -> str:
    """The Parsing Canonical Form, so the same schema written differently registers once."""
    return json.dumps(fastavro.schema.to_parsing_canonical_form(schema), sort_keys=True)


class FileSchemaRegistry:
    """Schemas listed in a JSON manifest (schemas/registry.json): ids are fixed by the file, so every
    producer and worker of the local stack agrees on them without a server."""

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest
        self._entries: list[dict[str, Any]] = []
        self._schemas: dict[int, Schema] = {}
        self._load()

    def _load(self) -> None:
        if not self.manifest.exists():
            raise RegistryError(f"schema manifest {self.manifest} does not exist")
        data = json.loads(self.manifest.read_text())
        self._entries = list(data.get("schemas", []))
        self._schemas = {
            int(e["id"]): load_schema_file(self.manifest.parent / e["file"]) for e in self._entries
        }

    def schema(self, schema_id: int) -> Schema | None:
        return self._schemas.get(schema_id)

    def register(self, subject: str, schema: Schema) -> int:
        wanted = canonical(schema)
        for entry in self._entries:
            if entry["subject"] == subject and canonical(self._schemas[int(entry["id"])]) == wanted:
                return int(entry["id"])
        raise RegistryError(
            f"the file registry is read-only: add the schema to {self.manifest} under subject {subject!r}"
        )

    def latest(self, subject: str) -> tuple[int, Schema]:
        entries = [e for e in self._entries if e["subject"] == subject]
        if not entries:
            raise RegistryError(f"no schema registered under subject {subject!r} in {self.manifest}")
        newest = max(entries, key=lambda e: int(e["version"]))
        return int(newest["id"]), self._schemas[int(newest["id"])]

    def version(self, subject: str, version: int) -> tuple[int, Schema]:
        for entry in self._entries:
            if entry["subject"] == subject and int(entry["version"]) == version:
                return int(entry["id"]), self._schemas[int(entry["id"])]
        raise RegistryError(f"subject {subject!r} has no version {version} in {self.manifest}")


class HttpSchemaRegistry:
    """Client for the Confluent Schema Registry REST API (also served by Karapace, Redpanda, Apicurio)."""

    CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._by_id: dict[int, Schema] = {}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": self.CONTENT_TYPE, "Accept": self.CONTENT_TYPE},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            if exc.code == 404:
                return None
            raise RegistryError(f"{method} {self.url}{path} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError) as exc:
            raise RegistryError(f"{method} {self.url}{path} failed: {exc}") from exc

    def schema(self, schema_id: int) -> Schema | None:
        if schema_id not in self._by_id:
            answer = self._call("GET", f"/schemas/ids/{schema_id}")
            if answer is None:
                return None
            self._by_id[schema_id] = json.loads(answer["schema"])
        return self._by_id[schema_id]

    def register(self, subject: str, schema: Schema) -> int:
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        answer = self._call("POST", path, {"schema": json.dumps(schema)})
        if answer is None:
            raise RegistryError(f"registry at {self.url} has no endpoint {path}")
        schema_id = int(answer["id"])
        self._by_id[schema_id] = schema
        return schema_id

    def latest(self, subject: str) -> tuple[int, Schema]:
        return self._subject_version(subject, "latest")

    def version(self, subject: str, version: int) -> tuple[int, Schema]:
        return self._subject_version(subject, str(version))

    def _subject_version(self, subject: str, version: str) -> tuple[int, Schema]:
        answer = self._call("GET", f"/subjects/{urllib.parse.quote(subject, safe='')}/versions/{version}")
        if answer is None:
            raise RegistryError(f"subject {subject!r} has no version {version} at {self.url}")
        schema = json.loads(answer["schema"])
        self._by_id[int(answer["id"])] = schema
        return int(answer["id"]), schema


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(v) for v in node]
    return node


def parse_for_decoding(schema: Schema) -> Any:
    """Parsed schema whose timestamps decode as epoch milliseconds (ints), not datetimes: the core works in
    milliseconds, and skipping the conversion is faster."""
    return fastavro.parse_schema(_without_logical_types(schema))


def open_registry(url: str) -> SchemaRegistry:
    if url.startswith("file://"):
        return FileSchemaRegistry(Path(url.removeprefix("file://")))
    if url.startswith(("http://", "https://")):
        return HttpSchemaRegistry(url)
    raise RegistryError(f"registry url {url!r} must start with file://, http:// or https://")


def contract_schemas() -> list[Schema]:
    """The touchpoint schemas this release ships, oldest first, as `touchpoint init` registers them."""
    files = sorted(SCHEMAS_DIR.glob("touchpoint.v*.avsc"))
    if not files:
        raise RegistryError(f"no touchpoint.v*.avsc in {SCHEMAS_DIR}: the schemas are missing from this install")
    return [load_schema_file(p) for p in files]
