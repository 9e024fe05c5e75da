"""Slot buffers: where resident adapters live on the device, read in place by the kernel seam.

Per adapted site and slot layout (the shapes of what one adapter keeps there, and their dtype), one `SlotBuffer`
holds every resident adapter of that layout there, one tensor per part with the slots as dim 0. LoRA keeps
`parts` = (A [capacity, r, d_in], scaled B^T [capacity, r, d_out]) per rank class: a rank-8 adapter beside a
rank-64 one costs rank 8, ranks never share a buffer, so nothing is padded. IA3 and BitFit keep one vector
[capacity, d] per site and length (an IA3 scaling and a BitFit bias of one length at one site share a buffer).

An adapter is copied into free slots once, when it is prepared (outside the engine lock: a slot nobody's
index names is never read, so a running batch does not see the copy), and its slots are freed when it is
unloaded or replaced (or, for one prepared but never installed, when it is garbage: `place`). A
batch change then moves no adapter bytes: rows carry slot indices (`PerToken`; runtime/techniques/lora.py,
ia3.py, bitfit.py).

Buffers grow by `CHUNK` slots when full (one copy of the buffer into a larger one; forwards read the buffer
attribute per call, and the old tensor stays valid for one in flight) and never shrink: freed slots are
reused, lowest first. The memory budget counts each adapter's own slot bytes (`slot_bytes`, exactly its
tensors' size); the capacity beyond them is the free slots of a buffer, at most `CHUNK` - 1 per
(site, layout) once no load is in flight (`SlotStore.bytes`).
"""
from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from hub.weakmemo import per_object

from runtime.techniques.base import Resident

if TYPE_CHECKING:
    from hub.artifact import Technique
    from runtime.techniques.base import Use

CHUNK = 4  # slots a full buffer grows by: a few, so the slack the budget does not see stays small


