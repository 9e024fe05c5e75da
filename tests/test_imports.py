"""The package layering the code relies on: the registry never imports the runtime, and the CLI has no cycle."""
from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "hub" / "cli.py"  # the one module that mounts both halves


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_registry_package_never_imports_the_runtime():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "runtime")
                 for p in (ROOT / "hub").rglob("*.py") if p != ENTRY}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_runtime_cli_does_not_import_the_entry_module():
    """runtime/cli.py once imported hub.cli (which imports runtime.cli): a cycle."""
    for path in (ROOT / "runtime").rglob("*.py"):
        assert "hub.cli" not in _imported_modules(path), path


def test_registry_commands_load_without_the_runtime():
    code = ("import sys, hub.registry_cli, hub.clikit; "
            "print(sorted(m for m in sys.modules if m == 'runtime' or m.startswith('runtime.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_and_registry_meet_the_pool_contracts():
    """runtime/contracts.py names only what the real Engine and Registry have, with the same parameters."""
    from hub.registry import Registry
    from runtime.contracts import AdapterSource, PoolEngine
    from runtime.engine import Engine

    for protocol, real in ((PoolEngine, Engine), (AdapterSource, Registry)):
        members = [name for name in vars(protocol) if not name.startswith("_")]
        assert members, protocol
        for name in members:
            want, have = getattr(protocol, name), getattr(real, name)
            if isinstance(want, property):
                assert isinstance(have, property), (real, name)
            else:
                assert list(inspect.signature(want).parameters) == list(inspect.signature(have).parameters), name
