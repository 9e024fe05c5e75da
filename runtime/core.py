"""The request path both frontends share: checked inputs -> adapters held -> plan -> scheduler -> events.

gRPC (runtime/service.py) and HTTP (runtime/http.py) each turn their request into these plain calls and
their answers back; the checks, the adapter holds, the queueing and the stop strings live here once.
Every check that can refuse a request runs before the request takes anything (a queue place, an adapter
hold), except the engine's own check of a plan (e.g. a weighted soft prompt), which runs when the request
joins the batch. Every refusal is a runtime.errors exception. A request holds its adapters (a pool Lease)
from before it is queued until it leaves the batch, so an adapter in use is never evicted.
"""
from __future__ import annotations

import math
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from hub.chat_template import chat_template
from hub.manifest import Manifest
from runtime.contracts import ServedManifest
from runtime.errors import InvalidArgument, QueueFull
from runtime.generate import Row, SamplingParams, score
from runtime.sampling import MAX_TOP_LOGPROBS
from runtime.merged import MergeOptions, merged_manifest
from runtime.plan import AdapterUse, PlanError, RowPlan
from runtime.pool import AdapterPool, Lease
from runtime.scheduler import Finished, Request, Scheduler
from runtime.textstream import TextStream

if TYPE_CHECKING:
    from hub.registry import Registry

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
TOKENIZING_AT_ONCE = 4  # prompts tokenized at once: a tokenizer's working memory is many times its text's
MODES = ("stack", "average", "merge")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; GetInfo reports them."""

    max_new_tokens: int
    max_adapters_per_request: int
    context_length: int


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter a request names, with its weight."""

    ref: str
    weight: float = 1.0


@dataclass(frozen=True)
class Resolved:
    """An adapter as a response reports it: the exact version the ref named."""

    ref: str
    name: str
    version: str
    sha256: str
    technique: str
    weight: float


class Slots:
    """A bound on the requests of one kind in flight, over every frontend; past it, QueueFull at once.

    Requests that wait (for a row, for adapter memory, for a load) hold a request thread meanwhile; bounding
    each kind below the server's thread count leaves threads for the others, so waiting requests can never
    crowd out health checks, info or the admin calls."""

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
    resolved: list[Resolved]
    virtual_tokens: int  # soft-prompt tokens the plan puts before the prompt


def ok(condition: bool, message: str) -> None:
    """InvalidArgument(message) unless `condition`."""
    if not condition:
        raise InvalidArgument(message)


