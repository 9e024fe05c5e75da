"""The adapter pool: a byte budget on the device, LRU eviction device -> host -> disk, pins and holds."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from server_support import device_bytes, served_model, wait_until

from runtime.engine import Engine
from runtime import errors
from runtime.errors import ServeError, WrongBase
from runtime.plan import AdapterUse, RowPlan
from runtime.pool import AdapterPool, Tier


@pytest.fixture
def make_pool(served_base, registry):
    model, tokenizer = served_model(served_base)
    engine = Engine(model, tokenizer)

    def make(device_budget: int, host_budget: int = 1 << 30) -> AdapterPool:
        return AdapterPool(engine, registry, device_budget=device_budget, host_budget=host_budget)

    return make


def _size(pool: AdapterPool, name: str) -> int:
    return device_bytes(pool.engine, pool.registry, name)


def _use(pool: AdapterPool, *names: str) -> None:
    """One request's worth: acquire, then release."""
    pool.release(pool.acquire([pool.resolve(n) for n in names]))


def _tiers(pool: AdapterPool) -> dict[str, Tier]:
    return {e.key.split("@")[0]: e.tier for e in pool.entries()}


def _logits(pool: AdapterPool, name: str) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 33, 70]])
    return pool.engine.forward(ids, torch.ones_like(ids), [RowPlan((AdapterUse(f"{name}@1.0.0"),))])[0]


def test_least_recently_used_goes_to_host_then_comes_back_unchanged(make_pool):
    probe = make_pool(1 << 30)
    sizes = {n: _size(probe, n) for n in ("lora0", "lora1", "lora2")}
    pool = make_pool(sizes["lora0"] + sizes["lora1"])
    _use(pool, "lora0")
    before = _logits(pool, "lora0")
    _use(pool, "lora1")
    assert _tiers(pool) == {"lora0": Tier.DEVICE, "lora1": Tier.DEVICE}
    assert pool.device_used() == sizes["lora0"] + sizes["lora1"]
    _use(pool, "lora0")  # lora0 is now the most recently used
    _use(pool, "lora2")  # needs room: lora1 (LRU) leaves first, then lora0
    assert _tiers(pool) == {"lora0": Tier.HOST, "lora1": Tier.HOST, "lora2": Tier.DEVICE}
    assert set(pool.engine.resident()) == {"lora2@1.0.0"}
    assert pool.device_used() <= pool.device_budget
    _use(pool, "lora0")  # back from host memory, not from disk
    assert pool.metrics.loads.labels(source="host")._value.get() == 1
    assert pool.metrics.loads.labels(source="disk")._value.get() == 3
    assert pool.metrics.evictions.labels(tier="device")._value.get() == 3
    assert torch.equal(_logits(pool, "lora0"), before)