class SlotBuffer:
    """One site's slots for one layout: `parts` (one tensor [capacity, *shape] per part) and the free list."""

    # Buffers grown so far, in every store: a captured decode graph (runtime/graphs.py) holds the addresses of the
    # parts it read, so one captured before a growth is not replayed after it.
    growths = 0

    def __init__(self, shapes: tuple[tuple[int, ...], ...], device: torch.device, dtype: torch.dtype):
        self.parts = [torch.zeros(0, *shape, device=device, dtype=dtype) for shape in shapes]
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}  # slot -> its view in each part, until a growth
        self.free: list[int] = []  # descending, so pop() takes the lowest

    def views(self, slot: int) -> tuple[torch.Tensor, ...]:
        """The slot's view in each part, made at its first fill since the buffer last grew: a slot reused by
        later loads costs no indexing call."""
        views = self._views.get(slot)
        if views is None:
            views = self._views[slot] = tuple(p[slot] for p in self.parts)
        return views

    @property
    def capacity(self) -> int:
        return self.parts[0].shape[0]

    @property
    def slot_bytes(self) -> int:
        """Bytes one adapter occupies here: its own tensors, nothing padded."""
        return sum(math.prod(p.shape[1:]) for p in self.parts) * self.parts[0].element_size()

    def take(self) -> int:
        if not self.free:
            old = self.capacity
            self.parts = [torch.cat([p, p.new_zeros(CHUNK, *p.shape[1:])]) for p in self.parts]
            self._views = {}  # of the old parts
            self.free = list(range(old + CHUNK - 1, old - 1, -1))
            SlotBuffer.growths += 1
        return self.free.pop()

    def put(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort(reverse=True)


@dataclass(eq=False)
class Slot:
    """Where one adapter's tensors at one site live: a buffer and its slot there."""

    buffer: SlotBuffer
    slot: int


@dataclass(frozen=True)
class Scaled:
    """A tensor to copy into a slot and multiply there by `scale`, in the slot's dtype (as scaling it after
    converting it would)."""

    tensor: torch.Tensor
    scale: float


class SlotStore:
    """All of one model's slot buffers, keyed by (site, layout); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.buffers: dict[tuple[str, Any], SlotBuffer] = {}
        # slots given back while the lock was taken (`free`), put back by the next locked section
        self._returned: deque[list[tuple[SlotBuffer, int]]] = deque()

    def fill(self, groups: Sequence[tuple[str, tuple[torch.Tensor | Scaled, ...]]]) -> list[tuple[SlotBuffer, int]]:
        """Copy each group (a site and one adapter's tensors there, of one dtype) into a free slot of the buffer
        of its layout there; a `Scaled` tensor is multiplied by its scale in the slot. The slots, in order.
        Every copy (converting dtype and device as it goes) is one call and every scaling another, whatever
        the count of tensors: a load is hundreds of small tensors, and each call in a thread that shares the
        GIL with a decoding batch costs far more than its copy."""
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        scaled: list[torch.Tensor] = []
        scales: list[float] = []
        taken = []
        with self._lock:
            self._put_back_locked()
            for site, tensors in groups:
                plain = [t.tensor if isinstance(t, Scaled) else t for t in tensors]
                layout = (site, (tuple(tuple(t.shape) for t in plain), plain[0].dtype))
                buffer = self.buffers.get(layout)
                if buffer is None:
                    buffer = self.buffers[layout] = SlotBuffer(layout[1][0], plain[0].device, plain[0].dtype)
                taken.append((buffer, buffer.take()))
            for (buffer, slot), (_, tensors) in zip(taken, groups):  # after every take: a growth drops views
                for view, t in zip(buffer.views(slot), tensors):
                    dsts.append(view)
                    srcs.append(t.tensor if isinstance(t, Scaled) else t)
                    if isinstance(t, Scaled):
                        scaled.append(view)
                        scales.append(t.scale)
            torch._foreach_copy_(dsts, srcs)
            if scaled:
                torch._foreach_mul_(scaled, scales)
        return taken

    def free(self, held: list[tuple[SlotBuffer, int]]) -> None:
        """Give back these slots (emptying the list, so a second call frees nothing twice).

        Never waits for the lock: `place`'s finalizer calls this from the garbage collector, which runs at any
        allocation of any thread, also inside this store's own locked sections, where waiting would hang that
        thread for good. Slots given back while the lock is taken go back at the next locked section, which
        every reader of the free lists and byte counts starts with."""
        self._returned.append(held)  # atomic: no lock needed
        if self._lock.acquire(blocking=False):
            try:
                self._put_back_locked()
            finally:
                self._lock.release()

    def _put_back_locked(self) -> None:
        while self._returned:
            held = self._returned.popleft()
            while held:
                buffer, slot = held.pop()
                buffer.put(slot)

    def parts(self) -> list[torch.Tensor]:
        """Every buffer's tensors now: what a captured decode graph (runtime/graphs.py) keeps alive, so a buffer
        that grows while a replay is on its way leaves the old tensor readable until the graph goes."""
        with self._lock:
            self._put_back_locked()
            return [part for buffer in self.buffers.values() for part in buffer.parts]

    def bytes(self) -> tuple[int, int]:
        """(bytes in occupied slots, bytes allocated) over every buffer."""
        with self._lock:
            self._put_back_locked()
            used = total = 0
            for buffer in self.buffers.values():
                used += buffer.slot_bytes * (buffer.capacity - len(buffer.free))
                total += buffer.slot_bytes * buffer.capacity
            return used, total


Indices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rows, slots (int64), weight (float32)


def slot_classes(uses: list[Use], site: str, device: torch.device, made: dict[tuple, Indices],
                 slot_of: Callable[[Use], Slot] | None = None) -> list[tuple[SlotBuffer, Indices]]:
    """Per slot buffer `uses` read at `site` (each use's payload there a `Slot`, or `slot_of(use)` where a payload
    holds more than one), the (row, slot, weight) index tensors of its entries, one per use. Entries go sorted by
    (slot, row): the fused kernels take a run of one slot's rows a tile at a time, reading its weights once per
    tile. Equal entry lists (every layer's q_proj, say) share tensors through `made`."""
    by_buffer: dict[int, tuple[SlotBuffer, list[tuple[int, int, float]]]] = {}
    for use in uses:
        placed = use.resident.sites[site] if slot_of is None else slot_of(use)
        by_buffer.setdefault(id(placed.buffer), (placed.buffer, []))[1].append((placed.slot, use.row, use.weight))
    classes = []
    for buffer, entries in by_buffer.values():
        entries.sort()
        key = tuple(entries)
        if key not in made:
            slots, rows, weights = zip(*entries)
            made[key] = (torch.tensor(rows, device=device), torch.tensor(slots, device=device),
                         torch.tensor(weights, device=device, dtype=torch.float32))
        classes.append((buffer, made[key]))
    return classes


class PerToken:
    """A batch's index tensors over rows (each a tuple of parallel 1-D tensors, row indices first), expanded to
    the flattened (row, token) positions a forward of `tokens` tokens per row feeds the kernels: each row's
    entry repeated for its tokens. Decode's (one token) and the latest prefill's are kept."""

    def __init__(self, rows: int, entries: Sequence[tuple[torch.Tensor, ...]]):
        self.rows = rows
        self._kept: dict[int, list[tuple[torch.Tensor, ...]]] = {1: list(entries)}

    def get(self, flat_rows: int) -> list[tuple[torch.Tensor, ...]]:
        """The entries for a flattened [rows * tokens, d] activation of `flat_rows` rows."""
        tokens = flat_rows // self.rows
        got = self._kept.get(tokens)
        if got is None:
            got = []
            for rows, *rest in self._kept[1]:
                steps = torch.arange(tokens, device=rows.device)
                got.append(((rows[:, None] * tokens + steps).reshape(-1),
                            *(t.repeat_interleave(tokens) for t in rest)))
            self._kept = {1: self._kept[1], tokens: got}
        return got


def bucket(n: int) -> int:
    """The smallest size of 1, 2, 4, 8, then a multiple of 8, that holds `n` (0 stays 0): vLLM's CUDA graph
    capture sizes. A graphed decode step pads its rows and its ops' uses to these (runtime/graphs.py), so
    batches whose counts differ a little share one graph."""
    if n <= 0:
        return 0
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return -(-n // 8) * 8


class NoRoom(Exception):
    """A padded index needs a padding position and its space has none (a batch that fills its bucket)."""


class Padding:
    """How a batch of `rows` live rows is padded to `to` rows for a graphed decode step: each op's index tensors
    padded to `bucket` lengths with uses that are harmless. A padded use names a padding position of its index
    space (rows `rows`..`to` - 1 of the batch, or the padding entries of an op's own index space: the caller
    pads that space too), so the kernel seam's rule holds for the live rows: a row in no new use is left as it
    was, and no padded use reads or writes a live row. Every tensor made is new (none shared with the eager
    ops), and a tensor met twice is padded once, so tensors shared between sites stay shared."""

    def __init__(self, rows: int, to: int):
        self.rows, self.to = rows, to
        self._made: dict[tuple, torch.Tensor] = {}

    def pad(self, t: torch.Tensor, length: int, fill: float | None = None, space: tuple[int, int] | None = None
            ) -> torch.Tensor:
        """`t` (1-D) as a new tensor of `length` entries: the added ones positions cycling over the padding part
        [space[0], space[1]) of an index space (default: the batch's padding rows), else `fill` (None: `t`'s
        last value, e.g. a slot its buffer holds)."""
        key = (id(t), length, fill, space)
        made = self._made.get(key)
        if made is not None:
            return made
        missing = length - t.shape[0]
        assert missing >= 0, "padding never shortens"
        if missing and fill is None and space is None:
            extra = t[-1:].expand(missing)
        elif missing and fill is None:
            lo, hi = space or (self.rows, self.to)
            if hi <= lo:
                raise NoRoom
            extra = torch.arange(missing, device=t.device, dtype=t.dtype) % (hi - lo) + lo
        else:
            extra = t.new_full((missing,), fill if fill is not None else 0)
        made = self._made[key] = torch.cat([t, extra])
        return made

    def uses(self, entry: tuple[torch.Tensor, ...], fills: tuple[float | None, ...],
             space: tuple[int, int] | None = None, length: int | None = None) -> tuple[torch.Tensor, ...]:
        """Parallel index tensors, rows first (into `space`'s index space, default the batch's), padded to
        `length` (default: the bucket of their length); `fills` for the others, as `pad` takes them."""
        length = bucket(entry[0].shape[0]) if length is None else length
        rows = self.pad(entry[0], length, None, space or (self.rows, self.to))
        return (rows, *(self.pad(t, length, fill) for t, fill in zip(entry[1:], fills)))

    def slot_uses(self, entries: Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
        """(rows, slots[, scale]) entries over the batch's rows, padded: a padded use reads a slot its buffer
        holds (the last entry's) with scale 0, into a padding row; entries sorted by (slot, row) stay sorted."""
        return [self.uses(entry, (None, 0.0)[:len(entry) - 1]) for entry in entries]


# the slot store of a model (one per model, made at its first slotted adapter)
store_of: Callable[[nn.Module], SlotStore] = per_object(lambda model: SlotStore())


def place(key: str, technique: Technique, model: nn.Module,
          per_site: dict[str, list[tuple[torch.Tensor | Scaled, ...]]],
          config: dict[str, Any], payload: Callable[[str, list[Slot]], Any] = lambda site, slots: slots[0]
          ) -> Resident:
    """A resident whose tensors at each site (`per_site`: one or more groups of tensors, each group of one dtype
    and kept in one slot; a `Scaled` one is scaled there) are copied into slots of `model`'s store (converted to
    the buffer's dtype and device by the copy), its payload there `payload(site, slots)` (the groups' slots in
    order) and its bytes its slots' bytes. Its slots go back when the engine lets it go (`free`), or when it is
    garbage (prepared, never installed)."""
    store = store_of(model)
    held = store.fill([(site, tensors) for site, groups in per_site.items() for tensors in groups])
    sites, at = {}, 0
    for site, groups in per_site.items():
        sites[site] = payload(site, [Slot(*placed) for placed in held[at:at + len(groups)]])
        at += len(groups)
    resident = Resident(key, technique, sites, sum(b.slot_bytes for b, _ in held), config)
    resident.free = weakref.finalize(resident, store.free, held)
    return resident
