"""The config model as a JSON Schema, derived from the loader itself.

The loader is the single source of truth for what ``sidecar.yaml`` accepts. To export it,
this module parses ``schemas/config.exhaustive.yaml`` (one of every key and variant) while
recording every accessor the loader calls on :class:`~sidecar.fields.Fields` (which key, at
which path, as which kind), and turns the record into a JSON Schema. A test regenerates it
and compares it with ``schemas/config.schema.json``, and validates the example configs
against it: a key added to the loader but not to the exhaustive example shows up there.
``credentials`` is one variant per type in ``sidecar.credentials.registry``, each derived from
what that type's parser read; a registered type without an entry in the example is an error.

    python -m sidecar.config_schema > sidecar/schemas/config.schema.json
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from sidecar.credentials.registry import PROVIDER_TYPES
from sidecar.errors import ConfigInvalid
from sidecar.fields import Fields

SCHEMAS = Path(__file__).parent / "schemas"
DYNAMIC = ("outbound.upstreams", "credentials", "identity.federated_bundles")
DURATION = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"
SECRET_REF = {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
              "properties": {"value": {"type": "string"}, "from_env": {"type": "string"},
                             "from_file": {"type": "string"}}}
KINDS: dict[str, dict[str, Any]] = {
    "text": {"type": "string"}, "flag": {"type": "boolean"}, "integer": {"type": "integer"},
    "duration": {"type": "string", "pattern": DURATION},
    "text_list": {"type": "array", "items": {"type": "string"}},
    "listen": {"type": "string", "pattern": r"^.+:\d+$"}, "url": {"type": "string", "pattern": "^[a-z]+://"},
    "path_value": {"type": "string"}, "secret": {"$ref": "#/$defs/secret"}, "raw_value": {},
    "mapping": {"type": "object"},
}
RECORDED = ("text", "flag", "integer", "choice", "duration", "text_list", "listen", "url", "path_value", "secret",
            "sub", "items", "raw_value", "mapping")


def _node_path(path: str) -> str:
    """Dynamic names (upstreams, credentials, domains) and list indices become wildcards."""
    path = re.sub(r"\[\d+\]", "[]", path)
    for prefix in DYNAMIC:
        if path.startswith(prefix + ".") and not path.startswith("credentials.<"):
            rest = path[len(prefix) + 1:].split(".", 1)
            return ".".join([prefix, "*", *rest[1:]])
    return path


@contextmanager
def _recording() -> Iterator[list[tuple[str, str, str, dict[str, Any]]]]:
    records: list[tuple[str, str, str, dict[str, Any]]] = []
    originals = {name: getattr(Fields, name) for name in RECORDED}

    def wrap(name: str, original: Any) -> Any:
        def recorded(self: Fields, key: str, *args: Any, **kwargs: Any) -> Any:
            extra: dict[str, Any] = {"options": list(args[0])} if name == "choice" and args else {}
            if name == "choice" and "options" in kwargs:
                extra = {"options": list(kwargs["options"])}
            extra["required"] = bool(kwargs.get("required"))
            records.append((self.path, key, name, extra))
            return original(self, key, *args, **kwargs)
        return recorded

    for name, original in originals.items():
        setattr(Fields, name, wrap(name, original))
    try:
        yield records
    finally:
        for name, original in originals.items():
            setattr(Fields, name, original)


def _trace(raw: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    from sidecar.config import parse_config

    with _recording() as records:
        try:
            parse_config(raw, base_dir=Path("/nonexistent"))
        except ConfigInvalid:
            pass  # files do not exist here: only which keys are read matters
    return records


def _credential_types(raw: dict[str, Any]) -> dict[str, str]:
    return {name: spec.get("type", "") for name, spec in (raw.get("credentials") or {}).items()}


def _object() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": {}, "required": []}


def build(raw: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema of everything the loader read while parsing ``raw``."""
    nodes: dict[str, dict[str, Any]] = {"": _object()}
    types = _credential_types(raw)
    for concrete, key, kind, extra in _trace(raw):
        path = concrete
        if path.startswith("credentials.") and path.count(".") >= 1:
            name = path.split(".")[1]
            path = path.replace(f"credentials.{name}", f"credentials.<{types.get(name, '')}>", 1)
        node_path = _node_path(path)
        node = nodes.setdefault(node_path, _object())
        node.setdefault("$visits", set()).add(concrete)
        child_path = _node_path(f"{path}.{key}" if path else key)
        _add(nodes, node, node_path, key, kind, extra, child_path)
        if extra.get("required"):
            node.setdefault("$required_in", {}).setdefault(key, set()).add(concrete)
    for node in nodes.values():  # required only where every variant visiting the node requires it
        visits = node.pop("$visits", set())
        required_in = node.pop("$required_in", {})
        node["required"] = [k for k, where in required_in.items() if where >= visits]
    return _assemble(nodes)


