"""The OpenAI-compatible HTTP API, beside gRPC on the same engine, pool, scheduler, auth and metrics.

`POST /v1/completions`, `POST /v1/chat/completions` (SSE with `stream`), `GET /v1/models`. `model` names
what serves a request: the base (its id, its folder as served, `base` or "") or an adapter ref; the extra
body fields `adapters: [{ref, weight}]`, `mode` (stack/average/merge) and `merge` ({method, density, ...})
compose several, as gRPC's GenerateRequest does. Each answer names its adapters as resolved (`adapters`).
`n` queues n rows of one request; `logprobs` come from the engine (runtime/sampling.py's token_logprobs).
Beside them, LoRAX/TGI's `/generate` and `/generate_stream` and vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`, so tooling written for those servers works by changing the URL.
Requests go through the shared request path (runtime/core.py); its refusals become OpenAI error objects
with the HTTP status of HTTP_STATUS. Starlette + uvicorn serve it in a thread of the server process.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from hub.artifact import ArtifactError
from hub.errors import HubError
from hub.merge_spec import uses_density, uses_sign
from runtime import errors
from runtime.auth import ADMIN, token_role
from runtime.core import AdapterRequest, Prepared, Serving, ok, sampling_params
from runtime.errors import InvalidArgument, ServeError
from runtime.merged import MergeOptions
from runtime.requestlog import RequestLog, RequestRecord
from runtime.sampling import SamplingParams, TokenLogprob
from runtime.scheduler import Finished, Request
from runtime.textstream import TextStream

class Forbidden(ServeError):
    """A call this server's options do not allow, whatever the token (e.g. `lora_path` loads without
    --allow-runtime-lora): a frontend's policy, not a core refusal."""


# Each kind of refusal as the HTTP status a client gets (a subclass maps as its nearest listed class).
HTTP_STATUS: dict[type[ServeError], int] = {
    Forbidden: 403,
    errors.InvalidArgument: 400,
    errors.NotFound: 404,
    errors.Unusable: 409,
    errors.TooLarge: 413,
    errors.NoRoom: 503,
    errors.QueueFull: 429,
    errors.DamagedData: 500,
    errors.Unavailable: 503,
    errors.Cancelled: 499,
    errors.Internal: 500,
}
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError", 429: "RateLimitError",
                499: "CancelledError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
BASE_NAMES = ("", "base")  # besides the base's own ids, what names the base model
_DONE = "data: [DONE]\n\n"
MAX_N = 16  # OpenAI's `n`: rows one request may take (each a row of the batch)
_MERGE_FIELDS = {"method": str, "density": float, "majority_sign": str, "svd_rank": int, "svd_clamp": float,
                 "seed": int}


def http_status(error: ServeError) -> int:
    """The HTTP status of a refusal, by the nearest class HTTP_STATUS lists."""
    return next((HTTP_STATUS[c] for c in type(error).__mro__ if c in HTTP_STATUS), 500)


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object (as vLLM words it)."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": None, "code": status}}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


# OpenAI fields this server does not implement, with the value that asks for nothing: any other value is refused
# (a 400 naming the field) rather than silently ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {"echo": (False,), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


def _refuse_unsupported(body: dict, n: int) -> None:
    for key, neutral in _UNSUPPORTED.items():
        ok(body.get(key, neutral[0]) in neutral, f"`{key}` is not supported by this server (leave it out)")
    best_of = body.get("best_of")
    ok(best_of in (None, n), f"`best_of` is not supported by this server except equal to `n` ({n}), got {best_of!r}")


def _typed(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[key] if it is of `kind` (ints count as floats), `default` when absent or null; else InvalidArgument."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok(isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds),
       f"`{key}` must be {' or '.join(k.__name__ for k in kinds)}, got {json.dumps(value)[:40]}")
    return value


def _merge(body: dict) -> MergeOptions | None:
    merge = _typed(body, "merge", dict)
    if merge is None:
        return None
    unknown = sorted(set(merge) - set(_MERGE_FIELDS))
    ok(not unknown, f"unknown `merge` field {', '.join(unknown)}: expected {', '.join(_MERGE_FIELDS)}")
    return MergeOptions(**{k: _typed(merge, k, t) for k, t in _MERGE_FIELDS.items() if merge.get(k) is not None})


