"""Continuous batching: one background thread steps the engine's Batch; requests come and go.

A request waits in a bounded queue (full -> QueueFull) until the batch has a free row,
joins at the next step, and leaves the moment it finishes or is cancelled, so its row is free
for the next step. Each request gets its new tokens through its own queue, which the gRPC
handler thread drains (a stream sends them as they come). Anything else that must touch the
engine (adapter loads and unloads, scoring) is posted with `call` and runs on the same thread
between two steps: one thread owns the engine, and no step waits for a disk. A call marked
`then_submit` (an adapter's install, with its request right behind it) lets that request join the
step that follows the call rather than the one after.

A forward reads all of the base's weights whatever its rows, so on a CPU a prefill of one prompt costs about
what a decode step of the whole batch does. Requests whose adapters load arrive a load later than the requests
sent with them; joined as they come, each would take a prefill of its own, a whole forward per load, several
times the load's own CPU. So a turn about to prefill new requests while adapters are loading for others (`loading`) first waits,
at most half the last step and LOAD_GRACE, for those loads to hand over, and prefills them all at once; a turn
that installed adapters waits for every one of their requests, not just the first.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from runtime.errors import Internal, InvalidArgument, QueueFull, ServeError, Unavailable
from runtime.generate import Batch, Row
from runtime.metrics import Metrics

T = TypeVar("T")
# How long a loop turn that ran a `call(..., then_submit=True)` waits for what its caller posts next (the
# request whose adapter the call just installed), so that request joins this turn's step, not the next.
JOIN_GRACE = 0.05
# The longest a turn with new requests to prefill waits for adapter loads in flight (`Scheduler.loading`), so their
# requests share its prefill, and the most of the last step's time it waits: the running rows wait too, but a
# prefill of its own would cost them a whole forward, so a fast device (short steps) hardly waits.
LOAD_GRACE = 0.1
LOAD_STEP_SHARE = 0.5


@dataclass
class Tokens:
    """A step's new tokens for one request. `text`: the text they settled when the batch decoded them (a request
    with stop strings, runtime/generate.py Row.text), else None; `stop`: a stop string ended the request with
    these tokens (its Finished follows)."""

    ids: list[int]
    text: str | None = None
    stop: bool = False


@dataclass
class Finished:
    """The last event of a request: why it ended ("stop", "length", "cancelled") or the error. A "stop" says
    whether a stop string or EOS ended it: OpenAI calls both "stop", LoRAX and TGI tell them apart."""

    reason: str | None
    error: ServeError | None = None
    stop_string: bool = False


@dataclass(eq=False)
class Request:
    """One sequence on its way through the scheduler, and the queue its tokens arrive on."""

    seq: Row
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    events: queue.Queue = field(default_factory=queue.Queue)  # Tokens per step, then one Finished
    state: str = "queued"  # queued -> running -> done

    def stream(self) -> Iterator[Tokens | Finished]:
        """The request's events in order, ending with its Finished."""
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, Finished):
                return


