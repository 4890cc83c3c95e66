"""Webhook mappings: a declarative file per source that turns a third-party JSON payload into touchpoints.
Plain Python (no I/O besides loading the files).

A mapping (TOML, `<source>.toml`) has:
  source, doc          the name in POST /v1/webhooks/{source}, and what the payload is
  for_each = "path"    optional: one touchpoint per element of this list (the element is `item.` in paths)
  where = {path = value or [values]}   optional: keep only payloads (or elements) that match; others are ignored
  [touchpoint]         contract field (dotted for nested: identifiers.user_id, survey.score) = value spec

A value spec is a literal (a number, a boolean, or a string without braces), a template string
("{event_id}:{item.field.id}") or a table:
  path = "a.b.0.c" (or a list: the first present wins), template = "...", value = literal,
  cases = [{if = {path = value or [values]}, value = ...}, ...] (the first that matches),
  default = what to use when nothing is found, lower = true (lower-case before `map`),
  map = {from = to} (a value not in the map becomes the default),
  as = "string" | "int" | "float" | "bool" | "timestamp_ms" | "sha256".
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

MAPPING_FAILED = "mapping_failed"
SHIPPED_DIR = Path(__file__).resolve().parent / "webhooks"
_TEMPLATE_FIELD = re.compile(r"\{([^{}]+)\}")
_SPEC_KEYS = {"path", "template", "value", "cases", "default", "lower", "map", "as"}
_CONVERSIONS = {"string", "int", "float", "bool", "timestamp_ms", "sha256"}


class MappingError(ValueError):
    """A mapping file is wrong; the message names the file and the field."""


class ValueProblem(ValueError):
    """A payload value cannot become its contract field (a date that does not parse, a word for a number)."""


_MISSING = object()


def lookup(payload: Any, item: Any, path: str) -> Any:
    """The value at a dotted path (`item.` = the for_each element), or None."""
    node: Any = payload
    parts = path.split(".")
    if parts[0] == "item":
        node, parts = item, parts[1:]
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is None:
            return None
    return node


def _render(template: str, payload: Any, item: Any) -> str | None:
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        value = lookup(payload, item, match.group(1).strip())
        if value is None or isinstance(value, dict | list):
            missing = True
            return ""
        return str(value).lower() if isinstance(value, bool) else str(value)

    text = _TEMPLATE_FIELD.sub(one, template)
    return None if missing else text


def _matches(condition: dict[str, Any], payload: Any, item: Any) -> bool:
    for path, wanted in condition.items():
        value = lookup(payload, item, path)
        options = wanted if isinstance(wanted, list) else [wanted]
        if isinstance(value, str):
            if value.lower() not in {o.lower() if isinstance(o, str) else o for o in options}:
                return False
        elif value not in options:
            return False
    return True


def _timestamp_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueProblem(f"{value!r} is not a time")
    if isinstance(value, int | float):
        return int(value * 1000) if value < 100_000_000_000 else int(value)  # seconds or milliseconds
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError as exc:
            raise ValueProblem(f"{value!r} is not an ISO 8601 time") from exc
        if parsed.tzinfo is None:
            raise ValueProblem(f"{value!r} has no time zone")
        return int(parsed.timestamp() * 1000)
    raise ValueProblem(f"{value!r} is not a time")


def _convert(value: Any, kind: str) -> Any:
    try:
        if kind == "string":
            return str(value).lower() if isinstance(value, bool) else str(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueProblem(f"{value!r} is not a number")
            number = float(value)
            if number != int(number):
                raise ValueProblem(f"{value!r} is not a whole number")
            return int(number)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueProblem(f"{value!r} is not a number")
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "yes", "1", "y")
            return bool(value)
        if kind == "timestamp_ms":
            return _timestamp_ms(value)
        if kind == "sha256":
            return hashlib.sha256(str(value).strip().lower().encode()).hexdigest()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueProblem):
            raise
        raise ValueProblem(f"{value!r} cannot be read as {kind}") from exc
    raise ValueProblem(f"unknown conversion {kind!r}")


@dataclass(frozen=True, slots=True)
class FieldRule:
    field: str
    spec: Any

    def value(self, payload: Any, item: Any) -> Any:
        spec = self.spec
        if not isinstance(spec, dict):
            return _render(spec, payload, item) if isinstance(spec, str) and "{" in spec else spec
        found: Any = None
        if "path" in spec:
            for path in spec["path"] if isinstance(spec["path"], list) else [spec["path"]]:
                found = lookup(payload, item, path)
                if isinstance(found, dict | list):
                    found = None  # a field takes a single value; objects and lists count as absent
                if found is not None:
                    break
        elif "template" in spec:
            found = _render(spec["template"], payload, item)
        elif "value" in spec:
            found = spec["value"]
        elif "cases" in spec:
            found = next((case["value"] for case in spec["cases"] if _matches(case["if"], payload, item)), None)
        if found is None:
            found = spec.get("default")
        if found is not None and spec.get("lower") and isinstance(found, str):
            found = found.lower()
        if found is not None and "map" in spec:
            key = str(found).lower() if isinstance(found, bool) else str(found)
            found = spec["map"].get(key, spec.get("default"))
        if found is not None and "as" in spec:
            found = _convert(found, spec["as"])
        return found


@dataclass(frozen=True, slots=True)
class WebhookMapping:
    source: str
    doc: str
    rules: tuple[FieldRule, ...]
    for_each: str | None = None
    where: dict[str, Any] | None = None

    def touchpoints(self, payload: Any) -> list[dict[str, Any] | tuple[str, str]]:
        """One touchpoint per payload (or per matching element); a touchpoint whose values do not convert is a
        (reason, detail) pair instead, so the others still go on."""
        if self.for_each is None:
            items: Iterable[Any] = [None]
        else:
            found = lookup(payload, None, self.for_each)
            items = found if isinstance(found, list) else []
        out: list[dict[str, Any] | tuple[str, str]] = []
        for item in items:
            if self.where and not _matches(self.where, payload, item):
                continue
            try:
                out.append(self._one(payload, item))
            except ValueProblem as exc:
                out.append((MAPPING_FAILED, f"{self.source}: {exc}"))
        return out

    def _one(self, payload: Any, item: Any) -> dict[str, Any]:
        event: dict[str, Any] = {}
        for rule in self.rules:
            try:
                value = rule.value(payload, item)
            except ValueProblem as exc:
                raise ValueProblem(f"{rule.field}: {exc}") from exc
            if value is None:
                continue
            node = event
            *parents, name = rule.field.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
        return event


def _check_spec(where: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise MappingError(f"{where}: unknown keys {sorted(unknown)}; use {sorted(_SPEC_KEYS)}")
    if "as" in spec and spec["as"] not in _CONVERSIONS:
        raise MappingError(f"{where}: as = {spec['as']!r}; use one of {sorted(_CONVERSIONS)}")
    for case in spec.get("cases", []):
        if not isinstance(case, dict) or not isinstance(case.get("if"), dict) or "value" not in case:
            raise MappingError(f"{where}: each case needs if = {{path = value}} and value = ...")


def parse_mapping(text: str, name: str, contract_fields: frozenset[str]) -> WebhookMapping:
    """Read one mapping; `contract_fields` are the dotted names a touchpoint may have."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{name}: not TOML: {exc}") from exc
    fields = data.get("touchpoint")
    if not isinstance(fields, dict) or not fields:
        raise MappingError(f"{name}: needs a [touchpoint] table of contract field = value spec")
    rules = []
    for field_name, spec in _flatten(fields):
        parent = field_name.rpartition(".")[0]
        if field_name not in contract_fields and f"{parent}.*" not in contract_fields:
            raise MappingError(f"{name}: {field_name!r} is not a contract field")
        _check_spec(f"{name}: {field_name}", spec)
        rules.append(FieldRule(field_name, spec))
    source = str(data.get("source", Path(name).stem))
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", source):
        raise MappingError(f"{name}: source {source!r} must be lower-case letters, digits, - and _")
    return WebhookMapping(source, str(data.get("doc", "")), tuple(rules), data.get("for_each"), data.get("where"))