def _add(nodes: dict[str, dict[str, Any]], node: dict[str, Any], node_path: str, key: str, kind: str,
         extra: dict[str, Any], child_path: str) -> None:
    if kind == "sub":
        schema: dict[str, Any] = {"$node": child_path}
        nodes.setdefault(child_path, _object())
    elif kind == "items":
        schema = {"type": "array", "items": {"$node": child_path + "[]"}}
        nodes.setdefault(child_path + "[]", _object())
    elif kind == "choice":
        schema = {"enum": extra.get("options", [])}
    else:
        schema = dict(KINDS[kind])
    if node_path in DYNAMIC:
        node["$dynamic"] = schema
        return
    node["properties"].setdefault(key, schema)


def _assemble(nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def resolve(schema: Any) -> Any:
        if isinstance(schema, dict):
            if "$node" in schema:
                return resolve_node(schema["$node"])
            return {k: resolve(v) for k, v in schema.items()}
        if isinstance(schema, list):
            return [resolve(v) for v in schema]
        return schema

    def resolve_node(path: str) -> dict[str, Any]:
        if path == "credentials":
            return _credentials(nodes, resolve_node)
        node = nodes.get(path, _object())
        if "$dynamic" in node:
            return {"type": "object", "additionalProperties": resolve(node["$dynamic"])}
        required = set(node["required"])
        out = {"type": "object", "additionalProperties": False,
               "properties": {k: resolve(v) if k in required else _nullable(resolve(v))
                              for k, v in sorted(node["properties"].items())}}
        if node["required"]:
            out["required"] = sorted(node["required"])
        return out

    root = resolve_node("")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://agent-sidecar.io/schemas/config.schema.json", "title": "sidecar.yaml",
            "description": "Generated from the loader by `python -m sidecar.config_schema`; do not edit by hand.",
            "$defs": {"secret": SECRET_REF}, **root}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The loader reads an explicit null as "not set"."""
    return {"anyOf": [schema, {"type": "null"}]} if schema else schema


def _credentials(nodes: dict[str, dict[str, Any]], resolve_node: Any) -> dict[str, Any]:
    """One variant per type in the registry: what its parser read from the example's entries of it."""
    variants = [_credential_variant(kind, nodes, resolve_node) for kind in sorted(PROVIDER_TYPES)]
    return {"type": "object", "additionalProperties": {"oneOf": variants}}


def _credential_variant(kind: str, nodes: dict[str, dict[str, Any]], resolve_node: Any) -> dict[str, Any]:
    path = f"credentials.<{kind}>"
    if path not in nodes:
        raise ValueError(f"config_schema: expected an entry of credential type {kind} in config.exhaustive.yaml")
    schema: dict[str, Any] = resolve_node(path)
    schema["properties"]["type"] = {"const": kind}
    return schema


def generate() -> dict[str, Any]:
    raw = yaml.safe_load((SCHEMAS / "config.exhaustive.yaml").read_text())
    return build(raw)


def main() -> int:
    json.dump(generate(), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
