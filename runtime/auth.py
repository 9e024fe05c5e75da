"""Bearer-token auth for the gRPC server, as a server interceptor.

Token file: one token per line, optionally followed by a role: `admin` (the default: every RPC)
or `user` (everything but the admin RPCs, which change what the server holds in memory).
Blank lines and `#` comments are skipped. A request without a known token gets UNAUTHENTICATED;
a `user` token on an admin RPC gets PERMISSION_DENIED. With `admin_only`, the non-admin RPCs
need no token at all. The health service is always open, so probes and load balancers work.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable

import grpc

ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)
ADMIN_METHODS = frozenset({"/adapterhub.v1.Runtime/LoadAdapter", "/adapterhub.v1.Runtime/UnloadAdapter",
                           "/adapterhub.v1.Cluster/Scale"})  # the last: `hub serve --replicas` only
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthConfigError(ValueError):
    """The token file is missing or malformed."""


def read_token_file(path: str | Path) -> dict[str, str]:
    """token -> role, from a token file (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise AuthConfigError(f"cannot read token file {path}: {e.strerror}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and fields[1] not in ROLES):
            raise AuthConfigError(f"{path}:{number}: expected `TOKEN [{'|'.join(ROLES)}]`")
        tokens[fields[0]] = fields[1] if len(fields) == 2 else ADMIN
    if not tokens:
        raise AuthConfigError(f"token file {path} holds no token")
    return tokens


def token_role(tokens: dict[str, str], token: str | None) -> str | None:
    """The role of `token` in `tokens` (None: no token, or an unknown one), compared in constant time per token."""
    if token is None:
        return None
    role = None
    for known, known_role in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            role = known_role
    return role


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


def _denying(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` without running the RPC."""

    def deny(_request, context: grpc.ServicerContext):
        context.abort(code, message)

    kinds: dict[str, Callable] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise AssertionError("handler of no known kind")


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` before any RPC runs."""

    def __init__(self, tokens: dict[str, str], *, admin_only: bool = False) -> None:
        self._tokens = dict(tokens)
        self._admin_only = admin_only

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        is_admin = method in ADMIN_METHODS
        if method.startswith(OPEN_PREFIXES) or (self._admin_only and not is_admin):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        role = token_role(self._tokens, _bearer(handler_call_details.invocation_metadata))
        if role is None:
            return _denying(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or unknown token: send `authorization: Bearer <token>`")
        if is_admin and role != ADMIN:
            return _denying(handler, grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin token")
        return handler
