"""`hub serve --replicas N --http-port P`: the HTTP API (runtime/http.py) in front of the cluster.

The `hub serve` process serves the HTTP API's routes the way its gRPC endpoint serves the Runtime API: it
checks the token (the same rules as a single server's HTTP API) and the body's size, then forwards the
request through the Serve deployment handle to one replica, routed by the adapter set the body names (the
same key as gRPC's for the same set), and streams the replica's answer back as it comes. Each replica runs
the HTTP API in-process over its own runtime (no socket of its own: `asgi_call` drives the ASGI app), so a
replica answers exactly what `hub serve --http-port` answers.

A call whose replica dies before the first byte of the answer reached the client is sent once more to
another replica (a sampling request is given a seed first, so the retry draws the same tokens); a stream
that had sent events ends with an error event. vLLM's load/unload routes go to every replica, with one
answer (runtime/fanout.py).
"""
from __future__ import annotations

import asyncio
import json
import random
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.errors import ServeError
from runtime.fanout import Part, failure, named_replicas
from runtime.http import error_body, http_status, read_body, refusal

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # to every replica
LORAX_PATHS = ("/generate", "/generate_stream", "/")
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions")
_FORWARDED = ("content-type", "x-request-id")  # the replica's response headers the client gets (with the replica's)


@dataclass(frozen=True)
class HttpPart:
    """A piece of a replica's HTTP answer: the first has the status and headers, the others body bytes."""

    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def set_key(mode: str, refs: Iterable[tuple[str, float]], merge: str = "") -> str:
    """The canonical adapter set: `mode|ref:weight,...` (refs sorted), then the merge options; "" for none."""
    named = sorted(f"{ref}:{weight:g}" for ref, weight in refs)
    return "|".join([mode, ",".join(named)] + ([merge] if merge else [])) if named else ""


def http_routing_key(path: str, body: dict[str, Any], base_names: set[str]) -> str:
    """The adapter set an HTTP request's body names (OpenAI's `model` and `adapters`, LoRAX's `adapter_id` or
    `merged_adapters`); "" when it names none, or when its fields are malformed (the replica refuses those)."""
    try:
        if path in LORAX_PATHS:
            p = body.get("parameters") or {}
            merged = p.get("merged_adapters")
            if isinstance(merged, dict):
                ids = list(merged.get("ids") or [])
                weights = list(merged.get("weights") or [1.0] * len(ids))
                options = {k: v for k, v in merged.items() if k not in ("ids", "weights")}
                return set_key("merge", zip(ids, map(float, weights)), json.dumps(options, sort_keys=True))
            adapter = p.get("adapter_id") or ""
            return set_key("stack", [] if adapter in base_names else [(str(adapter), 1.0)])
        model = body.get("model") or ""
        refs = [] if model in base_names else [(str(model), 1.0)]
        refs += [(str(a["ref"]), float(a.get("weight", 1.0))) for a in body.get("adapters") or []]
        mode = str(body.get("mode") or "stack")
        return set_key(mode, refs, json.dumps(body.get("merge"), sort_keys=True) if mode == "merge" else "")
    except (AttributeError, KeyError, TypeError, ValueError):
        return ""


def seeded_body(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """A sampling request without a seed, given one (None when it needs none): a retry on another replica
    then draws the same tokens."""
    if path in OPENAI_PATHS and body.get("seed") is None and body.get("temperature", 1.0) not in (0, 0.0):
        return {**body, "seed": random.getrandbits(31)}
    parameters = body.get("parameters")
    if path in LORAX_PATHS and isinstance(parameters, dict) and parameters.get("do_sample") \
            and parameters.get("seed") is None:
        return {**body, "parameters": {**parameters, "seed": random.getrandbits(31)}}
    return None


async def asgi_call(app, method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                    body: bytes) -> AsyncIterator[HttpPart]:
    """Drive an ASGI app with one request in this process; its answer as it comes. Closing the iterator
    tells the app the client went away."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield HttpPart(message["status"], tuple((k.decode(), v.decode()) for k, v in message.get("headers", ())))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield HttpPart(body=message["body"])
                if not message.get("more_body"):
                    return
        task.result()  # the app's own failure, if it ended without answering
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait([task], timeout=5)


def _message(body: bytes) -> str:
    """An HTTP error answer's message (OpenAI's error object), or its text."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