def _flatten(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """`[touchpoint.survey]` tables and dotted keys both name nested contract fields; a table with spec keys
    (path, template, ...) is a value spec, not a level."""
    out: list[tuple[str, Any]] = []
    for key, spec in fields.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict) and not (set(spec) & _SPEC_KEYS):
            out += _flatten(spec, name + ".")
        else:
            out.append((name, spec))
    return out


def contract_field_names(schema: dict[str, Any], prefix: str = "") -> frozenset[str]:
    """Dotted names of every field of the Avro record, nested records included; `name.*` for a map."""
    names: set[str] = set()
    for field in schema.get("fields", []):
        name = prefix + field["name"]
        names.add(name)
        if isinstance(field["type"], dict) and field["type"].get("type") == "map":
            names.add(name + ".*")  # a map takes any key
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for branch in branches:
            if isinstance(branch, dict) and branch.get("type") == "record":
                names |= contract_field_names(branch, name + ".")
    return frozenset(names)


def load_mappings(dirs: Iterable[Path], contract_fields: frozenset[str]) -> dict[str, WebhookMapping]:
    """Every <source>.toml of the folders, later folders overriding earlier ones."""
    mappings: dict[str, WebhookMapping] = {}
    for folder in dirs:
        if not folder.is_dir():
            raise MappingError(f"webhook mapping folder {folder} does not exist")
        for path in sorted(folder.glob("*.toml")):
            mapping = parse_mapping(path.read_text(), str(path), contract_fields)
            mappings[mapping.source] = mapping
    return mappings
