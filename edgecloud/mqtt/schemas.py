"""Writes the committed JSON Schemas of the fleet's payloads, ``protos/schemas/<name>.schema.json``,
from the models the code publishes and parses, so that a schema cannot drift from its payload; a test
regenerates them and fails on any difference. Run: ``python -m edgecloud.mqtt.schemas``.

Every field is required unless it is left out when None (``exclude_if``); titles of single fields and
defaults are left out; a definition used once is written in place, as one would write it by hand.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from edgecloud.mqtt.payloads import Event, Reported, Status, Telemetry
from edgecloud.release import Envelope
from edgecloud.rollout import CommandEnvelope

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "protos" / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: file name (without ``.schema.json``) → the type whose JSON it describes
#: keys written first, for a reader; the rest as generated (fields in model order, keywords sorted)
_FIRST = ("title", "description", "type", "required")
PAYLOADS: dict[str, type] = {"status": Status, "reported": Reported, "events": Event, "telemetry": Telemetry,
                             "release": Envelope, "rollout": CommandEnvelope}


def _as_sent(field: Any) -> Any:
    """A field left out when None is never null on the wire: its schema without the null."""
    if field.get("serialization_exclude_if") is None:
        return field
    inner = field["schema"]
    for wrapper in ("default", "nullable"):
        if inner["type"] == wrapper:
            inner = inner["schema"]
    return {**field, "schema": inner}


class _WireSchema(GenerateJsonSchema):
    """What is sent: required unless left out when None, no per-field titles, no defaults."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        return field.get("serialization_exclude_if") is None

    def model_field_schema(self, schema: core_schema.ModelField) -> JsonSchemaValue:
        return super().model_field_schema(_as_sent(schema))

    def dataclass_field_schema(self, schema: core_schema.DataclassField) -> JsonSchemaValue:
        return super().dataclass_field_schema(_as_sent(schema))

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _tidy(node: Any, defs: dict[str, Any], inline: set[str]) -> Any:
    """``node`` with the definitions in ``inline`` written in place and descriptions on one line."""
    if isinstance(node, list):
        return [_tidy(value, defs, inline) for value in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref in inline:
        definition = {k: v for k, v in defs[ref].items() if k != "title"}
        node = {**definition, **{k: v for k, v in node.items() if k != "$ref"}}
    return {key: " ".join(value.split()) if key == "description" and isinstance(value, str)
            else _tidy(value, defs, inline) for key, value in node.items()}


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema of payload ``name`` (a key of PAYLOADS)."""
    generated = TypeAdapter(PAYLOADS[name]).json_schema(mode="serialization", schema_generator=_WireSchema)
    defs = {f"#/$defs/{key}": value for key, value in generated.pop("$defs", {}).items()}
    uses = Counter(_refs(generated) + _refs(list(defs.values())))
    inline = {ref for ref in defs if uses[ref] == 1}
    body = _tidy(generated, defs, inline)
    out = {"$schema": DIALECT, **{key: body.pop(key) for key in _FIRST if key in body}, **body}
    kept = {ref.removeprefix("#/$defs/"): _tidy(value, defs, inline) for ref, value in defs.items()
            if ref not in inline}
    if kept:
        out["$defs"] = kept
    return out


def render(name: str) -> str:
    return json.dumps(schema(name), indent=2, ensure_ascii=False) + "\n"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every payload's schema into ``out_dir`` and return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PAYLOADS:
        path = out_dir / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