def _stop(body: dict) -> tuple[str, ...]:
    stop = _typed(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    ok(all(isinstance(s, str) for s in stop), "`stop` must be a string or a list of strings")
    return tuple(stop)


def _chat_messages(body: dict) -> list[dict[str, str]]:
    """`messages` as the chat template takes them: content as text (text parts joined)."""
    messages = _typed(body, "messages", list, [])
    out = []
    for m in messages:
        ok(isinstance(m, dict) and isinstance(m.get("role"), str), "each message needs a `role` and a `content`")
        content = m.get("content") or ""
        if isinstance(content, list):
            ok(all(isinstance(p, dict) and p.get("type") == "text" for p in content), "only text content is served")
            content = "".join(str(p.get("text", "")) for p in content)
        ok(isinstance(content, str), "a message's `content` must be text")
        out.append({"role": m["role"], "content": content})
    return out


class HttpFrontend:
    """The ASGI app over one Serving core, and the uvicorn server that runs it in a thread."""

    def __init__(self, core: Serving, *, base_names: tuple[str, ...], tokens: dict[str, str] | None = None,
                 admin_only: bool = False, request_log: RequestLog | None = None,
                 max_body_bytes: int = 4 << 20, tls: tuple[str, str] | None = None,
                 allow_lora_path: bool = False) -> None:
        self.core = core
        self.base_id = base_names[0]
        self._served_as = base_names[-1]  # the base as the server was given it, as the registry filters by
        self._base_names = set(base_names) | set(BASE_NAMES)
        self._tokens = tokens
        self._admin_only = admin_only
        self._log = request_log
        self._max_body = max_body_bytes
        self._tls = tls  # (certificate, key) PEM files
        # vLLM's `lora_path` makes the server read a folder on its own machine: only when the operator allows it
        self._allow_lora_path = allow_lora_path
        self._created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/load_lora_adapter", self._load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._unload, methods=["POST"]),
            Route("/generate", self._lorax_whole, methods=["POST"]),
            Route("/generate_stream", self._lorax_stream, methods=["POST"]),
            Route("/", self._lorax, methods=["POST"]),
        ])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- serving -------------------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Bind host:port (0: a free port) and serve in a thread; returns the bound port."""
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        cert, key = self._tls or (None, None)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False, ssl_certfile=cert,
                                ssl_keyfile=key)
        self._server = uvicorn.Server(config)
        sock.listen(1024)  # connections wait in the backlog until the loop accepts them
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="adapterhub-http",
                                        daemon=True)
        self._thread.start()
        return int(sock.getsockname()[1])

    def stop(self, grace: float) -> None:
        """Stop accepting; requests in flight get `grace` seconds to finish."""
        if self._server is not None and self._thread is not None:
            # uvicorn annotates an int, and hands the value to asyncio.timeout, which takes seconds as a float
            self._server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
            self._server.should_exit = True
            self._thread.join()
            self._server = None

    # -- plumbing ------------------------------------------------------------------------------------
    def _denied(self, request: HttpRequest, admin: bool = False) -> JSONResponse | None:
        """401 without a known bearer token (runtime/auth.py's rules), 403 for a user token on admin calls."""
        if self._tokens is None or (self._admin_only and not admin):
            return None
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        role = token_role(self._tokens, token)
        if role is None:
            return _error(401, "missing or unknown token: send `Authorization: Bearer <token>`")
        if admin and role != ADMIN:
            return _error(403, "this call needs an admin token")
        return None

    async def _body(self, request: HttpRequest) -> dict:
        """The JSON object the body holds; TooLarge past the size limit, before more than it is read."""
        too_large = errors.TooLarge(f"the request body is more than {self._max_body} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise too_large
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self._max_body:
                raise too_large
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise InvalidArgument(f"the body is not JSON: {e}") from None
        ok(isinstance(body, dict), "the body must be a JSON object")
        return body

    def _record(self, record: RequestRecord, method: str, status: int, started: float) -> None:
        metrics = self.core.pool.metrics
        metrics.requests.labels(frontend="http", method=method, code=str(status)).inc()
        metrics.latency.labels(frontend="http", method=method).observe(time.perf_counter() - started)
        if self._log is not None:
            self._log.write(record, str(status), time.perf_counter() - started)

    def _adapters(self, body: dict) -> list[AdapterRequest]:
        """What `model` names (unless the base), then the `adapters` list."""
        model = _typed(body, "model", str, "")
        named = [] if model in self._base_names else [AdapterRequest(model)]
        for a in _typed(body, "adapters", list, []):
            ok(isinstance(a, dict) and isinstance(a.get("ref"), str), "each of `adapters` needs a `ref`")
            named.append(AdapterRequest(a["ref"], _typed(a, "weight", float, 1.0)))
        return named

    def _sampling(self, fields: dict, *, max_new_tokens: int | None, temperature: float, seed: int | None,
                  logprobs: int | None) -> SamplingParams:
        """The sampling fields OpenAI and LoRAX name alike (top_p, top_k, stop), with those they name apart."""
        return sampling_params(self.core.limits, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=_typed(fields, "top_p", float),
                               top_k=_typed(fields, "top_k", int, 0), seed=seed, stop=_stop(fields),
                               logprobs=logprobs)

    def _start(self, body: dict, chat: bool, alive: Callable[[], bool]) -> list[_Row]:
        """The checked request, queued as `n` rows, row i seeded `seed + i` (its own stream)."""
        n = _typed(body, "n", int, 1)
        ok(1 <= n <= MAX_N, f"`n` must be in 1..{MAX_N}, got {n}")
        _refuse_unsupported(body, n)
        seed = _typed(body, "seed", int)
        logprobs = _logprobs_asked(body, chat)
        temperature = _typed(body, "temperature", float, 1.0)
        max_new = _typed(body, "max_completion_tokens", int, _typed(body, "max_tokens", int))  # chat's newer name
        samplings = [self._sampling(body, max_new_tokens=max_new, temperature=temperature,
                                    seed=None if seed is None else seed + i, logprobs=logprobs) for i in range(n)]
        adapters = self._adapters(body)
        if chat:
            ids = self.core.chat_ids(_chat_messages(body), adapters[0].ref if len(adapters) == 1 else None)
        else:
            prompt = _typed(body, "prompt", (str, list), "")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]  # the SDK's one-prompt batch
            text, given = (prompt, None) if isinstance(prompt, str) else ("", prompt)
            ok(given is None or all(isinstance(i, int) for i in given), "`prompt` must be text or a list of token ids")
            ids = self.core.token_ids(text, given, chat=False, what="prompt")
        return self._queue(ids, samplings, adapters, _typed(body, "mode", str, "stack"), _merge(body), alive)

    def _queue(self, ids: list[int], samplings: list[SamplingParams], adapters: list[AdapterRequest], mode: str,
               merge: MergeOptions | None, alive: Callable[[], bool]) -> list[_Row]:
        """One row per sampling, all or none: a refusal lets go of the rows already queued."""
        rows: list[_Row] = []
        try:
            for sampling in samplings:
                rows.append(_Row(*self.core.start(ids, sampling, adapters, mode, merge, alive)))
        except BaseException:
            for row in rows:
                self._let_go(row)
            raise
        return rows

    def _let_go(self, row: _Row) -> None:
        """The row leaves the batch (a client gone included), then lets go of its adapters."""
        self.core.scheduler.cancel(row.queued)
        self.core.pool.release(row.prepared.lease)

    def _start_lorax(self, body: dict, alive: Callable[[], bool], stream: bool) -> list[_Row]:
        """A LoRAX request (`inputs`, `parameters`), checked and queued as one row; with
        `decoder_input_details`, its prompt scored too."""
        p = _typed(body, "parameters", dict, {})
        sample = _typed(p, "do_sample", bool, False)
        top_n = _typed(p, "top_n_tokens", int) or _typed(p, "return_k_alternatives", int) or 0
        # a stream's every event carries its token's logprob; a whole answer's only with `details`
        asked = stream or top_n or _typed(p, "details", bool, False)
        sampling = self._sampling(p, max_new_tokens=_typed(p, "max_new_tokens", int),
                                  temperature=_typed(p, "temperature", float, 1.0 if sample else 0.0),
                                  seed=_typed(p, "seed", int), logprobs=top_n if asked else None)
        adapter_id = _typed(p, "adapter_id", str, "")
        merged = _typed(p, "merged_adapters", dict)
        mode, merge = "stack", None
        if merged is None:
            adapters = [] if adapter_id in self._base_names else [AdapterRequest(adapter_id)]
        else:
            ok(adapter_id in self._base_names, "give `adapter_id` or `merged_adapters`, not both")
            refs, weights = _typed(merged, "ids", list, []), _typed(merged, "weights", list, [])
            ok(all(isinstance(r, str) for r in refs), "`merged_adapters.ids` must be adapter refs")
            weights = weights or [1.0] * len(refs)
            ok(len(weights) == len(refs) and all(isinstance(w, (int, float)) for w in weights),
               "`merged_adapters.weights` must be one number per id")
            adapters = [AdapterRequest(r, float(w)) for r, w in zip(refs, weights)]
            mode = "merge"
            method = _typed(merged, "merge_strategy", str, "linear")
            # lorax-client always sends a density and a sign method; LoRAX uses them only where the method does
            merge = MergeOptions(method=method,
                                 density=_typed(merged, "density", float) if uses_density(method) else None,
                                 majority_sign=_typed(merged, "majority_sign_method", str) if uses_sign(method)
                                 else None)
        ids = self.core.token_ids(_typed(body, "inputs", str, ""), None, chat=False, what="inputs")
        rows = self._queue(ids, [sampling], adapters, mode, merge, alive)
        if _typed(p, "decoder_input_details", bool, False) and len(ids) > 1:
            try:
                logprobs = [None, *self.core.score(rows[0].prepared)]  # the first token has no context
                texts = [self.core.engine.tokenizer.decode([i]) for i in ids]
                rows[0].prefill = list(zip(ids, texts, logprobs))
            except BaseException:
                self._let_go(rows[0])
                raise
        return rows

    # -- routes --------------------------------------------------------------------------------------
    async def _completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, lambda body, alive: self._start(body, False, alive),
                                    lambda body, rows: _OpenAIAnswer(False, body, rows))

    async def _chat(self, request: HttpRequest) -> Response:
        return await self._generate(request, lambda body, alive: self._start(body, True, alive),
                                    lambda body, rows: _OpenAIAnswer(True, body, rows))

    async def _lorax(self, request: HttpRequest, stream: bool | None = None) -> Response:
        """LoRAX/TGI `/generate`, `/generate_stream` and `/` (where the body's `stream` decides)."""
        def streams(body: dict) -> bool:
            return bool(body.get("stream")) if stream is None else stream

        def answer(body: dict, rows: list[_Row]) -> _LoraxAnswer:  # `/` answers a list of one, as LoRAX's
            return _LoraxAnswer(rows, streams(body), stream is None, _typed(body, "parameters", dict, {}))

        return await self._generate(request, lambda body, alive: self._start_lorax(body, alive, streams(body)),
                                    answer)

    async def _lorax_stream(self, request: HttpRequest) -> Response:
        return await self._lorax(request, stream=True)

    async def _lorax_whole(self, request: HttpRequest) -> Response:
        return await self._lorax(request, stream=False)

    async def _generate(self, request: HttpRequest, start: Callable[[dict, Callable[[], bool]], list[_Row]],
                        answer_for: Callable[[dict, list[_Row]], _Answer]) -> Response:
        """Auth, body, a request slot, then `start` (checks, adapters held, rows queued) off the event loop;
        the answer whole or streamed. Whatever happens, the rows leave the batch and let go of their adapters."""
        method = request.url.path  # the metrics' and request log's method: one of the routes
        started, record = time.perf_counter(), RequestRecord(method)
        denied = self._denied(request)
        if denied is not None:
            self._record(record, method, denied.status_code, started)
            return denied
        held = ExitStack()
        try:
            body = await self._body(request)
            held.enter_context(self.core.requests.held())
            gone = threading.Event()
            rows = await anyio.to_thread.run_sync(start, body, lambda: not gone.is_set())
        except ServeError as e:
            held.close()
            self._record(record, method, http_status(e), started)
            return _error(http_status(e), e.message)
        except BaseException:
            held.close()
            raise
        for row in rows:
            held.callback(self._let_go, row)
        held.callback(gone.set)
        record.adapters = [a.ref for a in rows[0].prepared.resolved]
        record.tokens_in = len(rows[0].prepared.ids)
        answer = answer_for(body, rows)
        events = self._events(rows)
        if not answer.stream:
            try:
                async for event in events:
                    answer.take(event)
            except ServeError as e:
                self._record(record, method, http_status(e), started)
                return _error(http_status(e), e.message)
            finally:
                held.close()
            record.tokens_out = answer.tokens
            self._record(record, method, 200, started)
            return JSONResponse(answer.whole())
        return StreamingResponse(self._stream(answer, events, held, record, method, started),
                                 media_type="text/event-stream")

    async def _events(self, rows: list[_Row]) -> AsyncIterator[_Event]:
        """Every row's events as they come. Each row is drained by a thread of its own (its stream blocks
        between steps), which hands its events to this loop: no thread hop per event on the loop's side, and
        no worker-pool limit on how many streams run at once."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        for index, row in enumerate(rows):
            threading.Thread(target=self._pump, args=(index, row, loop, inbox.put_nowait), daemon=True,
                             name="adapterhub-http-row").start()
        running = len(rows)
        while running:
            event = await inbox.get()
            if isinstance(event, ServeError):
                raise event
            if event is None:
                running -= 1
                continue
            yield event

    def _pump(self, index: int, row: _Row, loop: asyncio.AbstractEventLoop, put: Callable[[Any], None]) -> None:
        """Post a row's events, with its tokens' logprobs when asked, then None (or the error it ended with)."""
        tokenizer = self.core.engine.tokenizer
        seen = 0
        last: ServeError | None = None
        try:
            for tokens, piece, finished in self.core.events(row.queued, row.text):
                logprobs = row.queued.seq.logprobs[seen:seen + len(tokens)]
                seen += len(tokens)
                loop.call_soon_threadsafe(put, _Event(index, tokens, piece, finished,
                                                      _described(tokenizer, tokens, logprobs)))
        except ServeError as e:
            last = e
        except Exception as e:  # the loop closed under a client gone at shutdown, or a bug: never silent
            last = errors.Internal(f"streaming the answer failed: {e}")
        try:
            loop.call_soon_threadsafe(put, last)
        except RuntimeError:  # the server's loop has closed: nobody is waiting
            pass

    async def _stream(self, answer: _Answer, events: AsyncIterator[_Event], held: ExitStack, record: RequestRecord,
                      method: str, started: float) -> AsyncIterator[str]:
        """SSE events (OpenAI's end with `[DONE]`); an error mid-stream is an error object. However the stream
        ends (the client gone included), the rows leave the batch and let go of their adapters."""
        status = 499  # unless it gets to the end
        try:
            for event in answer.opening():
                yield _sse(event)
            async for produced in events:
                yield _sse(answer.chunk(produced))
            for event in answer.closing():
                yield _sse(event)
            status = 200
        except ServeError as e:
            status = http_status(e)
            yield _sse(error_body(status, e.message))
        finally:
            held.close()
            record.tokens_out = answer.tokens
            self._record(record, method, status, started)
        if answer.done_line:
            yield _DONE

    async def _load(self, request: HttpRequest) -> Response:
        """vLLM's `load_lora_adapter`: `lora_name` is a registry ref, loaded (not pinned) onto the device; with
        `lora_path`, that folder (on the server's machine) is pushed into the registry first (see `_push`), where
        the server was started with --allow-runtime-lora (as vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
        def allowed(body: dict) -> None:
            if _typed(body, "lora_path", str, "") and not self._allow_lora_path:
                raise Forbidden("`lora_path` loads are off on this server (they make it read a folder on its own "
                                "machine): start `hub serve` with --allow-runtime-lora to allow them, or `hub push` "
                                "the folder and load it by `lora_name` alone")

        def load(body: dict, name: str) -> str:
            path = _typed(body, "lora_path", str, "")
            ref = self._push(name, path) if path else name
            self.core.pool.load(ref, pin=False)
            pushed = f" (pushed {path} into the registry as {ref}, then loaded)" if path else ""
            return f"Success: LoRA adapter '{name}' added successfully.{pushed}"

        return await self._admin(request, load, allowed)

    async def _unload(self, request: HttpRequest) -> Response:
        """vLLM's `unload_lora_adapter`: `lora_name` leaves device and host memory (it stays in the registry)."""
        def unload(body: dict, name: str) -> str:
            self.core.pool.unload(name)
            return f"Success: LoRA adapter '{name}' removed successfully."

        return await self._admin(request, unload)

    def _push(self, name: str, path: str) -> str:
        """vLLM's `lora_path`: the folder pushed as `lora_name` (`name@version`, or a new name as 1.0.0) against
        the served base, so it is then named like any registry adapter; its ref."""
        registry = self.core.registry
        name, _, version = name.partition("@")
        if not version:
            ok(not registry.index().versions(name), f"adapter {name!r} already has versions in the registry: give "
               f"`lora_name` as name@version to push {path} as a new one")
            version = "1.0.0"
        try:
            return registry.push(path, name, version, base_model=self._served_as).ref
        except (HubError, ArtifactError, OSError) as e:
            raise InvalidArgument(f"cannot push `lora_path` {path}: {e}") from None

    async def _admin(self, request: HttpRequest, act: Callable[[dict, str], str],
                     check: Callable[[dict], None] | None = None) -> Response:
        """An admin call (admin token) on `lora_name`: check(body) may refuse it before it takes an admin slot;
        act(body, name) off the event loop gives the answer."""
        method = request.url.path
        started, record = time.perf_counter(), RequestRecord(method)
        denied = self._denied(request, admin=True)
        if denied is not None:
            self._record(record, method, denied.status_code, started)
            return denied
        try:
            body = await self._body(request)
            name = _typed(body, "lora_name", str, "")
            ok(bool(name), "`lora_name` is required: an adapter ref in the registry")
            record.adapters = [name]
            if check is not None:
                check(body)
            with self.core.admin.held():
                done = await anyio.to_thread.run_sync(act, body, name)
        except ServeError as e:
            self._record(record, method, http_status(e), started)
            return _error(http_status(e), e.message)
        self._record(record, method, 200, started)
        return PlainTextResponse(done)

    async def _models(self, request: HttpRequest) -> Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        cards = await anyio.to_thread.run_sync(self._model_cards)
        return JSONResponse({"object": "list", "data": cards})

    def _model_cards(self) -> list[dict[str, Any]]:
        """The base, then every adapter version in the registry pushed against the served base (as named
        when it was pushed: its folder or its id), loaded or not."""
        base = {"id": self.base_id, "object": "model", "created": self._created, "owned_by": "adapterhub",
                "root": self.base_id, "parent": None, "max_model_len": self.core.limits.context_length,
                "permission": []}
        cards = [base]
        for m in self.core.registry.list(base_model=self._served_as):
            cards.append({"id": m.ref, "object": "model", "created": self._created, "owned_by": "adapterhub",
                          "root": m.ref, "parent": self.base_id, "permission": [], "name": m.name,
                          "version": m.version, "technique": m.technique, "sha256": m.sha256})
        return cards


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _logprobs_asked(body: dict, chat: bool) -> int | None:
    """How many top tokens a request asks for with each token's logprob (None: no logprobs): completions'
    `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k`."""
    if not chat:
        return _typed(body, "logprobs", int)
    top = _typed(body, "top_logprobs", int)
    if not _typed(body, "logprobs", bool, False):
        ok(top is None, "`top_logprobs` needs `logprobs: true`")
        return None
    return top or 0


@dataclass
class _Row:
    """One queued row of a request: its held adapters, its place in the scheduler and its text so far."""

    prepared: Prepared
    queued: Request
    text: TextStream
    prefill: list[tuple[int, str, float | None]] | None = None  # the prompt's (id, text, logprob), when asked


@dataclass(frozen=True)
class _TokenLogprob:
    """A generated token with its text and logprob, and the likeliest tokens at its place as (id, text, logprob)."""

    id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


@dataclass(frozen=True)
class _Event:
    """What one row produced since its last event."""

    index: int  # the row's place among the request's rows (OpenAI's choice index)
    tokens: list[int]
    piece: str
    finished: Finished | None
    logprobs: list[_TokenLogprob]  # one per token, when the request asked for logprobs


def _described(tokenizer, tokens: list[int], logprobs: list[TokenLogprob]) -> list[_TokenLogprob]:
    """The engine's logprobs with each token's text (decoded alone, as vLLM reports them)."""
    if not logprobs:
        return []
    text = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    return [_TokenLogprob(t, text(t), lp.logprob, tuple((i, text(i), v) for i, v in lp.top))
            for t, lp in zip(tokens, logprobs)]


@dataclass
class _Choice:
    """One row's answer so far."""

    text: str = ""
    tokens: int = 0
    finished: Finished | None = None
    logprobs: list[_TokenLogprob] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        """OpenAI's finish_reason: "length", else "stop" (EOS or a stop string alike); None until it ends."""
        if self.finished is None:
            return None
        return "length" if self.finished.reason == "length" else "stop"

    @property
    def lorax_reason(self) -> str:
        """LoRAX's (TGI's) finish_reason, which tells a stop string from EOS."""
        if self.finished is not None and self.finished.reason == "length":
            return "length"
        return "stop_sequence" if self.finished is not None and self.finished.stop_string else "eos_token"


class _Answer:
    """A request's answer as the rows' events build it; subclasses word it (whole, or as stream events)."""

    stream = False
    done_line = False  # OpenAI streams end with `data: [DONE]`

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.prepared = rows[0].prepared  # every row holds the same adapters for the same prompt
        self.choices = [_Choice() for _ in rows]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def take(self, event: _Event) -> _Choice:
        choice = self.choices[event.index]
        choice.tokens += len(event.tokens)
        choice.text += event.piece
        choice.logprobs += event.logprobs
        if event.finished is not None:
            choice.finished = event.finished
        return choice

    def adapters(self) -> list[dict[str, Any]]:
        return [asdict(a) for a in self.prepared.resolved]

    def whole(self) -> dict[str, Any] | list[dict[str, Any]]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, event: _Event) -> dict[str, Any]:
        raise NotImplementedError

    def closing(self) -> list[dict[str, Any]]:
        return []


class _OpenAIAnswer(_Answer):
    """A completion or chat completion as OpenAI words it, with `n` choices."""

    done_line = True

    def __init__(self, chat: bool, body: dict, rows: list[_Row]) -> None:
        super().__init__(rows)
        self.chat = chat
        self.model = _typed(body, "model", str, "")
        self.stream = bool(body.get("stream"))
        self.usage = bool((_typed(body, "stream_options", dict, {}) or {}).get("include_usage"))
        self.logprobs = rows[0].queued.seq.sampling.logprobs is not None
        self.offsets = [0] * len(rows)  # per choice, the characters its token texts have taken (text_offset)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if self.stream and self.chat else ""),
                "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, text: str, reason: str | None, logprobs: list[_TokenLogprob]) -> dict[str, Any]:
        words = self._logprobs(index, logprobs) if self.logprobs else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": words, "finish_reason": reason}
        key = "delta" if self.stream else "message"
        return {"index": index, key: {"role": "assistant", "content": text}, "logprobs": words,
                "finish_reason": reason}

    def _logprobs(self, index: int, logprobs: list[_TokenLogprob]) -> dict[str, Any]:
        """OpenAI's logprobs object for these tokens of choice `index`: chat's `content` list, or completions'
        parallel lists (with each token's place in the choice's text)."""
        if self.chat:
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": [{"token": text, "logprob": v, "bytes": list(text.encode())}
                                                  for _, text, v in t.top]} for t in logprobs]}
        offsets = []
        for t in logprobs:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(t.text)
        return {"tokens": [t.text for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
                "top_logprobs": [{text: v for _, text, v in t.top} for t in logprobs], "text_offset": offsets}

    def _usage(self) -> dict[str, int]:
        prompt = len(self.prepared.ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def whole(self) -> dict[str, Any]:
        out = self._envelope([self._choice(i, c.text, c.reason, c.logprobs) for i, c in enumerate(self.choices)])
        out["usage"] = self._usage()
        out["adapters"] = self.adapters()
        return out

    def opening(self) -> list[dict[str, Any]]:
        """The first chunk: no text yet, the adapters as resolved."""
        out = self._envelope([self._choice(i, "", None, []) for i in range(len(self.choices))])
        out["adapters"] = self.adapters()
        return [out]

    def chunk(self, event: _Event) -> dict[str, Any]:
        choice = self.take(event)
        out = self._choice(event.index, event.piece, choice.reason, event.logprobs)
        if self.chat:
            out["delta"].pop("role")
        return self._envelope([out])

    def closing(self) -> list[dict[str, Any]]:
        """With stream_options.include_usage: a last chunk with no choices and the usage."""
        if not self.usage:
            return []
        out = self._envelope([])
        out["usage"] = self._usage()
        return [out]


class _LoraxAnswer(_Answer):
    """A generation as LoRAX (and TGI) word it: `generated_text` and `details` (per-token logprobs, the
    prompt's with `decoder_input_details`, the top tokens with `top_n_tokens` / `return_k_alternatives`)."""

    def __init__(self, rows: list[_Row], stream: bool, listed: bool, parameters: dict) -> None:
        super().__init__(rows)
        self.stream = stream
        self.listed = listed
        self.details = stream or bool(parameters.get("details"))
        self.top = bool(parameters.get("top_n_tokens") or parameters.get("return_k_alternatives"))

    def _token(self, t: _TokenLogprob) -> dict[str, Any]:
        out = {"id": t.id, "text": t.text, "logprob": t.logprob, "special": False}
        if self.top:
            out["alternative_tokens"] = [{"id": i, "text": text, "logprob": v} for i, text, v in t.top]
        return out

    def _top_tokens(self, t: _TokenLogprob) -> list[dict[str, Any]]:
        return [{"id": i, "text": text, "logprob": v, "special": False} for i, text, v in t.top]

    def _prefill(self) -> list[dict[str, Any]]:
        return [{"id": i, "text": text, "logprob": lp} for i, text, lp in self.rows[0].prefill or []]

    def _details(self) -> dict[str, Any]:
        choice = self.choices[0]
        out: dict[str, Any] = {"finish_reason": choice.lorax_reason,
               "prompt_tokens": len(self.prepared.ids), "generated_tokens": choice.tokens,
               "seed": self.rows[0].queued.seq.sampling.seed, "prefill": self._prefill(),
               "tokens": [self._token(t) for t in choice.logprobs], "adapters": self.adapters()}
        if self.top:
            out["top_tokens"] = [self._top_tokens(t) for t in choice.logprobs]
        return out

    def whole(self) -> dict[str, Any] | list[dict[str, Any]]:
        out = {"generated_text": self.choices[0].text, "details": self._details() if self.details else None}
        return [out] if self.listed else out

    def chunk(self, event: _Event) -> dict[str, Any]:
        choice = self.take(event)
        last = event.finished is not None
        # an event without a token is the end (EOS, which is not reported, or a stop string's last text)
        token = self._token(event.logprobs[-1]) if event.logprobs else \
            {"id": event.tokens[-1] if event.tokens else 0, "text": "", "logprob": 0.0, "special": True}
        token["text"] = event.piece
        out: dict[str, Any] = {"token": token, "generated_text": choice.text if last else None,
                               "details": self._details() if last else None}
        if self.top and event.logprobs:
            out["top_tokens"] = self._top_tokens(event.logprobs[-1])
        return out
