"""A quick, sound test that JSON conforms to a JSON Schema such as hub/registry.schema.json: True only where
jsonschema would find no error, False where it would, or where this test is not sure (a keyword it does not
know, a float for an integer, a value equal across types as 1 and true are). A reader checks each manifest it
reads; importing jsonschema was a third of a `hub show`, so jsonschema is asked only when this says False, to
give the error (hub.index.check_index). Format keywords are annotations, as jsonschema treats them by default.
"""
from __future__ import annotations

import re
from typing import Any

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "format"}
_TYPES: dict[str, type] = {"object": dict, "array": list, "string": str, "null": type(None)}


def conforms(instance: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> bool:
    """Does `instance` certainly conform to `schema` (whose `$ref`s point into `root`, by default itself)?"""
    root = schema if root is None else root
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        check = _KEYWORDS.get(keyword)
        if check is None or not check(instance, value, schema, root):
            return False
    return True


def _type(instance: Any, value: Any, schema: dict, root: dict) -> bool:
    return any(_is(instance, name) for name in ([value] if isinstance(value, str) else value))


def _is(instance: Any, name: str) -> bool:
    if name == "integer":  # jsonschema also takes 1.0 and refuses True: a float is left to it
        return type(instance) is int
    return name in _TYPES and isinstance(instance, _TYPES[name]) and not isinstance(instance, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal as jsonschema compares: only plain values of one type are judged here."""
    return type(a) is type(b) and isinstance(a, (str, int, type(None))) and a == b


def _ref(instance: Any, value: str, schema: dict, root: dict) -> bool:
    if not value.startswith("#/$defs/"):
        return False
    target = root.get("$defs", {}).get(value.removeprefix("#/$defs/"))
    return isinstance(target, dict) and conforms(instance, target, root)


def _properties(instance: Any, value: dict, schema: dict, root: dict) -> bool:
    return not isinstance(instance, dict) or all(
        conforms(instance[key], sub, root) for key, sub in value.items() if key in instance)


def _additional(instance: Any, value: Any, schema: dict, root: dict) -> bool:
    if not isinstance(instance, dict):
        return True
    extra = [key for key in instance if key not in schema.get("properties", {})]
    if value is False:
        return not extra
    return value is True or all(conforms(instance[key], value, root) for key in extra)


def _not(instance: Any, value: dict, schema: dict, root: dict) -> bool:
    """Only `not: {pattern}` is decided here: a text the pattern does not find (anything else conforms to the
    pattern, so not to `not`)."""
    if set(value) != {"pattern"}:
        return False
    return isinstance(instance, str) and re.search(value["pattern"], instance) is None


def _unique(instance: Any, value: bool, schema: dict, root: dict) -> bool:
    if not value or not isinstance(instance, list):
        return True
    return all(isinstance(item, str) for item in instance) and len(set(instance)) == len(instance)


def _minimum(instance: Any, value: Any, schema: dict, root: dict) -> bool:
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return True  # the keyword applies to numbers only
    return type(instance) is int and instance >= value


_KEYWORDS = {
    "type": _type,
    "$ref": _ref,
    "properties": _properties,
    "additionalProperties": _additional,
    "not": _not,
    "uniqueItems": _unique,
    "minimum": _minimum,
    "required": lambda i, v, s, r: not isinstance(i, dict) or all(k in i for k in v),
    "const": lambda i, v, s, r: _same(i, v),
    "enum": lambda i, v, s, r: any(_same(i, e) for e in v),
    "pattern": lambda i, v, s, r: not isinstance(i, str) or re.search(v, i) is not None,
    "anyOf": lambda i, v, s, r: any(conforms(i, sub, r) for sub in v),
    "minProperties": lambda i, v, s, r: not isinstance(i, dict) or len(i) >= v,
    "propertyNames": lambda i, v, s, r: not isinstance(i, dict) or all(conforms(k, v, r) for k in i),
    "items": lambda i, v, s, r: not isinstance(i, list) or (isinstance(v, dict) and all(conforms(x, v, r) for x in i)),
}