def sampling_params(limits: Limits, *, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                    stop: tuple[str, ...] = (), logprobs: int | None = None) -> SamplingParams:
    """The engine's sampling parameters from a request's (None: the default), each value checked."""
    max_new = max_new_tokens if max_new_tokens is not None else min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    ok(1 <= max_new <= limits.max_new_tokens, f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {max_new}")
    temperature = 0.0 if temperature is None else temperature
    ok(math.isfinite(temperature) and temperature >= 0, f"temperature must be >= 0, got {temperature}")
    top_p = 1.0 if top_p is None else top_p
    ok(math.isfinite(top_p) and 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    ok(top_k >= 0, f"top_k must be >= 0, got {top_k}")
    ok(len(stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    ok(all(0 < len(s) <= MAX_STOP_CHARS for s in stop), f"stop strings must be 1..{MAX_STOP_CHARS} characters")
    ok(logprobs is None or 0 <= logprobs <= MAX_TOP_LOGPROBS,
       f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}")
    return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, stop=tuple(stop), logprobs=logprobs)


def longest_token(tokenizer) -> int:
    """The most characters one vocabulary entry spells, so no prompt of more than context x this characters
    can fit the context: each token covers at most that many characters of the text (byte-level and
    SentencePiece vocabularies spell each byte or character of what they cover with one character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _resolved(m: Manifest, weight: float) -> Resolved:
    return Resolved(ref=m.ref, name=m.name, version=m.version, sha256=m.sha256, technique=m.technique, weight=weight)


class Serving:
    """One engine, pool and scheduler as requests of any frontend use them; `registry` is the one the pool reads
    (files beside an adapter's weights, such as its chat template, are read from it too)."""

    def __init__(self, engine, pool: AdapterPool, scheduler: Scheduler, limits: Limits, *, registry: Registry,
                 max_requests: int, max_admin: int) -> None:
        self.engine = engine
        self.pool = pool
        self.registry = registry
        self.scheduler = scheduler
        self.limits = limits
        # inference requests running, queued or waiting for adapter memory, whichever frontend they came by
        self.requests = Slots(max_requests, "requests are running, queued or waiting for adapter memory")
        self.admin = Slots(max_admin, "adapter loads and unloads are in progress")  # loads may wait for room
        tokenizer = engine.tokenizer
        self._max_text_chars = limits.context_length * (longest_token(tokenizer) if tokenizer is not None else 1)
        self._tokenizing = threading.BoundedSemaphore(TOKENIZING_AT_ONCE)
        self._templates: dict[str, str | None] = {}  # adapter version (sha256) -> its own chat template

    def token_ids(self, text: str, ids, *, chat: bool, what: str, adapter: str | None = None) -> list[int]:
        """The prompt as token ids: exactly one of text or ids, every id in the vocabulary; `chat` applies the
        chat template (`adapter`'s own where it ships one) to `text` as one user message."""
        ok(not (text and ids), f"give the {what} as text or as token ids, not both")
        if ids:
            ok(not chat, "chat applies the chat template to text: send the prompt as text")
            vocab = self.engine.model.config.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            ok(not bad, f"token id {bad[:1]} is outside the vocabulary (size {vocab})")
            return list(ids)
        ok(bool(text), f"the {what} is empty")
        if chat:
            return self.chat_ids([{"role": "user", "content": text}], adapter)
        self._check_text(len(text), what)
        with self._tokenizing:
            out = list(self.engine.tokenizer(text)["input_ids"])
        ok(bool(out), f"the {what} is empty after tokenization")
        return out

    def chat_ids(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        """A conversation through the chat template of `adapter` (a ref) where it ships one, else the base
        model's, ready for the assistant's turn."""
        ok(bool(messages), "the conversation has no messages")
        self._check_text(sum(len(m["content"]) for m in messages), "conversation")
        template = self.adapter_template(adapter) if adapter else None
        ok(template is not None or getattr(self.engine.tokenizer, "chat_template", None) is not None,
           "the base model has no chat template")
        with self._tokenizing:
            out = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True, chat_template=template)
        return list(out["input_ids"])

    def adapter_template(self, ref: str) -> str | None:
        """The chat template an adapter version ships (hub/chat_template.py), read once per version."""
        manifest = self.pool.resolve(ref)
        if manifest.sha256 not in self._templates:
            registry = self.registry
            self._templates[manifest.sha256] = chat_template(
                set(manifest.files), lambda name: registry.file_path(manifest, name).read_bytes())
        return self._templates[manifest.sha256]

    def _check_text(self, chars: int, what: str) -> None:
        """A text too long for the context whatever its tokens is refused before it is tokenized (a
        huge prompt takes the tokenizer many times its size in memory)."""
        ok(self.engine.tokenizer is not None, "this server's base model has no tokenizer: send token ids")
        ok(chars <= self._max_text_chars, f"the {what} is {chars} characters: more than the context "
           f"length {self.limits.context_length} can hold in any tokens (at most {self._max_text_chars} characters)")

    def prepare(self, ids: list[int], adapters: list[AdapterRequest], mode: str, merge: MergeOptions | None,
                context_needed: int, alive: Callable[[], bool]) -> Prepared:
        """Resolve the adapters, hold them on the device, and check the context fits."""
        ok(mode in MODES, f"unknown composition mode {mode!r}: one of {', '.join(MODES)}")
        ok(len(adapters) <= self.limits.max_adapters_per_request,
           f"{len(adapters)} adapters named; at most {self.limits.max_adapters_per_request} per request")
        weights = [a.weight for a in adapters]
        ok(all(math.isfinite(w) for w in weights), "adapter weights must be finite numbers")
        if mode == "average" and adapters:
            ok(sum(weights) != 0, "average mode needs weights that do not sum to 0")
        named = [self.pool.resolve(a.ref) for a in adapters]
        refs = [m.ref for m in named]
        ok(len(set(refs)) == len(refs), f"an adapter is named twice: {', '.join(refs)}")
        resolved = [_resolved(m, w) for m, w in zip(named, weights)]
        manifests: list[ServedManifest] = list(named)
        if mode == "merge":  # one adapter serves the request: the merge (runtime/merged.py)
            manifests, weights = [merged_manifest(named, weights, merge or MergeOptions())], [1.0]
        # generation submits, scoring calls, next; waiting for device room ends when the client goes
        lease = self.pool.acquire(manifests, then_submit=True, alive=alive)
        try:
            plan = RowPlan(tuple(AdapterUse(k, w) for k, w in zip(lease.keys, weights)),
                           "average" if mode == "average" else "stack")
            virtual = self.pool.soft_prompt_tokens(lease)
            total = len(ids) + virtual
            soft = f" ({virtual} of them soft prompt)" if virtual else ""
            ok(total + context_needed <= self.limits.context_length,
               f"the prompt is {total} tokens{soft}: "
               + ("no room is left for a new token within" if context_needed else "that is past")
               + f" the context length {self.limits.context_length}")
        except BaseException:
            self.pool.release(lease)
            raise
        return Prepared(ids, plan, lease, resolved, virtual)

    def start(self, ids: list[int], sampling: SamplingParams, adapters: list[AdapterRequest], mode: str,
              merge: MergeOptions | None, alive: Callable[[], bool]) -> tuple[Prepared, Request, TextStream]:
        """Hold the adapters and queue the request. The caller cancels it (`scheduler.cancel`) when its client
        goes, and releases `prepared.lease` when it is done with it."""
        prepared = self.prepare(ids, adapters, mode, merge, 1, alive)
        room = self.limits.context_length - len(ids) - prepared.virtual_tokens
        sampling.max_new_tokens = min(sampling.max_new_tokens, room)
        # the batch decodes into it when there are stop strings; `events` decodes into it otherwise
        text = TextStream(self.engine.tokenizer, sampling.stop)
        seq = Row(id=uuid.uuid4().hex, prompt_ids=ids, plan=prepared.plan, sampling=sampling, text=text)
        try:
            queued = self.scheduler.submit(seq)
        except BaseException:
            self.pool.release(prepared.lease)
            raise
        return prepared, queued, text

    def score(self, prepared: Prepared) -> list[float]:
        """log P(token i+1 | tokens 0..i) of the prepared ids under its plan, on the scheduler's thread."""
        try:
            return self.scheduler.call(lambda: score(self.engine, prepared.ids, prepared.plan))
        except PlanError as e:
            raise InvalidArgument(str(e)) from None

    def events(self, queued: Request, text: TextStream) -> Iterator[tuple[list[int], str, Finished | None]]:
        """(new tokens, new text, Finished on the last) per scheduler event; a stop string ends it. Each token is
        decoded once: by the batch for a request with stop strings (it watches for them), else here."""
        for event in queued.stream():
            if isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                yield [], text.finish(), event
                return
            piece = text.push(event.ids) if event.text is None else event.text
            if event.stop:
                yield event.ids, piece + text.finish(), Finished("stop", stop_string=True)
                return
            yield event.ids, piece, None