class ClusterHttp:
    """The HTTP API's routes, forwarded to the replicas through the deployment handle."""

    def __init__(self, handle, router, metrics, retryable: tuple[type[BaseException], ...], *,
                 tokens: dict[str, str] | None, admin_only: bool, max_body_bytes: int, base_names: set[str]) -> None:
        self.handle = handle
        self.router = router
        self.metrics = metrics
        self.retryable = retryable
        self._tokens = tokens
        self._admin_only = admin_only
        self._max_body = max_body_bytes
        self._base_names = base_names
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])

    async def forward(self, request: HttpRequest) -> Response:
        path = request.url.path
        admin = path in ADMIN_PATHS
        denied = refusal(self._tokens, self._admin_only, request, admin)
        if denied is not None:
            return denied
        try:
            raw = await read_body(request, self._max_body)
        except ServeError as e:
            return _error(http_status(e), e.message)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # the replica words the refusal
        body = body if isinstance(body, dict) else None
        if admin:
            return await self._everywhere(request, raw, body)
        if body is not None and (changed := seeded_body(path, body)) is not None:
            raw = json.dumps(changed).encode()
        key = http_routing_key(path, body, self._base_names) if body is not None else ""
        headers = [(k, v) for k, v in request.headers.items() if k in ("content-type", "accept")]
        return await self._one(request.method, path, request.url.query, headers, raw, key)

    async def _one(self, method: str, path: str, query: str, headers: list[tuple[str, str]], raw: bytes,
                   key: str) -> Response:
        """Forward to one replica; sent once more when it dies before the answer's first byte."""
        held = ExitStack()
        model_id = held.enter_context(self.router.route(key))
        try:
            for attempt in (1, 2):
                chunks = self.handle.options(multiplexed_model_id=model_id, stream=True).http.remote(
                    method, path, query, headers, raw)
                parts = chunks.__aiter__()
                try:
                    start = await parts.__anext__()
                    first = await anext(parts, None)
                except self.retryable as e:
                    chunks.cancel()
                    if attempt == 1:
                        self.metrics.retries.labels(kind="http").inc()
                        continue
                    held.close()
                    return _error(503, f"the replicas serving this call stopped ({why(e)}); retry it")
                break
        except BaseException:
            held.close()
            raise
        kept = {k: v for k, v in start.headers if k in _FORWARDED or k.startswith("x-replica-")}
        stream = kept.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(self._rest(first, parts, chunks, held, stream), status_code=start.status,
                                 headers=kept)

    async def _rest(self, first: HttpPart | None, parts, chunks, held: ExitStack, stream: bool) -> AsyncIterator[bytes]:
        """The answer's bytes; its replica dying now ends a stream with an error event (OpenAI's error object)."""
        try:
            if first is not None:
                yield first.body
            async for part in parts:
                yield part.body
        except self.retryable as e:
            if stream:
                message = f"the replica serving this stream stopped ({why(e)}); send the request again"
                yield f"data: {json.dumps(error_body(503, message))}\n\n".encode()
        finally:
            chunks.cancel()
            held.close()

    async def _everywhere(self, request: HttpRequest, raw: bytes, body: dict | None) -> Response:
        """vLLM's load/unload on every replica: one answer, or the failure with each replica's part."""
        path = request.url.path
        if body is not None and body.get("lora_path"):
            return _error(400, "`lora_path` is not supported with --replicas: push the folder into the registry "
                               "(hub push), then load it by `lora_name`")
        name = body.get("lora_name") if body is not None else None
        headers = [("content-type", "application/json")]
        answers = await self.handle.broadcast("http_whole", request.method, path, request.url.query, headers,
                                              raw).results_async(return_exceptions=True)
        parts = [Part(a[0], a[2], "OK" if a[1] == 200 else str(a[1]), "" if a[1] == 200 else _message(a[2]))
                 if isinstance(a, tuple) else Part("", None, "503", f"the replica stopped during the call ({why(a)})")
                 for a in answers]
        refused = failure(f"{path} {name!r}", parts)
        if refused is not None:
            return _error(int(refused.code) if refused.code.isdigit() else 503, refused.details,
                          dict(refused.metadata))
        ok = min(parts, key=lambda p: p.replica)
        return PlainTextResponse((ok.payload or b"").decode(), headers=dict(named_replicas(parts)))


def why(error: BaseException) -> str:
    """The first line of an error, short: what a client is told of a replica's failure."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
