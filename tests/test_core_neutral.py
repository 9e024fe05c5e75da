"""The serving core names no transport: pool, scheduler, engine and merges import nothing of gRPC, and
every kind of refusal they raise has its status in each frontend's table."""
from __future__ import annotations

import subprocess
import sys

import pytest

from runtime import errors

CORE = ["runtime.errors", "runtime.pool", "runtime.scheduler", "runtime.engine", "runtime.generate",
        "runtime.merged", "runtime.plan", "runtime.core"]


@pytest.mark.slow  # a fresh interpreter imports the core
def test_the_core_imports_no_grpc():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health', 'google')"
            " or m.startswith('runtime.proto') or m in ('runtime.service', 'runtime.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _kinds() -> list[type[errors.ServeError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ServeError)
            and c is not errors.ServeError]


def test_every_refusal_has_its_grpc_status():
    from runtime.service import GRPC_CODES, grpc_code

    import grpc

    for kind in _kinds():
        assert any(c in GRPC_CODES for c in kind.__mro__), kind
    assert grpc_code(errors.WrongBase("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_code(errors.TooLarge("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_code(errors.QueueFull("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED
