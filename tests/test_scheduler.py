"""The scheduler: continuous batching over the real engine, cancellation, calls between steps, failures."""
from __future__ import annotations

import queue
import threading

import pytest

from server_support import served_model, wait_until

from hub.artifact import read_adapter
from runtime.engine import Engine
from runtime import errors
from runtime.errors import ServeError
from runtime.generate import SamplingParams, Row
from runtime.plan import AdapterUse, RowPlan
from runtime.scheduler import Finished, Scheduler

PROMPT = [5, 9, 33, 70, 12]


@pytest.fixture
def scheduler(served_base, served_adapters):
    model, tokenizer = served_model(served_base)
    engine = Engine(model, tokenizer)
    for name in ("lora0", "ia3"):
        engine.load(name, read_adapter(served_adapters[name]))
    sched = Scheduler(engine, max_batch_size=4, max_queue=8)
    sched.start()
    yield sched
    sched.stop(timeout=60)


def _seq(name: str, adapter: str | None, tokens: int, prompt=PROMPT) -> Row:
    plan = RowPlan((AdapterUse(adapter),)) if adapter else RowPlan()
    return Row(id=name, prompt_ids=list(prompt), plan=plan, sampling=SamplingParams(max_new_tokens=tokens))


def _drain(request) -> tuple[list[int], Finished]:
    tokens: list[int] = []
    for event in request.stream():
        if isinstance(event, Finished):
            return tokens, event
        tokens += event.ids
    raise AssertionError("stream ended without Finished")


def test_a_request_joins_a_running_batch_and_leaves_when_done(scheduler):
    alone_short = _drain(scheduler.submit(_seq("s0", "ia3", 5)))[0]
    long = scheduler.submit(_seq("long", "lora0", 3000))
    first = long.events.get().ids  # the long request is decoding
    short = scheduler.submit(_seq("s1", "ia3", 5))
    tokens, finished = _drain(short)
    assert tokens == alone_short and finished.reason == "length"
    assert long.state == "running"  # it kept its row while the short one came and went
    wait_until(lambda: scheduler.queue_depths() == (1, 0), "the short request left the batch")
    scheduler.cancel(long)
    rest, finished = _drain(long)
    assert finished.reason == "cancelled" and len(first + rest) < 3000
    assert scheduler.queue_depths() == (0, 0)
    again = _drain(scheduler.submit(_seq("again", "lora0", len(first + rest))))[0]
    assert again == first + rest  # the cancelled request's tokens were those it gets alone


def test_cancel_a_queued_request_frees_its_place_at_once(scheduler):
    scheduler.max_batch_size = 1
    running = scheduler.submit(_seq("run", None, 3000))
    running.events.get()
    queued = scheduler.submit(_seq("wait", None, 4))
    assert scheduler.queue_depths() == (1, 1)
    scheduler.cancel(queued)
    assert scheduler.queue_depths() == (1, 0)
    assert queued.events.get_nowait() == Finished("cancelled")
    scheduler.cancel(running)
    assert _drain(running)[1].reason == "cancelled"


def test_queue_bound(scheduler):
    scheduler.max_queue = 0
    with pytest.raises(ServeError) as caught:
        scheduler.submit(_seq("x", None, 2))
    assert isinstance(caught.value, errors.QueueFull)


def test_calls_run_on_the_loop_thread_and_return_or_raise(scheduler):
    import threading

    assert scheduler.call(lambda: threading.current_thread().name) == "adapterhub-scheduler"
    with pytest.raises(ZeroDivisionError):
        scheduler.call(lambda: 1 / 0)
    assert _drain(scheduler.submit(_seq("ok", None, 2)))[1].reason == "length"  # the loop went on


def test_a_failing_step_fails_its_rows_not_the_server(scheduler):
    """Pulling an adapter out from under a running request (the pool never does this) makes the next step
    fail: that request gets INTERNAL, and the next request is served."""
    doomed = scheduler.submit(_seq("doomed", "lora0", 3000))
    doomed.events.get()
    scheduler.call(lambda: scheduler.engine.unload("lora0"))
    _, finished = _drain(doomed)
    assert finished.error is not None and isinstance(finished.error, errors.Internal)
    assert scheduler.queue_depths() == (0, 0)
    assert _drain(scheduler.submit(_seq("next", "ia3", 3)))[1].reason == "length"


def test_a_plan_the_engine_refuses_fails_only_that_request(scheduler):
    bad = scheduler.submit(_seq("bad", "not-loaded", 3))
    _, finished = _drain(bad)
    assert isinstance(finished.error, errors.InvalidArgument) and "not loaded" in finished.error.message


def test_stop_finishes_queued_and_running_requests_then_refuses(served_base):
    model, tokenizer = served_model(served_base)
    sched = Scheduler(Engine(model, tokenizer), max_batch_size=1, max_queue=4)
    sched.start()
    requests = [sched.submit(_seq(f"r{i}", None, 6)) for i in range(3)]
    sched.stop(timeout=60)
    assert [_drain(r)[1].reason for r in requests] == ["length"] * 3
    with pytest.raises(ServeError) as caught:
        sched.submit(_seq("late", None, 2))
    assert isinstance(caught.value, errors.Unavailable)