def test_host_tier_is_bounded_too(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora3"), host_budget=_size(probe, "lora0") + 1)
    for name in ("lora0", "lora1", "lora2", "lora3"):
        _use(pool, name)
    tiers = _tiers(pool)
    assert tiers["lora3"] is Tier.DEVICE
    assert list(tiers.values()).count(Tier.HOST) <= 1 and list(tiers.values()).count(Tier.DISK) >= 2
    assert all(e.adapter is None for e in pool.entries() if e.tier is Tier.DISK)
    assert pool.metrics.evictions.labels(tier="host")._value.get() >= 2
    # the bytes counted per entry follow its host copy as it comes and goes
    assert all(e.host_bytes == (e.adapter.nbytes if e.adapter is not None else 0) for e in pool.entries())
    host = sum(e.host_bytes for e in pool.entries() if e.tier is Tier.HOST)
    assert host <= pool.host_budget
    assert pool.metrics.resident_bytes.labels(tier="host")._value.get() == host


def _waiting(pool: AdapterPool) -> int:
    return int(pool.metrics.adapters_waiting._value.get())


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; its result or error lands in the dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_adapters_in_use_are_never_evicted_and_a_request_for_another_waits_for_them(make_pool):
    """With the budget held by adapters in use, a request for another adapter waits (read once, kept in host
    memory meanwhile) until they are let go, then loads: it is not refused."""
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora0") + _size(probe, "lora1"))  # lora2 (r=12) = lora0 (r=4) + lora1 (r=8)
    lease = pool.acquire([pool.resolve("lora0"), pool.resolve("lora1")])
    thread, out = _in_thread(lambda: pool.acquire([pool.resolve("lora2")]))
    wait_until(lambda: _waiting(pool) == 1, "the request for lora2 waits for room")
    assert _tiers(pool) == {"lora0": Tier.DEVICE, "lora1": Tier.DEVICE, "lora2": Tier.HOST}
    pool.release(lease)
    thread.join(60)
    assert "error" not in out and [e.key for e in out["result"].entries] == ["lora2@1.0.0"]
    assert _tiers(pool) == {"lora0": Tier.HOST, "lora1": Tier.HOST, "lora2": Tier.DEVICE}
    loads = {tier: pool.metrics.loads.labels(source=tier)._value.get() for tier in ("disk", "host")}
    assert loads == {"disk": 2, "host": 1}  # read from disk once; the load after the wait took the host copy
    assert pool.metrics.adapter_waits._value.get() >= 1 and _waiting(pool) == 0
    lora2 = next(e for e in pool.entries() if e.key == "lora2@1.0.0")
    assert (lora2.in_use, lora2.requests) == (1, 1)
    pool.release(out["result"])


def test_a_waiting_request_keeps_what_it_read_when_the_host_tier_has_no_room(make_pool):
    """With no host tier, the copy a waiting request read is its own: loaded after the wait, not read again."""
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora0") + _size(probe, "lora1"), host_budget=0)
    lease = pool.acquire([pool.resolve("lora0"), pool.resolve("lora1")])
    thread, out = _in_thread(lambda: pool.acquire([pool.resolve("lora2")]))
    wait_until(lambda: _waiting(pool) == 1, "the request for lora2 waits for room")
    assert _tiers(pool)["lora2"] is Tier.DISK  # not offered to a host tier without room
    pool.release(lease)
    thread.join(60)
    assert _tiers(pool)["lora2"] is Tier.DEVICE
    assert pool.metrics.cache_misses._value.get() == 3  # lora0, lora1, lora2: each read from disk once
    assert pool.metrics.loads.labels(source="host")._value.get() == 1  # lora2, from the copy it kept
    pool.release(out["result"])


def test_a_waiter_with_its_room_reserved_lets_the_next_one_try_while_it_loads(make_pool, registry):
    """lora2 (in use) fills the budget; requests for lora0 and lora1 wait, in that order. When lora2 is let go
    there is room for both: the first in line, once its bytes are reserved, steps aside, so the second gets its
    room while the first's hand-over (between two batch steps, here held until the second's arrives) is pending."""
    probe = make_pool(1 << 30)
    handovers: list = []
    second_came = threading.Event()

    def on_engine(fn, then_submit=False):
        handovers.append(fn)
        if len(handovers) == 2:  # the first waiter's hand-over: held until the second's comes
            assert second_came.wait(10), "the second waiter never got its room while the first loaded"
        elif len(handovers) == 3:
            second_came.set()
        return fn()

    pool = AdapterPool(probe.engine, registry, device_budget=_size(probe, "lora0") + _size(probe, "lora1"),
                       host_budget=1 << 30, on_engine=on_engine)
    lease = pool.acquire([pool.resolve("lora2")])  # hand-over 1
    first, out_first = _in_thread(lambda: pool.acquire([pool.resolve("lora0")]))
    wait_until(lambda: _waiting(pool) == 1, "the request for lora0 waits")
    second, out_second = _in_thread(lambda: pool.acquire([pool.resolve("lora1")]))
    wait_until(lambda: _waiting(pool) == 2, "the request for lora1 waits behind it")
    pool.release(lease)
    for thread in (first, second):
        thread.join(60)
    assert "error" not in out_first and "error" not in out_second, (out_first, out_second)
    assert _tiers(pool) == {"lora0": Tier.DEVICE, "lora1": Tier.DEVICE, "lora2": Tier.HOST}
    pool.release(out_first["result"])
    pool.release(out_second["result"])


def test_waiters_are_served_in_arrival_order(make_pool):
    """lora3 (16 units) fills the budget; a request for lora2 (12) arrives, then one for lora1 (8). When lora3 is
    let go only one of them fits: the first to arrive gets it, the second waits on until that one is let go."""
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora3"))
    lease = pool.acquire([pool.resolve("lora3")])
    first, out_first = _in_thread(lambda: pool.acquire([pool.resolve("lora2")]))
    wait_until(lambda: _waiting(pool) == 1, "the request for lora2 waits")
    second, out_second = _in_thread(lambda: pool.acquire([pool.resolve("lora1")]))
    wait_until(lambda: _waiting(pool) == 2, "the request for lora1 waits behind it")
    pool.release(lease)
    first.join(60)
    assert [e.key for e in out_first["result"].entries] == ["lora2@1.0.0"], out_first
    assert second.is_alive() and not out_second and _waiting(pool) == 1  # still waiting: no room beside lora2
    pool.release(out_first["result"])
    second.join(60)
    assert [e.key for e in out_second["result"].entries] == ["lora1@1.0.0"], out_second
    pool.release(out_second["result"])


def test_pinned_adapters_that_hold_the_budget_refuse_at_once(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora0") + _size(probe, "lora1"))
    pool.load("lora0", pin=True)
    pool.load("lora1", pin=True)
    with pytest.raises(ServeError) as caught:
        _use(pool, "lora2")
    assert isinstance(caught.value, errors.NoRoom)
    assert "pinned adapters hold" in caught.value.message and "unload a pinned adapter" in caught.value.message
    assert pool.metrics.adapter_waits._value.get() == 0
    assert _tiers(pool).get("lora2", Tier.DISK) is Tier.DISK  # kept in host memory only by a request that waits


def test_a_request_whose_adapters_together_exceed_the_budget_is_refused_at_once(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora3"))  # r=16: lora1 (r=8) and lora2 (r=12) each fit, not both
    with pytest.raises(ServeError) as caught:
        _use(pool, "lora1", "lora2")
    assert isinstance(caught.value, errors.NoRoom)
    need = _size(probe, "lora1") + _size(probe, "lora2")
    assert f"this request's adapters need {need} bytes on the device together" in caught.value.message
    assert pool.metrics.adapter_waits._value.get() == 0
    assert all(e.in_use == 0 and e.requests == 0 for e in pool.entries())
    _use(pool, "lora2")  # alone it fits


def test_the_wait_for_room_is_bounded_and_holds_nothing(make_pool, registry):
    probe = make_pool(1 << 30)
    pool = AdapterPool(probe.engine, registry, device_budget=_size(probe, "lora0") + _size(probe, "lora2"),
                       host_budget=1 << 30, wait_seconds=0.2)
    lease = pool.acquire([pool.resolve("lora1")])
    with pytest.raises(ServeError) as caught:  # lora0 fits beside lora1 (in use); lora2 then does not
        pool.acquire([pool.resolve("lora0"), pool.resolve("lora2")])
    assert isinstance(caught.value, errors.NoRoom)
    assert "within 0.2 s" in caught.value.message and "held by adapters that running requests use" in caught.value.message
    assert {e.key: (e.in_use, e.requests) for e in pool.entries()} == {
        "lora1@1.0.0": (1, 1), "lora0@1.0.0": (0, 0), "lora2@1.0.0": (0, 0)}
    pool.release(lease)


def test_a_request_whose_client_left_stops_waiting(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora0") + _size(probe, "lora1"))
    lease = pool.acquire([pool.resolve("lora0"), pool.resolve("lora1")])
    gone = threading.Event()
    thread, out = _in_thread(lambda: pool.acquire([pool.resolve("lora2")], alive=lambda: not gone.is_set()))
    wait_until(lambda: _waiting(pool) == 1, "the request for lora2 waits for room")
    gone.set()
    thread.join(60)
    assert isinstance(out["error"], errors.Cancelled) and "lora2" in out["error"].message
    assert _waiting(pool) == 0
    pool.release(lease)


def test_requests_that_each_need_room_for_a_second_adapter_do_not_wait_for_each_other(make_pool):
    """A holds lora1 and needs room for lora2, B holds lora0 and needs room for lora3, and neither fits beside
    the other's: holding while waiting would deadlock them. A waiting request holds nothing, so both finish."""
    probe = make_pool(1 << 30)
    sizes = {n: _size(probe, n) for n in ("lora0", "lora1", "lora2", "lora3")}
    assert sizes["lora1"] + sizes["lora2"] == sizes["lora0"] + sizes["lora3"]  # r 8+12 == 4+16
    pool = make_pool(sizes["lora1"] + sizes["lora2"])
    first = pool.acquire([pool.resolve("lora1"), pool.resolve("lora0")])  # both on the device, in use
    threads = [_in_thread(lambda names=names: _use(pool, *names))
               for names in (("lora1", "lora2"), ("lora0", "lora3"))]
    wait_until(lambda: _waiting(pool) == 2, "both requests wait for room")
    pool.release(first)
    for thread, out in threads:
        thread.join(60)
        assert not thread.is_alive() and "error" not in out
    assert all(e.in_use == 0 for e in pool.entries())


def test_pinned_adapters_stay_until_unloaded(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora0") + _size(probe, "lora3"))
    entry, seconds = pool.load("lora0", pin=True)
    assert entry.pinned and entry.tier is Tier.DEVICE and seconds > 0 and entry.requests == 0
    for name in ("lora1", "lora2", "lora3", "lora1"):
        _use(pool, name)
        assert _tiers(pool)["lora0"] is Tier.DEVICE
    assert pool.load("lora0", pin=True)[1] == 0.0  # already resident
    unloaded = pool.unload("lora0")
    assert unloaded.tier is Tier.DISK and not unloaded.pinned and "lora0@1.0.0" not in pool.engine.resident()


def test_adapter_larger_than_the_whole_budget(make_pool):
    probe = make_pool(1 << 30)
    pool = make_pool(_size(probe, "lora3") - 1)
    with pytest.raises(ServeError) as caught:
        _use(pool, "lora3")
    assert isinstance(caught.value, errors.NoRoom)
    assert "more than the whole adapter memory budget" in caught.value.message
    assert pool.entries() == [] and pool.engine.resident() == {}


def test_concurrent_requests_for_a_cold_adapter_load_it_once(make_pool):
    pool = make_pool(1 << 30)
    manifest = pool.resolve("lora2")
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(pool.acquire([manifest]))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.metrics.loads.labels(source="disk")._value.get() == 1
    entry = pool.entries()[0]
    assert entry.in_use == 6 and entry.requests == 6
    for lease in leases:
        pool.release(lease)
    assert entry.in_use == 0


def test_a_failed_acquire_holds_nothing(make_pool):
    pool = make_pool(1 << 30)
    with pytest.raises(ServeError) as caught:
        pool.acquire([pool.resolve("lora0"), pool.resolve("foreign")])
    assert isinstance(caught.value, errors.Unusable)
    assert [(e.key, e.in_use) for e in pool.entries()] == [("lora0@1.0.0", 0)]


def test_bookkeeping_stays_bounded_with_many_adapters(served_base, registry, make_pool):
    """Past max_entries, disk-tier entries are forgotten, with their fingerprint checks: a long-running
    server that saw many adapters (or many per-request merges) holds a bounded amount of state."""
    probe = make_pool(1 << 30)
    budget = max(_size(probe, n) for n in ("lora0", "lora1", "lora2"))  # one fits at a time
    pool = AdapterPool(probe.engine, registry, device_budget=budget, host_budget=0, max_entries=1)
    for name in ("lora0", "lora1", "lora2"):
        _use(pool, name)
    assert len(pool.entries()) <= 2 and len(pool._verified) <= 2
    _use(pool, "lora0")  # forgotten, so read and checked again: still served
    assert _tiers(pool)["lora0"] is Tier.DEVICE


def test_a_load_that_evicts_hands_over_to_the_engine_once(make_pool, registry):
    """Evictions and the load go to the engine in one call (each call waits for the step in flight)."""
    probe = make_pool(1 << 30)
    sizes = {n: _size(probe, n) for n in ("lora0", "lora1", "lora2")}
    calls = []
    pool = AdapterPool(probe.engine, registry, device_budget=max(sizes["lora0"] + sizes["lora1"], sizes["lora2"]),
                       host_budget=1 << 30, on_engine=lambda fn, then_submit=False: calls.append(fn) or fn())
    _use(pool, "lora0")
    _use(pool, "lora1")
    calls.clear()
    _use(pool, "lora2")
    tiers = _tiers(pool)
    assert tiers["lora2"] is Tier.DEVICE and Tier.HOST in (tiers["lora0"], tiers["lora1"])
    assert len(calls) == 1
    assert set(pool.engine.resident()) == {f"{n}@1.0.0" for n, t in tiers.items() if t is Tier.DEVICE}


def test_the_device_copies_of_a_load_are_made_outside_the_hand_over(make_pool, registry):
    """A load prepares the adapter's tensors in the request's thread; the call between two batch steps
    only installs them (so the running batch does not wait for the copies)."""
    probe = make_pool(1 << 30)
    inside: list[str] = []
    engine = probe.engine
    prepare = engine.prepare

    def watched_prepare(key, adapter):
        inside.append("prepare in hand-over" if handing_over.is_set() else "prepare outside")
        return prepare(key, adapter)

    handing_over = threading.Event()

    def on_engine(fn, then_submit=False):
        handing_over.set()
        try:
            return fn()
        finally:
            handing_over.clear()

    engine.prepare = watched_prepare
    try:
        pool = AdapterPool(engine, registry, device_budget=1 << 30, host_budget=1 << 30, on_engine=on_engine)
        _use(pool, "lora0")
    finally:
        del engine.prepare
    assert inside == ["prepare outside"]
    assert "lora0@1.0.0" in engine.resident()


def test_then_submit_goes_with_the_last_adapters_hand_over_only(make_pool, registry):
    """A request naming several cold adapters is submitted after the last one's hand-over: only that
    one asks the scheduler to wait for it (Scheduler.call(then_submit=True))."""
    probe = make_pool(1 << 30)
    flags: list[bool] = []
    pool = AdapterPool(probe.engine, registry, device_budget=1 << 30, host_budget=1 << 30,
                       on_engine=lambda fn, then_submit=False: flags.append(then_submit) or fn())
    pool.release(pool.acquire([pool.resolve("lora0"), pool.resolve("lora1")], then_submit=True))
    assert flags == [False, True]
    flags.clear()
    pool.release(pool.acquire([pool.resolve("lora2")]))  # LoadAdapter-style: nothing follows
    assert flags == [False]


def test_a_load_whose_request_follows_is_announced_until_its_hand_over(make_pool, registry):
    """The scheduler waits for a request whose adapter is loading before it prefills others (Scheduler.loading):
    the pool enters on_loading() before reading the adapter and posts the hand-over inside it, for the load its
    request follows only."""
    probe = make_pool(1 << 30)
    events: list[str] = []

    @contextmanager
    def loading():
        events.append("announced")
        yield
        events.append("left")

    pool = AdapterPool(probe.engine, registry, device_budget=1 << 30, host_budget=1 << 30, on_loading=loading,
                       on_engine=lambda fn, then_submit=False: events.append(f"hand-over {then_submit}") or fn())
    pool.release(pool.acquire([pool.resolve("lora0"), pool.resolve("lora1")], then_submit=True))
    assert events == ["hand-over False", "announced", "hand-over True", "left"]
    events.clear()
    pool.release(pool.acquire([pool.resolve("lora2")]))  # LoadAdapter-style: nothing follows
    assert events == ["hand-over False"]


def test_every_resident_byte_is_counted_while_a_load_settles(make_pool, registry):
    """Between the engine install and the pool's bookkeeping, the adapter's bytes must count as reserved or
    as used: a gap let concurrent loads admit adapters past the budget (seen in the scale bench: 52 adapters,
    95.8 MB on a 93.1 MB budget). Checked right after each engine call returns (install is one)."""
    probe = make_pool(1 << 30)
    gaps: list[tuple[int, int]] = []

    def checked(fn, then_submit=False):
        result = fn()
        counted = pool.device_used() + pool._reserved
        resident = sum(pool.engine.resident().values())
        if counted < resident:
            gaps.append((counted, resident))
        return result

    pool = AdapterPool(probe.engine, registry, device_budget=1 << 30, host_budget=1 << 30, on_engine=checked)
    for name in ("lora0", "lora1", "ia3"):
        _use(pool, name)
    assert sum(pool.engine.resident().values()) > 0 and gaps == []


def test_a_version_pushed_again_with_other_content_serves_the_new_content(make_pool, registry, served_adapters,
                                                                          served_base):
    """The pool's entries are keyed by name@version: one removed and pushed again while it is resident must not
    keep serving its old content, nor skip the base check its old content passed."""
    pool = make_pool(1 << 30)
    _use(pool, "lora0")
    _use(pool, "lora1")
    registry.push(served_adapters["lora0"], "re", "1.0.0", base_model=str(served_base))
    _use(pool, "re")
    assert torch.equal(_logits(pool, "re"), _logits(pool, "lora0"))
    registry.remove("re@1.0.0")
    registry.push(served_adapters["lora1"], "re", "1.0.0", base_model=str(served_base))
    _use(pool, "re")
    assert torch.equal(_logits(pool, "re"), _logits(pool, "lora1"))
    assert pool.device_used() == sum(_size(pool, n) for n in ("lora0", "lora1", "re"))
    registry.remove("re@1.0.0")
    registry.push(served_adapters["foreign"], "re", "1.0.0", base_model=str(served_adapters["other_base"]))
    with pytest.raises(WrongBase, match="made for another base model"):
        _use(pool, "re")
    assert "re@1.0.0" not in pool.engine.resident()


def test_the_budget_counts_each_loras_own_slot_bytes_and_eviction_frees_them(make_pool):
    """LoRAs live in slot buffers per site and rank: the bytes the budget counts for one are exactly the slot
    bytes it occupies (a rank-4 adapter beside a rank-16 one costs rank 4: nothing is padded), eviction gives
    them back, and churning adapters through the budget reuses freed slots instead of growing the buffers."""
    from runtime.techniques.slots import store_of

    probe = make_pool(1 << 30)
    sizes = {n: _size(probe, n) for n in ("lora0", "lora1", "lora2", "lora3")}
    store = store_of(probe.engine.model)
    assert store.bytes() == (0, 0)
    pool = make_pool(sizes["lora0"] + sizes["lora3"])
    _use(pool, "lora0")
    _use(pool, "lora3")
    assert store.bytes()[0] == pool.device_used() == sizes["lora0"] + sizes["lora3"]
    assert {b.parts[0].shape[1] for b in store.buffers.values()} == {4, 16}  # ranks
    capacities = []
    for _ in range(2):
        for name in ("lora1", "lora2", "lora0", "lora3", "lora1"):
            _use(pool, name)
            assert store.bytes()[0] == pool.device_used() <= pool.device_budget
        capacities.append(store.bytes()[1])
    assert capacities[0] == capacities[1]  # the second round found every slot it needed free
    for entry in pool.entries():
        if entry.tier is Tier.DEVICE:
            pool.unload(entry.key)
    assert store.bytes()[0] == pool.device_used() == 0


def test_the_budget_counts_ia3_and_bitfit_slot_bytes_and_eviction_frees_them(make_pool):
    """IA3 and BitFit vectors live in slot buffers per site and length: the budget counts exactly the slot bytes
    each occupies, eviction gives them back, and churning them through the budget reuses freed slots instead of
    growing the buffers."""
    from runtime.techniques.slots import store_of

    probe = make_pool(1 << 30)
    sizes = {n: _size(probe, n) for n in ("ia3", "bitfit")}
    store = store_of(probe.engine.model)
    pool = make_pool(max(sizes.values()))  # one at a time: each use evicts the other
    capacities = []
    for _ in range(2):
        for name in ("ia3", "bitfit"):
            _use(pool, name)
            assert store.bytes()[0] == pool.device_used() == sizes[name]
        capacities.append(store.bytes()[1])
    assert capacities[0] == capacities[1]
    for entry in pool.entries():
        if entry.tier is Tier.DEVICE:
            pool.unload(entry.key)
    assert store.bytes()[0] == pool.device_used() == 0


def test_a_load_runs_its_torch_ops_on_the_callers_thread_alone(make_pool):
    """Loads run beside the decode loop: their copies keep to the request's thread (runtime/cpu_threads.py), and
    the caller's own thread count is as it was afterwards."""
    pool = make_pool(1 << 30)
    threads, seen = torch.get_num_threads(), []
    prepare = pool.engine.prepare

    def probed(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return prepare(*args, **kwargs)

    pool.engine.prepare = probed
    _use(pool, "lora0")
    assert seen == [1] and torch.get_num_threads() == threads
