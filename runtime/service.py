"""The `adapterhub.v1.Runtime` RPCs: request messages -> the shared request path (runtime/core.py) -> replies.

Every refusal is one runtime.errors exception, turned into the RPC's status here, in one place (`_rpc`, by
the GRPC_CODES table).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import grpc

from runtime import errors
from runtime.core import AdapterRequest, Limits, Prepared, Resolved, Serving, Slots, ok, sampling_params
from runtime.errors import ServeError
from runtime.merged import MergedManifest, MergeOptions
from runtime.pool import Entry, Tier
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.proto.adapterhub.v1 import runtime_pb2_grpc as pb_grpc
from runtime.requestlog import REQUEST_ID_KEY, RequestLog, RequestRecord
from runtime.scheduler import Request
from runtime.textstream import TextStream

MAX_PAGE_SIZE = 1000  # ListAdapters entries per reply (and with no page_size): a reply far below the message cap
_MODES: dict[int, str] = {pb.COMPOSITION_MODE_UNSPECIFIED: "stack", pb.COMPOSITION_MODE_STACK: "stack",
          pb.COMPOSITION_MODE_AVERAGE: "average", pb.COMPOSITION_MODE_MERGE: "merge"}
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


def _sampling(msg: pb.SamplingParams, limits: Limits):
    def field(name: str):
        return getattr(msg, name) if msg.HasField(name) else None

    return sampling_params(limits, max_new_tokens=field("max_new_tokens"), temperature=field("temperature"),
                           top_p=field("top_p"), top_k=msg.top_k, seed=field("seed"), stop=tuple(msg.stop))


def _adapters(specs) -> list[AdapterRequest]:
    return [AdapterRequest(s.ref, s.weight if s.HasField("weight") else 1.0) for s in specs]


def _mode(mode: int) -> str:
    ok(mode in _MODES, f"unknown composition mode {mode}")
    return _MODES[mode]


def _resolved(r: Resolved) -> pb.ResolvedAdapter:
    return pb.ResolvedAdapter(ref=r.ref, name=r.name, version=r.version, sha256=r.sha256, technique=r.technique,
                              weight=r.weight)


def adapter_info(entry: Entry) -> pb.AdapterInfo:
    m = entry.manifest
    return pb.AdapterInfo(ref=m.ref, name=m.name, version=m.version, sha256=m.sha256, technique=m.technique,
                          tier=_TIERS[entry.tier], size_bytes=entry.device_bytes or entry.host_bytes or m.size,
                          pinned=entry.pinned, last_used_unix=entry.last_used_unix, requests_served=entry.requests,
                          in_use=entry.in_use, parents=[p.ref for p in m.parents] if isinstance(m, MergedManifest) else [])


def note(record: RequestRecord, prepared: Prepared) -> None:
    """What the request log reports of a prepared request: its adapters as resolved and its prompt size."""
    record.adapters = [a.ref for a in prepared.resolved]
    record.tokens_in = len(prepared.ids)


class RuntimeService(pb_grpc.RuntimeServicer):
    """The servicer; `info` is the GetInfo answer, built once by the server."""

    def __init__(self, core: Serving, info: pb.GetInfoResponse, *, request_log: RequestLog | None = None):
        self.core = core
        self.engine = core.engine
        self.pool = core.pool
        self.scheduler = core.scheduler
        self.limits = core.limits
        self.request_log = request_log
        self.info = info
        self.metrics = core.pool.metrics
        self.requests = core.requests  # inference requests, whichever frontend they came by
        self.admin = core.admin

    # -- plumbing ----------------------------------------------------------------------------------
    @contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext,
             slots: Slots | None = None) -> Iterator[RequestRecord]:
        """Time the RPC, count it by status code, turn a ServeError into the RPC's status, and log it
        (the handler fills in the record it is given); with `slots`, the RPC holds one of them
        throughout (refused at once when none is free). The client gets the log's request id as metadata
        (`x-request-id`, initial and trailing: an error carries it too), to quote to the operator."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        record = RequestRecord(method)
        context.send_initial_metadata(((REQUEST_ID_KEY, record.id),))
        context.set_trailing_metadata(((REQUEST_ID_KEY, record.id),))
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
            self.metrics.requests.labels(frontend="grpc", method=method, code=code.name).inc()
            self.metrics.latency.labels(frontend="grpc", method=method).observe(time.perf_counter() - started)
            if self.request_log is not None:
                self.request_log.write(record, code.name, time.perf_counter() - started)

    def _run(self, request: pb.GenerateRequest, context: grpc.ServicerContext
             ) -> tuple[Prepared, Request, TextStream]:
        """Check, hold adapters, queue; cancellation and deadlines take the request out at once."""
        sampling = _sampling(request.sampling, self.limits)
        ids = self.core.token_ids(request.prompt, request.prompt_token_ids, chat=request.chat, what="prompt",
                                   adapter=_chat_adapter(request))
        prepared, queued, text = self.core.start(ids, sampling, _adapters(request.adapters), _mode(request.mode),
                                                 merge_options(request.merge), context.is_active)
        if not context.add_callback(lambda: self.scheduler.cancel(queued)):
            self.scheduler.cancel(queued)  # the RPC ended already
        return prepared, queued, text

    def _usage(self, prepared: Prepared, completion: int) -> pb.Usage:
        prompt = len(prepared.ids)
        return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -- RPCs --------------------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        with self._rpc("Generate", context, self.requests) as record:
            prepared, queued, text = self._run(request, context)
            note(record, prepared)
            try:
                ids: list[int] = []
                reason = None
                for tokens, _piece, finished in self.core.events(queued, text):
                    ids += tokens
                    reason = finished.reason if finished else None
            finally:
                self.pool.release(prepared.lease)
            record.tokens_out = len(ids)
            return pb.GenerateResponse(text=text.text, token_ids=ids, finish_reason=reason or "",
                                       usage=self._usage(prepared, len(ids)),
                                       adapters=[_resolved(r) for r in prepared.resolved])

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        with self._rpc("GenerateStream", context, self.requests) as record:
            prepared, queued, text = self._run(request, context)
            note(record, prepared)
            try:
                yield pb.GenerateChunk(adapters=[_resolved(r) for r in prepared.resolved])
                count = 0
                for tokens, piece, finished in self.core.events(queued, text):
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
            ids = self.core.token_ids(request.text, request.token_ids, chat=request.chat, what="text",
                                      adapter=_chat_adapter(request))
            ok(len(ids) >= 2, "scoring needs at least 2 tokens (the first has no context)")
            prepared = self.core.prepare(ids, _adapters(request.adapters), _mode(request.mode),
                                         merge_options(request.merge), 0, context.is_active)
            note(record, prepared)
            try:
                logprobs = self.core.score(prepared)
            finally:
                self.pool.release(prepared.lease)
            logprobs = [float(x) for x in logprobs if x is not None]
            tokenizer = self.engine.tokenizer
            tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else []
            return pb.ScoreResponse(token_ids=ids, logprobs=logprobs, total_logprob=sum(logprobs),
                                    usage=self._usage(prepared, 0), adapters=[_resolved(r) for r in prepared.resolved],
                                    tokens=tokens)

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


def _chat_adapter(request) -> str | None:
    """The adapter whose own chat template a chat request gets: the one it names, if it names one."""
    return request.adapters[0].ref if len(request.adapters) == 1 else None
