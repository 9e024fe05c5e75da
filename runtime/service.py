"""The `adapterhub.v1.Runtime` RPCs: request -> checked inputs -> plan -> scheduler -> response.

Every check that can refuse a request runs before the request takes anything (a queue place,
an adapter hold), except the engine's own check of a plan (e.g. a weighted soft prompt), which runs
when the request joins the batch (the engine's lock is held for a whole step, and a request handler
must not wait a step for it). Every refusal is one runtime.errors exception, turned into the RPC's
status here, in one place (`_rpc`, by the GRPC_CODES table). A request holds its adapters (a pool Lease) from before it
is queued until it leaves the batch, so an adapter in use is never evicted.
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import grpc

from runtime import errors
from runtime.errors import InvalidArgument, QueueFull, ServeError
from runtime.generate import SamplingParams, Sequence, score
from runtime.merged import MergeOptions, merged_manifest
from runtime.plan import AdapterUse, PlanError, RowPlan
from runtime.pool import AdapterPool, Entry, Lease, Tier
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.proto.adapterhub.v1 import runtime_pb2_grpc as pb_grpc
from runtime.requestlog import RequestLog, RequestRecord
from runtime.scheduler import Finished, Request, Scheduler
from runtime.textstream import TextStream

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_PAGE_SIZE = 1000  # ListAdapters entries per reply (and with no page_size): ~200 KB, far below the message cap
TOKENIZING_AT_ONCE = 4  # prompts tokenized at once: a tokenizer's working memory is many times its text's
_MODES = {pb.COMPOSITION_MODE_UNSPECIFIED: "stack", pb.COMPOSITION_MODE_STACK: "stack",
          pb.COMPOSITION_MODE_AVERAGE: "average"}
_TIERS = {Tier.DEVICE: pb.TIER_DEVICE, Tier.HOST: pb.TIER_HOST, Tier.DISK: pb.TIER_DISK}
# Each kind of refusal as the status code a gRPC client gets (a subclass maps as its nearest listed class).
GRPC_CODES: dict[type[ServeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unusable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NoRoom: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DamagedData: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def grpc_code(error: ServeError) -> grpc.StatusCode:
    """The status code of a refusal, by the nearest class GRPC_CODES lists."""
    return next((GRPC_CODES[c] for c in type(error).__mro__ if c in GRPC_CODES), grpc.StatusCode.INTERNAL)


def merge_options(msg: pb.MergeOptions) -> MergeOptions:
    """A request's MergeOptions message as the core's plain options (unset fields: the defaults)."""
    return MergeOptions(method=msg.method, density=msg.density if msg.HasField("density") else None,
                        majority_sign=msg.majority_sign or None,
                        svd_rank=msg.svd_rank if msg.HasField("svd_rank") else None,
                        svd_clamp=msg.svd_clamp if msg.HasField("svd_clamp") else None,
                        seed=msg.seed if msg.HasField("seed") else None)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; GetInfo reports them."""

    max_new_tokens: int
    max_adapters_per_request: int
    context_length: int


