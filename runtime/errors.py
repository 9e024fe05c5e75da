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


class RequestFailed(grpc.RpcError):
    """A failed RPC as `RuntimeClient` raises it: the status code and the server's message.

    It is a `grpc.RpcError` (with `code()` and `details()`), so code written against plain gRPC
    errors keeps working; `str()` is the one line the CLI prints, with the server's request id (the one
    its request log names) when it sent one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.status_code = code
        self.message = message
        self.request_id = request_id

    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message


class ServerUnreachable(RequestFailed):
    """No server answered at the target (nothing listens there, or the name does not resolve)."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"cannot reach server at {target}")
        self.target = target
        self.reason = reason  # gRPC's own words, e.g. "Connection refused"

    def __str__(self) -> str:
        return self.message
