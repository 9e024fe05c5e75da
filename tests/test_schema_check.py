"""hub.schema_check: the quick test a reader runs before jsonschema is sound (it never passes what jsonschema
refuses, over thousands of damaged indexes) and passes what the registry writes (so readers skip jsonschema)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema

from hub.index import SCHEMA_FILE
from hub.registry import Registry
from hub.schema_check import conforms

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads(SCHEMA_FILE.read_text())
VALUES = [None, True, False, 0, 1, -1, 1.0, 2.5, 2 ** 70, "", "x", "..", "a\n", "1.0.0", "a" * 70, "0" * 64, [],
          ["a", "a"], ["a", 1], {}, {"x": 1}]


def _errors(doc) -> bool:
    return any(True for _ in jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc))


def _places(doc, path=()):
    """(path, value) of every value in the document."""
    yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _places(value, (*path, key))


def _mutants(doc):
    """Copies of `doc` with one change: a value replaced, a key removed, renamed or added."""
    for path, value in list(_places(doc)):
        if not path:
            continue
        for new in VALUES:
            changed = copy.deepcopy(doc)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = copy.deepcopy(new)
            yield changed
        changed = copy.deepcopy(doc)
        parent = changed
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict):
            held = parent.pop(path[-1])
            yield copy.deepcopy(changed)
            for name in ("a..b", "a\n", "Zz", "1.0.0", "-x"):
                parent[name] = held
                yield copy.deepcopy(changed)
                del parent[name]
    for path, value in list(_places(doc)):
        if isinstance(value, dict):
            changed = copy.deepcopy(doc)
            target = changed
            for key in path:
                target = target[key]
            target["extra"] = 1
            yield changed


def _index(technique_adapters, tmp_path) -> dict:
    """A registry's whole index as one document: two adapters, one with a base fingerprint and a tag."""
    registry = Registry(tmp_path / "home")
    registry.push(technique_adapters["lora"], "team/lora", "1.0.0", base_model=str(technique_adapters["base"]),
                  tags=["en", "x"], description="d", license="mit")
    registry.push(technique_adapters["ia3"], "ia3", "1.2.0-rc.1")
    registry.tag("team/lora@1.0.0", "stable")
    return registry.listing()


def test_what_the_registry_writes_conforms(technique_adapters, tmp_path):
    for doc in (_index(technique_adapters, tmp_path), json.loads((ROOT / "registry.json").read_text())):
        assert not _errors(doc) and conforms(doc, SCHEMA)


def test_nothing_jsonschema_refuses_conforms(technique_adapters, tmp_path):
    doc = _index(technique_adapters, tmp_path)
    refused = passed = 0
    for mutant in _mutants(doc):
        if _errors(mutant):
            refused += 1
            assert not conforms(mutant, SCHEMA), json.dumps(mutant)[:400]
        elif conforms(mutant, SCHEMA):
            passed += 1
    assert refused > 1000 and passed > 100, (refused, passed)  # both sides were exercised