class Slots:
    """A bound on the RPCs of one kind in flight; past it, RESOURCE_EXHAUSTED at once.

    Requests that wait (for a row, for adapter memory, for a load) hold an RPC thread meanwhile; bounding
    each kind below the server's thread count leaves threads for the others, so waiting requests can never
    crowd out Health, GetInfo or the admin RPCs."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what
        self._used = 0
        self._lock = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._used >= self.limit:
                raise QueueFull(f"the server is at capacity: {self.limit} {self._what}; retry later")
            self._used += 1
        try:
            yield
        finally:
            with self._lock:
                self._used -= 1


@dataclass
class Prepared:
    """A checked request that holds its adapters: ready to queue (or to score)."""

    ids: list[int]
    plan: RowPlan
    lease: Lease
    resolved: list[pb.ResolvedAdapter]
    virtual_tokens: int  # soft-prompt tokens the plan puts before the prompt


def _ok(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgument(message)


def sampling_params(msg: pb.SamplingParams, limits: Limits) -> SamplingParams:
    """The engine's sampling parameters from the request's, each value checked."""
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else min(DEFAULT_MAX_NEW_TOKENS,
                                                                           limits.max_new_tokens)
    _ok(1 <= max_new <= limits.max_new_tokens, f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {max_new}")
    temperature = msg.temperature if msg.HasField("temperature") else 0.0
    _ok(math.isfinite(temperature) and temperature >= 0, f"temperature must be >= 0, got {temperature}")
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    _ok(math.isfinite(top_p) and 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    stop = tuple(msg.stop)
    _ok(len(stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    _ok(all(0 < len(s) <= MAX_STOP_CHARS for s in stop), f"stop strings must be 1..{MAX_STOP_CHARS} characters")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=msg.top_k,
                          seed=msg.seed if msg.HasField("seed") else None, stop=stop)


def longest_token(tokenizer) -> int:
    """The most characters one vocabulary entry spells, so no prompt of more than context x this characters
    can fit the context: each token covers at most that many characters of the text (byte-level and
    SentencePiece vocabularies spell each byte or character of what they cover with one character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _resolved(m, weight: float) -> pb.ResolvedAdapter:
    """An adapter as a response reports it (a per-request merge reports its parents)."""
    return pb.ResolvedAdapter(ref=m.ref, name=m.name, version=m.version, sha256=m.sha256, technique=m.technique,
                              weight=weight)


def adapter_info(entry: Entry) -> pb.AdapterInfo:
    m = entry.manifest
    return pb.AdapterInfo(ref=m.ref, name=m.name, version=m.version, sha256=m.sha256, technique=m.technique,
                          tier=_TIERS[entry.tier], size_bytes=entry.device_bytes or entry.host_bytes or m.size,
                          pinned=entry.pinned, last_used_unix=entry.last_used_unix, requests_served=entry.requests,
                          in_use=entry.in_use, parents=[p.ref for p in getattr(m, "parents", ())])


def _note(record: RequestRecord, prepared: Prepared) -> None:
    """What the request log reports of a prepared request: its adapters as resolved and its prompt size."""
    record.adapters = [a.ref for a in prepared.resolved]
    record.tokens_in = len(prepared.ids)


class RuntimeService(pb_grpc.RuntimeServicer):
    """The servicer; `info` is the GetInfo answer, built once by the server."""

    def __init__(self, engine, pool: AdapterPool, scheduler: Scheduler, limits: Limits, info: pb.GetInfoResponse,
                 *, max_requests: int, max_admin: int, request_log: RequestLog | None = None):
        self.engine = engine
        self.request_log = request_log
        self.pool = pool
        self.scheduler = scheduler
        self.limits = limits
        self.info = info
        self.metrics = pool.metrics
        # inference RPCs running, queued or waiting for adapter memory; admin loads waiting for room
        self.requests = Slots(max_requests, "requests are running, queued or waiting for adapter memory")
        self.admin = Slots(max_admin, "adapter loads and unloads are in progress")
        tokenizer = engine.tokenizer
        self._max_text_chars = limits.context_length * (longest_token(tokenizer) if tokenizer is not None else 1)
        self._tokenizing = threading.BoundedSemaphore(TOKENIZING_AT_ONCE)

    # -- plumbing ----------------------------------------------------------------------------------
    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext,
             slots: Slots | None = None) -> Iterator[RequestRecord]:
        """Time the RPC, count it by status code, turn a ServeError into the RPC's status, and log it
        (the handler fills in the record it is given); with `slots`, the RPC holds one of them
        throughout (refused at once when none is free)."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        record = RequestRecord(method)
        try:
            if slots is None:
                yield record
            else:
                with slots.held():
                    yield record
        except ServeError as e:
            code = grpc_code(e)
            context.abort(code, e.message)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if code is grpc.StatusCode.OK and not context.is_active():
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self.metrics.requests.labels(method=method, code=code.name).inc()
            self.metrics.latency.labels(method=method).observe(time.perf_counter() - started)
            if self.request_log is not None:
                self.request_log.write(record, code.name, time.perf_counter() - started)

    def _token_ids(self, text: str, ids, *, chat: bool, what: str) -> list[int]:
        """The prompt as token ids: exactly one of text or ids, every id in the vocabulary. A text too long
        for the context whatever its tokens is refused before it is tokenized, and a few texts at most are
        tokenized at once (a multi-megabyte prompt took gigabytes of tokenizer memory)."""
        _ok(not (text and ids), f"give the {what} as text or as token ids, not both")
        tokenizer = self.engine.tokenizer
        if ids:
            _ok(not chat, "chat applies the chat template to text: send the prompt as text")
            vocab = self.engine.model.config.vocab_size
            bad = [i for i in ids if i >= vocab]
            _ok(not bad, f"token id {bad[:1]} is outside the vocabulary (size {vocab})")
            return list(ids)
        _ok(bool(text), f"the {what} is empty")
        _ok(tokenizer is not None, "this server's base model has no tokenizer: send token ids")
        _ok(len(text) <= self._max_text_chars, f"the {what} is {len(text)} characters: more than the context "
            f"length {self.limits.context_length} can hold in any tokens (at most {self._max_text_chars} characters)")
        if chat:
            _ok(getattr(tokenizer, "chat_template", None) is not None, "the base model has no chat template")
            with self._tokenizing:
                out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)
            return list(out["input_ids"])
        with self._tokenizing:
            out = list(tokenizer(text)["input_ids"])
        _ok(bool(out), f"the {what} is empty after tokenization")
        return out

    def _prepare(self, ids: list[int], specs, mode: int, context_needed: int, context: grpc.ServicerContext,
                 merge: pb.MergeOptions | None = None) -> Prepared:
        """Resolve the adapters, hold them on the device, and check the context fits."""
        _ok(mode in _MODES or mode == pb.COMPOSITION_MODE_MERGE, f"unknown composition mode {mode}")
        _ok(len(specs) <= self.limits.max_adapters_per_request,
            f"{len(specs)} adapters named; at most {self.limits.max_adapters_per_request} per request")
        weights = [s.weight if s.HasField("weight") else 1.0 for s in specs]
        _ok(all(math.isfinite(w) for w in weights), "adapter weights must be finite numbers")
        if _MODES.get(mode) == "average" and specs:
            _ok(sum(weights) != 0, "average mode needs weights that do not sum to 0")
        manifests = [self.pool.resolve(s.ref) for s in specs]
        refs = [m.ref for m in manifests]
        _ok(len(set(refs)) == len(refs), f"an adapter is named twice: {', '.join(refs)}")
        resolved = [_resolved(m, w) for m, w in zip(manifests, weights)]
        if mode == pb.COMPOSITION_MODE_MERGE:  # one adapter serves the request: the merge (runtime/merged.py)
            manifests, weights = [merged_manifest(manifests, weights, merge_options(merge or pb.MergeOptions()))], [1.0]
        # Generate submits, Score calls, next; waiting for device room ends when the client goes
        lease = self.pool.acquire(manifests, then_submit=True, alive=context.is_active)
        try:
            plan = RowPlan(tuple(AdapterUse(k, w) for k, w in zip(lease.keys, weights)), _MODES.get(mode, "stack"))
            virtual = self.pool.soft_prompt_tokens(lease)
            total = len(ids) + virtual
            soft = f" ({virtual} of them soft prompt)" if virtual else ""
            _ok(total + context_needed <= self.limits.context_length,
                f"the prompt is {total} tokens{soft}: "
                + ("no room is left for a new token within" if context_needed else "that is past")
                + f" the context length {self.limits.context_length}")
        except BaseException:
            self.pool.release(lease)
            raise
        return Prepared(ids, plan, lease, resolved, virtual)

    def _run(self, request: pb.GenerateRequest, context: grpc.ServicerContext
             ) -> tuple[Prepared, Request, TextStream]:
        """Check, hold adapters, queue; cancellation and deadlines take the request out at once."""
        sampling = sampling_params(request.sampling, self.limits)
        ids = self._token_ids(request.prompt, request.prompt_token_ids, chat=request.chat, what="prompt")
        prepared = self._prepare(ids, request.adapters, request.mode, 1, context, request.merge)
        room = self.limits.context_length - len(ids) - prepared.virtual_tokens
        sampling.max_new_tokens = min(sampling.max_new_tokens, room)
        seq = Sequence(id=uuid.uuid4().hex, prompt_ids=ids, plan=prepared.plan, sampling=sampling)
        try:
            queued = self.scheduler.submit(seq)
        except BaseException:
            self.pool.release(prepared.lease)
            raise
        if not context.add_callback(lambda: self.scheduler.cancel(queued)):
            self.scheduler.cancel(queued)  # the RPC ended already
        return prepared, queued, TextStream(self.engine.tokenizer, sampling.stop)

    def _usage(self, prepared: Prepared, completion: int) -> pb.Usage:
        prompt = len(prepared.ids)
        return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _events(self, queued: Request, text: TextStream) -> Iterator[tuple[list[int], str, Finished | None]]:
        """(new tokens, new text, Finished on the last) per scheduler event; a stop string ends it."""
        for event in queued.stream():
            if isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                yield [], text.finish(), event
                return
            piece = text.push(event)
            if text.stopped:
                self.scheduler.cancel(queued)
                yield event, piece + text.finish(), Finished("stop")
                return
            yield event, piece, None

    # -- RPCs --------------------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        with self._rpc("Generate", context, self.requests) as record:
            prepared, queued, text = self._run(request, context)
            _note(record, prepared)
            try:
                ids: list[int] = []
                reason = None
                for tokens, _piece, finished in self._events(queued, text):
                    ids += tokens
                    reason = finished.reason if finished else None
            finally:
                self.pool.release(prepared.lease)
            record.tokens_out = len(ids)
            return pb.GenerateResponse(text=text.text, token_ids=ids, finish_reason=reason or "",
                                       usage=self._usage(prepared, len(ids)), adapters=prepared.resolved)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        with self._rpc("GenerateStream", context, self.requests) as record:
            prepared, queued, text = self._run(request, context)
            _note(record, prepared)
            try:
                yield pb.GenerateChunk(adapters=prepared.resolved)
                count = 0
                for tokens, piece, finished in self._events(queued, text):
                    count += len(tokens)
                    record.tokens_out = count
                    if finished is None:
                        yield pb.GenerateChunk(text=piece, token_ids=tokens)
                    else:
                        yield pb.GenerateChunk(text=piece, token_ids=tokens, finish_reason=finished.reason or "",
                                               usage=self._usage(prepared, count))
            finally:
                self.scheduler.cancel(queued)  # a client that stops reading leaves the batch too
                self.pool.release(prepared.lease)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self._rpc("Score", context, self.requests) as record:
            ids = self._token_ids(request.text, request.token_ids, chat=request.chat, what="text")
            _ok(len(ids) >= 2, "scoring needs at least 2 tokens (the first has no context)")
            prepared = self._prepare(ids, request.adapters, request.mode, 0, context, request.merge)
            _note(record, prepared)
            try:
                logprobs = self.scheduler.call(lambda: score(self.engine, ids, prepared.plan))
            except PlanError as e:
                raise InvalidArgument(str(e)) from None
            finally:
                self.pool.release(prepared.lease)
            logprobs = [float(x) for x in logprobs if x is not None]
            tokenizer = self.engine.tokenizer
            tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else []
            return pb.ScoreResponse(token_ids=ids, logprobs=logprobs, total_logprob=sum(logprobs),
                                    usage=self._usage(prepared, 0), adapters=prepared.resolved, tokens=tokens)

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        with self._rpc("LoadAdapter", context, self.admin):
            entry, seconds = self.pool.load(request.ref, pin=request.pin, alive=context.is_active)
            return pb.LoadAdapterResponse(adapter=adapter_info(entry), load_seconds=seconds)

    def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
                      ) -> pb.UnloadAdapterResponse:
        with self._rpc("UnloadAdapter", context, self.admin):
            return pb.UnloadAdapterResponse(adapter=adapter_info(self.pool.unload(request.ref)))

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
                     ) -> pb.ListAdaptersResponse:
        with self._rpc("ListAdapters", context):
            size = request.page_size if 0 < request.page_size <= MAX_PAGE_SIZE else MAX_PAGE_SIZE
            entries = self.pool.entries(after=request.page_token)
            page = entries[:size]
            return pb.ListAdaptersResponse(adapters=[adapter_info(e) for e in page],
                                           device_budget_bytes=self.pool.device_budget,
                                           device_used_bytes=self.pool.device_used(),
                                           next_page_token=page[-1].key if len(entries) > size else "")

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        with self._rpc("GetInfo", context):
            return self.info

