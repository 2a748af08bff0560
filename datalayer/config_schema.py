"""A small JSON Schema subset for plugin configuration (no dependency on ``jsonschema``).

Supported keywords: ``type`` (object, array, string, integer, number, boolean, null, or a
list of them), ``properties``, ``required``, ``additionalProperties`` (boolean),
``items``, ``enum``, ``minimum``, ``maximum``, ``minLength``, ``maxLength``, ``pattern``,
``minItems``, ``maxItems``, ``default`` and ``description`` (ignored), and the extension
``secret: true`` on a property (its value goes to the encrypted secrets, never the config).
:func:`check_schema` rejects anything else, so a manifest cannot rely on a keyword that would
be silently ignored. Errors name the JSON path, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datalayer.core.errors import ValidationError

__all__ = ["check_schema", "secret_names", "validate"]

_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items",
                       "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
                       "minItems", "maxItems", "default", "description", "title", "secret"})


def check_schema(schema: object, path: str = "config_schema") -> None:
    """Raise :class:`ValidationError` unless ``schema`` uses only the supported subset."""
    if not isinstance(schema, Mapping):
        raise ValidationError(f"{path} must be an object")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValidationError(f"{path}: unsupported keyword(s) {', '.join(sorted(unknown))}")
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    if any(x not in _TYPES for x in types):
        raise ValidationError(f"{path}.type must be one of {', '.join(_TYPES)}")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise ValidationError(f"{path}.properties must be an object")
    for name, sub in props.items():
        check_schema(sub, f"{path}.properties.{name}")
    req = schema.get("required", [])
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        raise ValidationError(f"{path}.required must be a list of property names")
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items")
    if "pattern" in schema:
        try:
            re.compile(str(schema["pattern"]))
        except re.error:
            raise ValidationError(f"{path}.pattern is not a valid regular expression") from None
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        raise ValidationError(f"{path}.additionalProperties must be true or false")


def secret_names(schema: Mapping[str, Any]) -> set[str]:
    """Top-level properties marked ``secret: true``."""
    return {n for n, s in schema.get("properties", {}).items()
            if isinstance(s, Mapping) and s.get("secret") is True}


def _type_ok(value: object, t: str) -> bool:
    if t == "object":
        return isinstance(value, Mapping)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return value is None


def validate(value: object, schema: Mapping[str, Any], path: str = "config") -> None:
    """Raise :class:`ValidationError` naming the first path where ``value`` breaks
    ``schema`` (values are never echoed)."""
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_type_ok(value, x) for x in types):
            raise ValidationError(f"{path} must be of type {' or '.join(types)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValidationError(f"{path} must be one of the allowed values")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValidationError(f"{path} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValidationError(f"{path} must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise ValidationError(f"{path} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise ValidationError(f"{path} must have at most {schema['maxLength']} characters")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            raise ValidationError(f"{path} does not match the required pattern")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise ValidationError(f"{path} must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise ValidationError(f"{path} must have at most {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, Mapping):
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                raise ValidationError(f"{path}.{name} is required")
        for name, item in value.items():
            if name in props:
                validate(item, props[name], f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                raise ValidationError(f"{path}.{name} is not an allowed property")