def _steps_seen(scheduler) -> list[set[str]]:
    """Record, after every batch step, the ids of the rows in the batch."""
    seen: list[set[str]] = []
    step = scheduler._batch.step

    def recording():
        out = step()
        seen.append({s.id for s in scheduler._batch._rows} | {s.id for s, *_ in out})
        return out

    scheduler._batch.step = recording
    return seen


def test_a_request_submitted_after_a_then_submit_call_joins_the_very_next_step(scheduler):
    """A load's hand-over is a call; the request that needed the adapter is submitted right after it.
    With then_submit the turn that ran the call takes that request into its own step (without it, the
    turn steps on at once and the request waits for the next one)."""
    seen = _steps_seen(scheduler)
    long = scheduler.submit(_seq("long", "lora0", 3000))
    long.events.get()  # decoding: every turn has a step
    for n in range(3):
        at_call = scheduler.call(lambda: len(seen), then_submit=True)
        joiner = scheduler.submit(_seq(f"joiner{n}", "ia3", 2))
        _drain(joiner)
        first = next(i for i, ids in enumerate(seen) if f"joiner{n}" in ids)
        assert first == at_call  # the step right after the call, not one later
    scheduler.cancel(long)
    assert _drain(long)[1].reason == "cancelled"


@pytest.mark.timeout(120)  # a stalled loop fails here, not at the suite's 600 s
def test_a_failed_then_submit_call_does_not_wait_for_a_follow_up(scheduler, monkeypatch):
    """The caller of a failed install reports its error and submits nothing: the loop steps on at once
    (with a grace of an hour, a wait would stall the running request until the test times out)."""
    monkeypatch.setattr("runtime.scheduler.JOIN_GRACE", 3600.0)
    long = scheduler.submit(_seq("long", "lora0", 40))
    long.events.get()

    def install() -> None:
        raise ValueError("does not fit")

    with pytest.raises(ValueError, match="does not fit"):
        scheduler.call(install, then_submit=True)
    assert _drain(long)[1].reason == "length"


def _first_step(seen: list[set[str]], name: str) -> int:
    return next(i for i, ids in enumerate(seen) if name in ids)


@pytest.mark.timeout(120)
def test_a_request_queued_while_an_adapter_loads_shares_a_prefill_with_the_loads_request(scheduler, monkeypatch):
    """A forward reads all of the base's weights however few its rows: a request that came with one whose adapter
    is loading waits for that load's hand-over, and the two are prefilled in one forward (graces of an hour: the
    wait ends when the hand-over is posted, not by time)."""
    monkeypatch.setattr("runtime.scheduler.LOAD_GRACE", 3600.0)
    monkeypatch.setattr("runtime.scheduler.LOAD_STEP_SHARE", 1e9)
    monkeypatch.setattr("runtime.scheduler.JOIN_GRACE", 3600.0)
    seen = _steps_seen(scheduler)
    long = scheduler.submit(_seq("long", "lora0", 3000))
    long.events.get()  # decoding: the loop has timed a step
    prefills = scheduler._batch.prefills
    with scheduler.loading():
        hit = scheduler.submit(_seq("hit", "ia3", 2))
        with pytest.raises(queue.Empty):  # without the wait it would have its first token within a few steps
            hit.events.get(timeout=1.0)
        scheduler.call(lambda: None, then_submit=True)  # the load's hand-over
        loaded = scheduler.submit(_seq("loaded", "lora0", 2))
    assert _drain(hit)[1].reason == _drain(loaded)[1].reason == "length"
    assert _first_step(seen, "hit") == _first_step(seen, "loaded")
    assert scheduler._batch.prefills == prefills + 1
    scheduler.cancel(long)
    assert _drain(long)[1].reason == "cancelled"


@pytest.mark.timeout(120)
def test_the_requests_behind_installs_run_in_one_turn_join_one_prefill(scheduler, monkeypatch):
    """Three loads hand over in one turn: the turn waits for all three requests, not only the first to come."""
    monkeypatch.setattr("runtime.scheduler.LOAD_GRACE", 3600.0)
    monkeypatch.setattr("runtime.scheduler.LOAD_STEP_SHARE", 1e9)
    monkeypatch.setattr("runtime.scheduler.JOIN_GRACE", 3600.0)
    seen = _steps_seen(scheduler)
    long = scheduler.submit(_seq("long", "lora0", 3000))
    long.events.get()
    prefills = scheduler._batch.prefills
    announced = threading.Barrier(3)
    requests = {}

    def load(name: str) -> None:
        with scheduler.loading():
            announced.wait()  # all three loads are in flight before any hands over
            scheduler.call(lambda: None, then_submit=True)
            requests[name] = scheduler.submit(_seq(name, "ia3", 2))

    threads = [threading.Thread(target=load, args=(f"loaded{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [_drain(r)[1].reason for r in requests.values()] == ["length"] * 3
    assert len({_first_step(seen, name) for name in requests}) == 1
    assert scheduler._batch.prefills == prefills + 1
    scheduler.cancel(long)
    assert _drain(long)[1].reason == "cancelled"


def test_a_then_submit_call_with_no_follow_up_only_pauses_the_batch_briefly(scheduler):
    long = scheduler.submit(_seq("long", "lora0", 40))
    long.events.get()
    assert scheduler.call(lambda: "installed", then_submit=True) == "installed"  # nothing is submitted after it
    tokens, finished = _drain(long)
    assert finished.reason == "length"  # the loop went on after the grace wait
