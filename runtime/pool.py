"""Resident adapters: which are on the device, which wait in host memory, which only on disk.

Adapters differ in size by orders of magnitude (an IA3 vector vs a rank-64 LoRA), so the device
tier is bounded in BYTES, not in adapters. When a load needs room, the least recently used
adapters that no running request holds and nobody pinned move device -> host (their tensors stay
in host memory, so bringing them back skips the disk); the host tier, bounded in bytes too, drops
its least recently used to disk (the registry's folder). Refs are resolved on every acquire, so a
tag moved by a new push is served by the next request naming it (cache key = name@version; an entry whose
sha256 is not the resolved manifest's, a version removed and pushed again with other content, is replaced).

Disk reads, parsing, the base-fingerprint check and the adapter's device copies (`Engine.prepare`)
run in the caller's thread (a request handler), never in the decode loop, and on that thread alone
(`runtime.cpu_threads.serial`: torch's other threads are the decode loop's), while the files' sha256 runs
in another thread (and must match before the adapter is installed); only the engine's install/unload
calls go through `on_engine`, which the server points at the scheduler so they run between two batch
steps (a dict update and module wraps: the running batch barely pauses). A load whose request follows its
hand-over runs inside `on_loading()` (the server's: `Scheduler.loading`), so the scheduler can wait for that
request before it prefills others that came with it.

When the device budget is held by adapters that running or queued requests use, a request for another
adapter waits (up to `wait_seconds`, or until its caller gives up) for them to finish, as a request waits for
a free row, instead of being refused. Waiters queue in arrival order and hold none of their adapters while
they wait, so two requests that each need room never wait for each other. Only an adapter that cannot fit
beside the pinned ones (or a request whose adapters together exceed the budget) is refused at once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, TypeVar

from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import PROMPT_SITE, fingerprint, fitted_fingerprint, module_tensors
from hub.errors import HubError, IntegrityError, InvalidName, NotFound
from hub.manifest import Manifest, parse_ref
from hub.registry import Registry
from hub.remotes import Remote
from runtime import errors
from runtime.contracts import AdapterSource, PoolEngine, ServedManifest
from runtime.cpu_threads import serial
from runtime.errors import (Cancelled, DamagedData, InvalidArgument, NoRoom, ServeError, TooLarge, Unavailable,
                            Unusable, WrongBase)
from runtime.merged import MergedManifest
from runtime.metrics import Metrics

T = TypeVar("T")
_POLL = 0.1  # seconds between checks that a request waiting for device room still has a client


class Tier(str, Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass
class Entry:
    """What the pool knows about one adapter version."""

    key: str  # name@version
    manifest: ServedManifest
    tier: Tier = Tier.DISK
    device_bytes: int = 0
    pinned: bool = False
    in_use: int = 0
    last_used: float = 0.0  # monotonic, for LRU
    last_used_unix: float = 0.0  # wall clock of the last request, 0 = never
    requests: int = 0
    _adapter: Adapter | None = field(default=None, init=False, repr=False)
    _host_bytes: int = field(default=0, init=False, repr=False)

    @property
    def adapter(self) -> Adapter | None:
        """The host copy (device entries keep theirs)."""
        return self._adapter

    @adapter.setter
    def adapter(self, adapter: Adapter | None) -> None:
        self._adapter = adapter
        self._host_bytes = adapter.nbytes if adapter is not None else 0

    @property
    def host_bytes(self) -> int:
        """The host copy's bytes, counted when it is set: every load sums them over the whole host tier, and
        counting a copy's tensors each time made a load's bookkeeping grow with the tier."""
        return self._host_bytes

    @property
    def built(self) -> bool:
        """A per-request merge (runtime/merged.py): built from its parents, not read from the registry."""
        return isinstance(self.manifest, MergedManifest)


@dataclass(frozen=True)
class Lease:
    """Adapters a request holds on the device until `AdapterPool.release`; in request order."""

    entries: tuple[Entry, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)


def _direct(fn: Callable[[], T], *, then_submit: bool = False) -> T:
    return fn()


@dataclass(eq=False)
class _Waiter:
    """A request waiting for device room: whether its client is still there, and until when it may wait."""

    alive: Callable[[], bool]
    deadline: float


@dataclass(eq=False)
class _Evicting:
    """An adapter a load moves off the device to make room, until the load's hand-over takes it off the engine:
    its device bytes, to put back if the load fails first (the engine still holds it then)."""

    entry: Entry
    device_bytes: int
    done: Future = field(default_factory=Future)  # a request for it waits on this until the load ends
    unloaded: bool = False


class _NoRoomYet(Exception):
    """Internal: the device budget is held by adapters in use; room comes as their requests finish."""

    def __init__(self, key: str, need: int, freed: int):
        super().__init__(key)
        self.key, self.need, self.freed = key, need, freed  # freed: the pool's count of frees when refused
        self.read: tuple[ServedManifest, Adapter] | None = None  # (manifest, adapter) when it was read from disk for this load


def _damaged(key: str, error: IntegrityError) -> DamagedData:
    return DamagedData(f"adapter {key}: stored files are damaged: {error}")


class AdapterPool:
    """Loads, caches and evicts adapters for one Engine within a device and a host byte budget."""

    def __init__(self, engine: PoolEngine, registry: AdapterSource, *, device_budget: int, host_budget: int,
                 metrics: Metrics | None = None, on_engine: Callable[..., Any] = _direct,
                 on_loading: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 remote: Remote | None = None, max_entries: int = 1024, wait_seconds: float = 30.0, max_merged: int = 64) -> None:
        self.engine = engine
        self.registry = registry
        self.remote = remote  # to pull refs the local registry lacks
        self.device_budget = int(device_budget)
        self.host_budget = int(host_budget)
        self.metrics = metrics or Metrics()
        self._on_engine = on_engine
        self._on_loading = on_loading
        self._max_entries = max_entries
        # per-request merges each tier holds, in use or not: every distinct merge parameter set makes one, so
        # bytes alone would let one client fill the tiers with merges nobody asks for again
        self._max_merged = max_merged
        self.wait_seconds = float(wait_seconds)  # how long a request may wait for device room
        self._entries: dict[str, Entry] = {}
        self._loading: dict[str, Future] = {}  # key -> done when its load or eviction ends
        self._reserved = 0  # device bytes promised to loads in progress
        self._verified: set[tuple[str, str]] = set()  # (key, sha256) read, hashed right and fitting the base
        self._refused: OrderedDict[str, tuple[str, str, type[Unusable]]] = OrderedDict()  # key -> (sha256, why, kind), newest last
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when device room may have been freed
        self._freed = 0  # times device room may have been freed (a waiter sleeps while this is unchanged)
        self._waiters: list[_Waiter] = []  # requests waiting for device room, in arrival order
        self.base_fingerprint = fingerprint(engine.model.config, {})

    # -- resolving ---------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Manifest:
        """The manifest a ref names now; a ref missing locally is pulled from the remote, if one is set. With a
        remote, a moving ref (a name or a tag) names what it names there now, so a version pushed or a tag moved
        on the remote is served by the next request; if the remote cannot say, the local registry answers."""
        if not ref:
            raise InvalidArgument("adapter ref is empty")
        try:
            ref = self._on_remote(ref)
            try:
                return self.registry.resolve(ref)
            except NotFound as local:
                if self.remote is None or not isinstance(self.registry, Registry):  # a remote pulls into a Registry
                    raise
                try:
                    return self.remote.fetch(ref, self.registry)
                except NotFound as e:
                    raise NotFound(f"{local}; remote {self.remote.url}: {e}") from None
                except IntegrityError as e:  # its bytes are not what the remote's manifest says: nothing was kept
                    raise DamagedData(
                                     f"adapter {ref!r} from remote {self.remote.url}: {e}") from None
        except InvalidName as e:
            raise InvalidArgument(str(e)) from None
        except NotFound as e:
            raise errors.NotFound(str(e)) from None
        except HubError as e:
            raise Unavailable(f"registry error for {ref!r}: {e}") from None

    def _on_remote(self, ref: str) -> str:
        """`ref` as the exact name@version the remote's copy of it names now (a versioned ref as it is)."""
        if self.remote is None or parse_ref(ref)[1] is not None:
            return ref
        try:
            current = self.remote.current(ref)
        except HubError:  # not there, or unreachable: the local registry's answer stands
            return ref
        return current if current is not None else ref

    # -- acquiring and releasing -------------------------------------------------------------------
    @serial()
    def acquire(self, manifests: Iterable[ServedManifest], *, pin: bool = False, then_submit: bool = False,
                alive: Callable[[], bool] = lambda: True) -> Lease:
        """Put every adapter on the device and hold it there until `release` (all or none).

        When the budget is held by adapters in use, wait for room (see `_wait_for_room`) up to `wait_seconds`,
        then NoRoom; `alive() == False` (the client went away) ends the wait with Cancelled.
        then_submit: the caller queues a request (or a call) on the engine's thread right after; passed with the
        last adapter's hand-over (`on_engine(fn, then_submit=True)`: see Scheduler.call) so the request can
        join the batch step right after its adapter is installed."""
        manifests = list(manifests)
        waiter: _Waiter | None = None
        read: dict[str, Adapter] = {}  # adapters this request read from disk and waits to load: read once

        def got_room() -> None:  # once a waiter has its room reserved, the next in line may try while it loads
            if waiter is not None:
                self._dequeue_waiter(waiter)

        try:
            while True:
                held: list[Entry] = []
                try:
                    for i, manifest in enumerate(manifests):
                        held.append(self._acquire_one(manifest, pin=pin, read=read.get(manifest.ref), got_room=got_room,
                                                      then_submit=then_submit and i == len(manifests) - 1))
                except _NoRoomYet as no_room:
                    mark = self._let_go(held, no_room)
                    if no_room.read is not None:  # it will wait: keep what it read, however long that takes
                        read[no_room.key] = no_room.read[1]
                        self._offer_to_host(no_room.key, *no_room.read)
                    waiter = self._queue_waiter(alive, waiter)
                    self._wait_for_room(waiter, no_room, mark)
                    continue
                except BaseException:
                    self.release(Lease(tuple(held)))
                    raise
                for entry in held:
                    self.metrics.adapter_requests.labels(adapter=self.metrics.adapter_label(entry.manifest.name)).inc()
                return Lease(tuple(held))
        finally:
            if waiter is not None:
                self._dequeue_waiter(waiter)

    def release(self, lease: Lease, *, served: bool = True) -> None:
        """Let go of a lease; `served=False` for one that served no request (an admin load): it counts no
        request and leaves the last request's time as it was (for LRU it still counts as a use)."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            for entry in lease.entries:
                entry.in_use -= 1
                entry.last_used = now
                if served:
                    entry.last_used_unix = wall
                else:
                    entry.requests -= 1
            self._room_freed_locked()

    def _room_freed_locked(self) -> None:
        self._freed += 1
        self._room.notify_all()

    # -- waiting for device room -------------------------------------------------------------------
    def _let_go(self, held: list[Entry], no_room: _NoRoomYet) -> int | None:
        """Undo the holds of an acquire that found no room (they count no request). NoRoom if room
        can never come: this request's adapters so far and the pinned ones do not fit the budget together.
        Else the count of frees to wait past, or None when room was freed since the refusal (try at once)."""
        with self._lock:
            for entry in held:
                entry.in_use -= 1
                entry.requests -= 1
            together = no_room.need + sum(e.device_bytes for e in held)
            pinned = sum(e.device_bytes for e in self._entries.values()
                         if e.tier is Tier.DEVICE and e.pinned and e not in held)
            if together + pinned > self.device_budget:
                raise NoRoom(f"no room for adapter {no_room.key}: this request's adapters need {together} bytes "
                             f"on the device together and pinned adapters hold {pinned} bytes of the adapter "
                             f"memory budget ({self.device_budget} bytes); unload a pinned adapter or raise "
                             "--adapter-memory")
            return None if self._freed != no_room.freed else self._freed

    def _queue_waiter(self, alive: Callable[[], bool], waiter: _Waiter | None) -> _Waiter:
        """Put a request in line for room: a new one last; one that had stepped aside after getting room for an
        adapter and now needs room for another, first again (it keeps its place and its deadline)."""
        with self._lock:
            if waiter is None:
                waiter = _Waiter(alive, time.monotonic() + self.wait_seconds)
                self._waiters.append(waiter)
                self.metrics.adapter_waits.inc()
            elif waiter not in self._waiters:
                self._waiters.insert(0, waiter)
            self.metrics.adapters_waiting.set(len(self._waiters))
        return waiter

    def _dequeue_waiter(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self.metrics.adapters_waiting.set(len(self._waiters))
                self._room.notify_all()  # the next in line

    def _wait_for_room(self, waiter: _Waiter, no_room: _NoRoomYet, mark: int | None) -> None:
        """Return when `waiter` should try again: it is first in line and device room may have been freed
        since `mark`. Requests wait for room in arrival order and hold none of their adapters meanwhile, so two
        requests that each need room never wait for each other, and only the first in line retries (a release
        wakes one retry, not every waiter). Raises past the deadline, or when the client is gone (checked every
        _POLL seconds: a client leaving notifies nothing)."""
        with self._room:
            while True:
                if not waiter.alive():
                    raise Cancelled(f"the request ended while adapter {no_room.key} waited for device memory")
                left = waiter.deadline - time.monotonic()
                if left <= 0:
                    raise NoRoom(f"no room for adapter {no_room.key} ({no_room.need} bytes) within "
                                 f"{self.wait_seconds:g} s: the adapter memory budget ({self.device_budget} "
                                 "bytes) is held by adapters that running requests use; retry later or raise "
                                 "--adapter-memory")
                if self._waiters[0] is not waiter:
                    mark = None  # room freed while others went first is room this one has not tried
                elif mark is None or self._freed != mark:
                    return
                self._room.wait(min(left, _POLL))

    def _acquire_one(self, manifest: ServedManifest, *, pin: bool, read: Adapter | None = None,
                     got_room: Callable[[], None] = lambda: None, then_submit: bool = False) -> Entry:
        key = manifest.ref
        while True:
            with self._lock:
                entry = self._entries.get(key)
                # the entry when it holds this very version
                current = entry if entry is not None and entry.manifest.sha256 == manifest.sha256 else None
                if current is not None and current.tier is Tier.DEVICE:
                    self._hold(current, pin)
                    self.metrics.cache_hits.labels(tier=Tier.DEVICE.value).inc()
                    return current
                pending = self._loading.get(key)
                if pending is None:
                    if entry is not None and current is None and entry.in_use:
                        raise Unavailable(f"adapter {key} was pushed again with other content while {entry.in_use} "
                                          "running request(s) use its old content; retry when they end")
                    pending = self._loading[key] = Future()
                    owner = True
                else:
                    owner = False
            if not owner:
                pending.result()  # the loader's error, if it failed, is this request's error too
                continue  # on the device now (or evicted again meanwhile: go round)
            try:
                if entry is not None and current is None:
                    self._forget_stale(entry)
                entry = self._load(key, manifest, pin, then_submit, read, got_room)
                pending.set_result(None)
            except BaseException as e:
                pending.set_exception(e)
                raise
            finally:
                with self._lock:
                    del self._loading[key]
            return entry

    def _forget_stale(self, entry: Entry) -> None:
        """Drop an idle entry whose content is no longer its version's (removed and pushed again), off the
        engine first, so the new content is read from disk and checked like any other (the caller holds the
        key's load future: nobody acquires it meanwhile)."""
        if entry.tier is Tier.DEVICE:
            self._on_engine(lambda: self.engine.unload(entry.key))
        with self._lock:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._verified.discard((entry.key, entry.manifest.sha256))
            self._room_freed_locked()

    def _hold(self, entry: Entry, pin: bool) -> None:
        entry.in_use += 1
        entry.requests += 1
        entry.pinned = entry.pinned or pin
        entry.last_used = time.monotonic()

    def _load(self, key: str, manifest: ServedManifest, pin: bool, then_submit: bool = False, read: Adapter | None = None,
              got_room: Callable[[], None] = lambda: None) -> Entry:
        """Bring one adapter onto the device: from host memory if it is there (or `read`: the copy its request
        read from disk before waiting for room, checked then), else from disk. `got_room` runs once the device
        bytes are reserved, before the slow part (the device copies, the hand-over between two batch steps).
        With `then_submit` (its request follows the hand-over) the whole load runs inside `on_loading()`."""
        with self._on_loading() if then_submit else nullcontext():
            return self._load_announced(key, manifest, pin, then_submit, read, got_room)

    def _load_announced(self, key: str, manifest: ServedManifest, pin: bool, then_submit: bool, read: Adapter | None,
                        got_room: Callable[[], None]) -> Entry:
        started = time.perf_counter()
        with self._lock:
            entry = self._entries.get(key)
            adapter = entry.adapter if entry is not None and entry.adapter is not None else read
        source = Tier.HOST if adapter is not None else Tier.DISK
        verified: Callable[[], None] = lambda: None  # a host copy was verified when it was read
        if adapter is None:
            self.metrics.cache_misses.inc()
            adapter, verified = self._read_verified(key, manifest)
        else:
            self.metrics.cache_hits.labels(tier=Tier.HOST.value).inc()
        need = self.engine.weights_bytes(adapter)
        try:
            victims = self._make_room(need, key, isinstance(manifest, MergedManifest))
        except _NoRoomYet as no_room:
            verified()  # a damaged file is reported as damaged, not as one that finds no room
            if source is Tier.DISK:
                no_room.read = (manifest, adapter)
            raise
        except ServeError:
            verified()
            raise
        got_room()

        def hand_over() -> int:  # one call between two batch steps, however many adapters make room
            for victim in victims:
                self.engine.unload(victim.entry.key)
                victim.unloaded = True
            return self.engine.install(resident)

        used: int | None = None
        try:
            resident = self.engine.prepare(key, adapter)  # here, not between steps: the batch keeps decoding
            verified()  # the file hashes ran meanwhile; a damaged adapter is never installed
            used = int(self._on_engine(hand_over, then_submit=then_submit))
        except ArtifactError as e:
            verified()
            raise self._refuse(key, manifest, f"adapter {key} does not fit the served base: {e}") from None
        finally:
            with self._lock:  # the reservation ends where the entry's bytes start counting: no gap between
                self._reserved -= need
                for victim in victims:
                    del self._loading[victim.entry.key]
                    if not victim.unloaded:  # the load failed before its hand-over: the engine still holds it
                        victim.entry.tier, victim.entry.device_bytes = Tier.DEVICE, victim.device_bytes
                if used is not None:
                    entry = self._entries.get(key) or Entry(key=key, manifest=manifest)
                    self._entries[key] = entry
                    entry.manifest, entry.tier, entry.adapter, entry.device_bytes = manifest, Tier.DEVICE, adapter, used
                    # hashed right and fits: its next read from disk skips the fit check
                    self._verified.add((key, manifest.sha256))
                    self._hold(entry, pin)
                    self._trim_host_locked()
                    self._forget_old_locked()
                self._room_freed_locked()  # a failed load's reservation is free again
            for victim in victims:
                victim.done.set_result(None)
            self.metrics.evictions.labels(tier=Tier.DEVICE.value).inc(sum(v.unloaded for v in victims))
        self.metrics.loads.labels(source=source.value).inc()
        self.metrics.load_seconds.labels(source=source.value).observe(time.perf_counter() - started)
        self._update_gauges()
        return entry

    def _offer_to_host(self, key: str, manifest: ServedManifest, adapter: Adapter) -> None:
        """Put an adapter a waiting request read (hashed right, fits) in the host tier if it has free room, for
        other requests naming it; never evicting for it (waiters would churn the tier; each keeps its copy)."""
        with self._lock:
            entry = self._entries.setdefault(key, Entry(key=key, manifest=manifest))
            if entry.tier is Tier.DISK and self._host_used_locked() + adapter.nbytes <= self.host_budget:
                entry.tier, entry.adapter = Tier.HOST, adapter
                self._verified.add((key, manifest.sha256))
            self._forget_old_locked()

    def _read_verified(self, key: str, manifest: ServedManifest) -> tuple[Adapter, Callable[[], None]]:
        """Read an adapter version from the registry and refuse it if it was made for another base.

        Returns the adapter and `verified()`, which raises DamagedData if its stored bytes are damaged: their
        sha256 runs in another thread meanwhile (Registry.read_deferred), so the caller prepares the adapter
        and calls `verified()` before serving it, and before any refusal, so a damaged file is reported as
        damaged, not as an adapter that does not fit."""
        with self._lock:
            refused = self._refused.get(key)
        if refused is not None and refused[0] == manifest.sha256:  # these very bytes were refused: not parsed again
            raise refused[2](refused[1])
        try:
            if isinstance(manifest, MergedManifest):  # built from parents read (and verified) as any adapter
                adapter, check = manifest.build(lambda m: self._read_now(m.ref, m)), (lambda: None)
            else:
                adapter, check = self.registry.read_deferred(manifest)
        except IntegrityError as e:
            raise _damaged(key, e) from None
        except ArtifactError as e:  # intact bytes (read_deferred checks them first) that are no adapter
            raise self._refuse(key, manifest, f"adapter {key} cannot be read: {e}") from None
        except (HubError, OSError) as e:
            raise Unusable(f"adapter {key} cannot be read: {e}") from None

        def verified() -> None:
            try:
                check()
            except IntegrityError as e:
                raise _damaged(key, e) from None

        # checked once per version's content while it stays known (see `_forget_old_locked`)
        if (key, manifest.sha256) not in self._verified:
            try:
                self._check_base(key, adapter, manifest)
            except WrongBase as e:
                verified()
                raise self._refuse(key, manifest, e.message, WrongBase) from None
        return adapter, verified

    def _refuse(self, key: str, manifest: ServedManifest, message: str, kind: type[Unusable] = Unusable) -> Unusable:
        """Unusable (or `kind`) for an adapter whose intact bytes cannot serve here, remembered by its sha256 so
        requests naming it again are refused without reading and parsing it again (parsing a large artifact
        holds the GIL); a new push under the same version has another sha256."""
        with self._lock:
            self._refused[key] = (manifest.sha256, message, kind)
            self._refused.move_to_end(key)
            while len(self._refused) > self._max_entries:
                self._refused.popitem(last=False)
        return kind(message)

    def _check_base(self, key: str, adapter: Adapter, manifest: ServedManifest) -> None:
        """WrongBase unless the adapter fits the served base and was made for it (fingerprint)."""
        try:
            fitted = fitted_fingerprint(adapter, self.engine.model)
        except ArtifactError as e:
            raise WrongBase(f"adapter {key} was not made for the served base model: {e}") from None
        recorded = manifest.base_model.fingerprint
        if recorded and recorded != fitted:
            raise WrongBase(f"adapter {key} was made for another base model ({manifest.base_model.id or 'unknown'}, "
                             "fingerprint differs from the served base's)")

    def _read_now(self, key: str, manifest: ServedManifest) -> Adapter:
        """`_read_verified`, waiting for the hash (a merge's parents are combined into a new adapter at once)."""
        adapter, verified = self._read_verified(key, manifest)
        verified()
        with self._lock:
            if key in self._entries:  # marks stay bounded by the entries (`_forget_old_locked` drops both);
                self._verified.add((key, manifest.sha256))  # a parent read only for merges: checked again next time
        return adapter

    # -- eviction ----------------------------------------------------------------------------------
    def _make_room(self, need: int, key: str, merged: bool = False) -> list[_Evicting]:
        """Reserve `need` device bytes, moving LRU idle unpinned adapters to the host tier, or refuse; for a
        `merged` adapter, also move LRU idle merges until fewer than max_merged are on the device.

        Returns the adapters moved, for the caller to take off the engine in the same hand-over as its
        load (a hand-over waits for the step in flight: one wait per load, not one per adapter), or to put
        back on the device tier if the load fails before it; until then, a request for one of them waits
        on its future."""
        if need > self.device_budget:
            raise TooLarge(f"adapter {key} needs {need} bytes on the device, more than the whole adapter "
                           f"memory budget ({self.device_budget} bytes; raise --adapter-memory)")
        with self._lock:
            victims: list[Entry] = []
            used = self._device_used_locked() + self._reserved
            on_device = [e for e in self._entries.values() if e.tier is Tier.DEVICE]
            candidates = sorted((e for e in on_device if not e.pinned and e.in_use == 0 and e.key not in self._loading),
                                key=lambda e: e.last_used)
            extra_merges = sum(e.built for e in on_device) + 1 - self._max_merged if merged else 0
            for entry in candidates:
                short = used + need > self.device_budget
                if not short and extra_merges <= 0:
                    break
                if short or entry.built:  # room enough in bytes: only merges go, for the count
                    victims.append(entry)
                    used -= entry.device_bytes
                    extra_merges -= entry.built
            if used + need > self.device_budget:
                raise _NoRoomYet(key, need, self._freed)  # the acquire waits, or refuses if room can never come
            self._reserved += need
            moving = [_Evicting(entry, entry.device_bytes) for entry in victims]
            for victim in moving:
                victim.entry.tier, victim.entry.device_bytes = Tier.HOST, 0
                self._loading[victim.entry.key] = victim.done
            return moving

    def _device_used_locked(self) -> int:
        return sum(e.device_bytes for e in self._entries.values() if e.tier is Tier.DEVICE)

    def _host_used_locked(self) -> int:
        return sum(e.host_bytes for e in self._entries.values() if e.tier is Tier.HOST)

    def _trim_host_locked(self) -> None:
        """Drop host copies of adapters that are not on the device, LRU first, to the host budget and to
        max_merged merges (not those a load in progress is moving: a failed load puts them back on the
        device, with their host copy)."""
        host = sorted((e for e in self._entries.values() if e.tier is Tier.HOST and e.key not in self._loading),
                      key=lambda e: e.last_used)
        used = sum(e.host_bytes for e in host)
        extra_merges = sum(e.built for e in host) - self._max_merged
        for entry in host:
            over = used > self.host_budget
            if not over and extra_merges <= 0:
                break
            if over or entry.built:  # within the budget: only merges go, for the count
                used -= entry.host_bytes
                extra_merges -= entry.built
                entry.tier, entry.adapter = Tier.DISK, None
                self.metrics.evictions.labels(tier=Tier.HOST.value).inc()

    def _forget_old_locked(self) -> None:
        """Bound the bookkeeping: forget the least recently used disk-tier entries past max_entries."""
        disk = sorted((e for e in self._entries.values() if e.tier is Tier.DISK), key=lambda e: e.last_used)
        for entry in disk[: max(0, len(self._entries) - self._max_entries)]:
            del self._entries[entry.key]
            self._verified.discard((entry.key, entry.manifest.sha256))  # checked again if it ever comes back

    # -- admin -------------------------------------------------------------------------------------
    def load(self, ref: str, *, pin: bool, alive: Callable[[], bool] = lambda: True) -> tuple[Entry, float]:
        """LoadAdapter: make a ref resident (optionally pinned); (entry, seconds spent loading)."""
        manifest = self.resolve(ref)
        started = time.perf_counter()
        with self._lock:
            entry = self._entries.get(manifest.ref)
            was_resident = entry is not None and entry.tier is Tier.DEVICE
        lease = self.acquire([manifest], pin=pin, alive=alive)
        self.release(lease, served=False)
        return lease.entries[0], 0.0 if was_resident else time.perf_counter() - started

    def unload(self, ref: str) -> Entry:
        """UnloadAdapter: unpin and drop from memory; Unusable while requests use it."""
        manifest = self.resolve(ref)
        key = manifest.ref
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.tier is Tier.DISK:
                raise errors.NotFound(f"adapter {key} is not loaded")
            if entry.in_use or key in self._loading:
                raise Unusable(f"adapter {key} is in use by {entry.in_use} running request(s); retry when they end")
            on_device = entry.tier is Tier.DEVICE
            entry.tier, entry.adapter, entry.device_bytes, entry.pinned = Tier.DISK, None, 0, False
        if on_device:
            self._on_engine(lambda: self.engine.unload(key))
        with self._lock:
            self._room_freed_locked()
        self._update_gauges()
        return entry

    @staticmethod
    def soft_prompt_tokens(lease: Lease) -> int:
        """Soft-prompt tokens the held adapters put before a prompt, from their host copies (held adapters
        always have one), so a request handler never waits on the engine's lock for it."""
        return sum(int(module_tensors(adapter)[PROMPT_SITE]["prompt_embeddings"].shape[0])
                   for e in lease.entries
                   if (adapter := e.adapter) is not None and adapter.technique is Technique.PROMPT_TUNING)

    def entries(self, after: str = "") -> list[Entry]:
        """A snapshot of every adapter the pool knows whose key sorts after `after`, in key order (stable
        across pages while adapters are used)."""
        with self._lock:
            return sorted((e for e in self._entries.values() if e.key > after), key=lambda e: e.key)

    def device_used(self) -> int:
        with self._lock:
            return self._device_used_locked()

    def _update_gauges(self) -> None:
        with self._lock:
            device = self._device_used_locked()
            host = self._host_used_locked()
        self.metrics.resident_bytes.labels(tier=Tier.DEVICE.value).set(device)
        self.metrics.resident_bytes.labels(tier=Tier.HOST.value).set(host)