class Scheduler:
    """Owns the engine's Batch and the thread that steps it."""

    def __init__(self, engine, *, max_batch_size: int, max_queue: int, metrics: Metrics | None = None,
                 label: Callable[[Row], str] = lambda seq: "base") -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._label = label
        self._batch = Batch(engine, max_rows=max_batch_size)
        self._pending: deque[Request] = deque()
        self._running: dict[str, Request] = {}
        self._cancelled: list[Request] = []
        self._calls: deque[tuple[Callable[[], Any], Future, bool]] = deque()  # (fn, its result, then_submit)
        self._arrivals = 0  # submits and calls so far: how a turn sees that a caller followed up
        self._loads = 0  # adapter loads in flight whose request follows and whose hand-over is not posted yet
        self._announced = threading.local()  # .loading: this thread's load counts in _loads (`loading`)
        self._step_seconds = 0.0  # the last step's wall time
        self._cv = threading.Condition()
        self._stopping = False
        self._looping = False  # True from start() until the loop returns; guarded by _cv
        self._thread = threading.Thread(target=self._loop, name="adapterhub-scheduler", daemon=True)

    def start(self) -> None:
        self._looping = True
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued and running requests, then end the thread (new submits are refused)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, seq: Row) -> Request:
        """Queue a sequence for the batch; QueueFull when the queue is full."""
        request = Request(seq)
        with self._cv:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.append(request)
            self._arrivals += 1
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request: from the queue at once, from the batch before the next step."""
        with self._cv:
            if request.state == "queued" and request in self._pending:
                self._pending.remove(request)
                self.metrics.queue_depth.set(len(self._pending))
                self._finish(request, "cancelled")
            elif request.state == "running":
                self._cancelled.append(request)
                self._cv.notify()

    def call(self, fn: Callable[[], T], *, then_submit: bool = False) -> T:
        """Run fn on the scheduler thread between two steps and return its result (or raise its error).

        then_submit: the caller posts a request (or another call) as soon as this returns, e.g. a request
        whose adapter fn installs; the turn that runs fn then waits up to JOIN_GRACE for it and takes it
        into the same step. Without this, the turn steps on at once and the request joins one step later.
        Posted inside `loading`, it ends that load's claim on the turns' wait.
        """
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cv:
            direct = not self._looping  # not started, or stopped: nothing else touches the engine
            if not direct:
                self._calls.append((fn, future, then_submit))
                self._arrivals += 1
                self._cv.notify()
            if then_submit:
                self._handed_over()
        if direct:
            return fn()
        return future.result()

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Around an adapter load whose request follows its hand-over (`call(..., then_submit=True)`, made inside):
        a turn about to prefill other new requests meanwhile waits a little for that hand-over (see the module
        docstring), so they share one prefill. Posting the hand-over ends the wait for it (in the same critical
        section, so no turn sees neither); leaving without one (a failed load) ends it too."""
        with self._cv:
            self._loads += 1
            self._announced.loading = True
        try:
            yield
        finally:
            with self._cv:
                self._handed_over()

    def _handed_over(self) -> None:
        """This thread's announced load, if any, no longer keeps turns waiting (lock held)."""
        if getattr(self._announced, "loading", False):
            self._announced.loading = False
            self._loads -= 1
            self._cv.notify_all()

    def queue_depths(self) -> tuple[int, int]:
        """(rows running, requests queued)."""
        with self._cv:
            return len(self._running), len(self._pending)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._running or self._calls or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._pending or self._running or self._calls):
                    self._looping = False
                    return
                self._await_loads()
                calls, self._calls = list(self._calls), deque()
                arrivals = self._arrivals
                cancelled, self._cancelled = self._cancelled, []
                for request in cancelled:
                    self._leave(request, "cancelled")
                self._join_pending()
            for fn, future, _ in calls:
                self._run_call(fn, future)
            self._take_follow_ups(arrivals, _followed(calls))
            if self._running:
                self._step()

    def _await_loads(self) -> None:
        """With requests to prefill (queued, or behind an install queued with `then_submit`) and room for more,
        wait (lock held) for the adapter loads in flight to hand over, at most LOAD_STEP_SHARE of the last step
        and LOAD_GRACE, so their requests join the same prefill."""
        joining = self._pending or any(then_submit for _, _, then_submit in self._calls)
        if not (self._loads and joining and len(self._running) < self.max_batch_size):
            return
        deadline = time.monotonic() + min(LOAD_GRACE, self._step_seconds * LOAD_STEP_SHARE)
        while self._loads and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _join_pending(self) -> None:
        """Move queued requests into the batch while it has room (lock held)."""
        while self._pending and len(self._running) < self.max_batch_size:
            self._join(self._pending.popleft())
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.batch_size.set(len(self._running))

    def _take_follow_ups(self, arrivals: int, expected: int) -> None:
        """After `expected` `then_submit` calls that succeeded: wait (at most JOIN_GRACE in all) until as many
        things were posted since `arrivals` (each of their callers posts its request right after), then take the
        new requests into this turn and run the new calls, and again for the `then_submit` calls among those,
        before the step: requests whose adapters were installed together join one prefill."""
        deadline = time.monotonic() + JOIN_GRACE
        while expected:
            with self._cv:
                while (self._arrivals - arrivals < expected and not self._stopping
                       and len(self._running) < self.max_batch_size):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                calls, self._calls = list(self._calls), deque()
                arrivals = self._arrivals
                self._join_pending()
            for fn, future, _ in calls:
                self._run_call(fn, future)
            expected = _followed(calls) if time.monotonic() < deadline else 0

    def _join(self, request: Request) -> None:
        """Move a queued request into the batch (lock held); a plan the engine refuses fails it alone."""
        try:
            self._batch.add(request.seq)
        except ValueError as e:  # PlanError included: e.g. an adapter unloaded since the request was checked
            self._finish(request, None, InvalidArgument(str(e)))
            return
        except Exception as e:  # anything else fails this request, never the loop
            self._finish(request, None, Internal(f"cannot join the batch: {e}"))
            return
        request.state = "running"
        self._running[request.seq.id] = request

    @staticmethod
    def _run_call(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # the caller gets the error; the loop goes on
            future.set_exception(e)

    def _step(self) -> None:
        rows = len(self._batch)
        started, prefills = time.perf_counter(), self._batch.prefills
        try:
            produced = self._batch.step()
        except Exception as e:  # a step that failed outside any row's own work fails every row, never the server
            with self._cv:
                for running in list(self._running.values()):
                    self._leave(running, None, _row_error(e))
            return
        elapsed = self._step_seconds = time.perf_counter() - started
        now = time.perf_counter()
        total = 0
        with self._cv:
            for seq, tokens, text in produced:
                request = self._running.get(seq.id)
                if request is None:
                    continue
                if tokens:
                    total += len(tokens)
                    if request.first_token_at is None:
                        request.first_token_at = now
                        self.metrics.ttft.observe(now - request.arrived)
                    self.metrics.generated_tokens.labels(adapter=self._label(seq)).inc(len(tokens))
                    request.events.put(Tokens(list(tokens), text, stop=seq.stop_string))
                if seq.finish_reason == "error":  # a failure of this row alone (runtime/generate.py)
                    self._leave(request, None, _row_error(seq.error))
                elif seq.finish_reason is not None:
                    self._leave(request, seq.finish_reason)
            self.metrics.batch_size.set(len(self._running))
        self.metrics.step_rows.observe(rows)
        self.metrics.prefills.inc(self._batch.prefills - prefills)
        if elapsed > 0:
            self.metrics.tokens_per_second.set(total / elapsed)

    def _leave(self, request: Request, reason: str | None, error: ServeError | None = None) -> None:
        """Take a running request out of the batch now and tell its handler (lock held)."""
        if self._running.pop(request.seq.id, None) is None:
            return
        self._batch.remove(request.seq.id)  # sets finish_reason "cancelled" if it was still running
        self._finish(request, reason, error)

    @staticmethod
    def _finish(request: Request, reason: str | None, error: ServeError | None = None) -> None:
        request.state = "done"
        request.events.put(Finished(reason, error))


def _row_error(error: Exception | None) -> ServeError:
    """The status of a request whose step failed: the error's own when it has one (e.g. DamagedData for
    non-finite logits, runtime/generate.py), else Internal."""
    if isinstance(error, ServeError):
        return error
    return Internal(f"batch step failed: {error}")


def _followed(calls: list[tuple[Callable[[], Any], Future, bool]]) -> int:
    """How many of these calls (run) their callers follow up: the `then_submit` ones that succeeded (a failed
    install's caller reports its error and submits nothing)."""
    return sum(then_submit and future.exception() is None for _, future, then_submit in calls)
