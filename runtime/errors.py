"""The one error type the serving layers raise: a gRPC status code and one clear message.

The pool, the scheduler and its batch (runtime/generate.py) raise it; the server turns it into the RPC's status, so each failure is
mapped to its code exactly once, where it is detected.
"""
from __future__ import annotations

import grpc


class ServeError(Exception):
    """A request that cannot be served; `code` is the gRPC status the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
