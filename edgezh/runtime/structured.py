"""Structured output: OpenAI's `response_format` as a llama.cpp grammar.

- `{"type": "text"}`: no grammar.
- `{"type": "json_object"}`: llama.cpp's JSON grammar (`llama_cpp.llama_grammar.JSON_GBNF`, whose
  root is an object).
- `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}`: the schema converted by
  llama-cpp-python's port of llama.cpp's json-schema-to-grammar (`json_schema_to_gbnf`). Its string
  character rule (`char ::= [^"\\] | …`) lets a raw newline or other control character into a string,
  which JSON forbids (RFC 8259 §7; `json.loads` refuses it); it is replaced by llama.cpp's own rule,
  which leaves U+0000–U+001F and U+007F out (`STRICT_CHAR`).

The converter enforces a subset of JSON Schema and silently ignores the rest, so a schema with a
keyword it cannot enforce would give answers that do not validate. `schema_problem` walks the
schema first and names the first such keyword with its path (`properties.age.minimum`); the
server answers 400 with it. Annotations (title, description, examples, default, `$defs` …) and
`format` (an annotation in JSON Schema 2020-12; date, time, date-time and uuid are enforced)
are fine.
"""

from __future__ import annotations

import json
from typing import Any

ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "format", "contentEncoding",
                         "contentMediaType"})
ENFORCED = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
                      "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "minLength",
                      "maxLength"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


LOOSE_CHAR = r'char ::= [^"\\] | '
"""The start of llama-cpp-python's string character rule: any character but a quote or backslash."""
STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | '
"""llama.cpp's: no control characters either (they must be escaped)."""


class SchemaError(ValueError):
    """A response_format the grammar cannot enforce; `path` is where (dotted), `keyword` what."""

    def __init__(self, message: str, path: str = "", keyword: str | None = None):
        super().__init__(message)
        self.path, self.keyword = path, keyword


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The GBNF grammar for an OpenAI `response_format` (None: free text); SchemaError if unusable."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_GBNF
    if kind != "json_schema":
        raise SchemaError(f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}", "type", "type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise SchemaError("json_schema needs a 'schema' object", "json_schema.schema", "schema")
    schema = spec["schema"]
    problem = schema_problem(schema)
    if problem is not None:
        path, keyword, reason = problem
        where = "json_schema.schema" + (f".{path}" if path else "")
        raise SchemaError(f"{where}: {reason}", where, keyword)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter asserts and raises on what it cannot build
        raise SchemaError(f"json_schema.schema: the grammar builder cannot handle this schema ({exc})",
                          "json_schema.schema") from None
    return "\n".join(STRICT_CHAR + line[len(LOOSE_CHAR):] if line.startswith(LOOSE_CHAR) else line
                     for line in grammar.split("\n"))


def schema_problem(schema: Any, path: str = "") -> tuple[str, str | None, str] | None:
    """(path, keyword, reason) of the first part of `schema` the grammar cannot enforce, else None."""
    if not isinstance(schema, dict):
        return path, None, f"expected a schema object, got {json.dumps(schema)[:40]}"
    here = f"{path}." if path else ""
    for key in schema:
        if key not in ENFORCED and key not in ANNOTATIONS:
            return f"{here}{key}", key, f"keyword {key!r} is not supported by the grammar builder (it would be ignored)"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for name in kinds:
        if name not in TYPES:
            return f"{here}type", "type", f"unknown type {name!r}"
    if isinstance(kind, list) and set(schema) & (ENFORCED - {"type"}):
        other = sorted(set(schema) & (ENFORCED - {"type"}))[0]
        return f"{here}{other}", other, f"{other!r} beside a list of types is not supported (use anyOf)"
    if "pattern" in schema and ({"minLength", "maxLength"} & set(schema)):
        return f"{here}minLength", "minLength", "minLength/maxLength beside a pattern is not supported"
    if schema.get("format") in ("date", "time", "date-time", "uuid") and ({"minLength", "maxLength"} & set(schema)):
        return f"{here}minLength", "minLength", "minLength/maxLength beside a format is not supported"
    if "prefixItems" in schema and "items" in schema:
        return f"{here}items", "items", "'items' beside 'prefixItems' is not supported"
    if "allOf" in schema and "properties" in schema:
        return f"{here}allOf", "allOf", "'allOf' beside 'properties' is not supported"
    if "allOf" in schema:
        for index, part in enumerate(schema["allOf"]):
            branches = part.get("anyOf", [part]) if isinstance(part, dict) else [part]
            if not all(isinstance(b, dict) and ("properties" in b or "$ref" in b) for b in branches):
                return f"{here}allOf.{index}", "allOf", "allOf parts must be object schemas with properties"
    required = schema.get("required", [])
    if required:
        defined = set(schema.get("properties", {}))
        missing = [name for name in required if name not in defined]
        if missing and "allOf" not in schema:
            return f"{here}required", "required", f"required property {missing[0]!r} is not in 'properties'"
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            problem = schema_problem(sub, f"{here}{key}.{name}")
            if problem:
                return problem
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        problem = schema_problem(extra, f"{here}additionalProperties")
        if problem:
            return problem
    items = schema.get("items")
    if isinstance(items, dict):
        problem = schema_problem(items, f"{here}items")
        if problem:
            return problem
    for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
        for index, sub in enumerate(schema.get(key) or []):
            problem = schema_problem(sub, f"{here}{key}.{index}")
            if problem:
                return problem
    if isinstance(items, list):
        for index, sub in enumerate(items):
            problem = schema_problem(sub, f"{here}items.{index}")
            if problem:
                return problem
    ref = schema.get("$ref")
    if ref is not None and not str(ref).startswith("#/"):
        return f"{here}$ref", "$ref", f"only local references (#/…) are supported, got {ref!r}"
    return None
