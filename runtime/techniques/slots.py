"""Slot buffers: where resident LoRA adapters live on the device, read in place by the kernel seam.

Per adapted site and rank class (an adapter's exact rank at that site), one `SlotBuffer` holds every
resident adapter of that rank there: `a` [capacity, r, d_in] (lora_A) and `b` [capacity, r, d_out] (lora_B^T
with the scaling folded in; the kernels read it as the transposed view `b.transpose(1, 2)`). A rank-8 adapter
beside a rank-64 one costs rank 8: ranks never share a buffer, so nothing is padded.

An adapter is copied into free slots once, when it is prepared (outside the engine lock: a slot nobody's
index names is never read, so a running batch does not see the copy), and its slots are freed when it is
unloaded or replaced (or, for one prepared but never installed, when it is garbage). A batch change then
moves no adapter bytes: rows carry slot indices (runtime/techniques/lora.py).

Buffers grow by `CHUNK` slots when full (one copy of the buffer into a larger one; forwards read the buffer
attribute per call, and the old tensor stays valid for one in flight) and never shrink: freed slots are
reused, lowest first. The memory budget counts each adapter's own slot bytes (`slot_bytes`, exactly its
tensors' size); the capacity beyond them is the free slots of a buffer, at most `CHUNK` - 1 per
(site, rank) once no load is in flight (`SlotStore.bytes`).
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

CHUNK = 4  # slots a full buffer grows by: a few, so the slack the budget does not see stays small


class SlotBuffer:
    """One site's slots for one rank: `a` [capacity, r, d_in], `b` [capacity, r, d_out], and the free list."""

    def __init__(self, rank: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype):
        self.rank = rank
        self.a = torch.zeros(0, rank, d_in, device=device, dtype=dtype)
        self.b = torch.zeros(0, rank, d_out, device=device, dtype=dtype)
        self.free: list[int] = []  # descending, so pop() takes the lowest

    @property
    def capacity(self) -> int:
        return self.a.shape[0]

    @property
    def slot_bytes(self) -> int:
        """Bytes one adapter occupies here: its own A and B, nothing padded."""
        return self.rank * (self.a.shape[2] + self.b.shape[2]) * self.a.element_size()

    def take(self) -> int:
        if not self.free:
            old = self.capacity
            self.a = torch.cat([self.a, self.a.new_zeros(CHUNK, *self.a.shape[1:])])
            self.b = torch.cat([self.b, self.b.new_zeros(CHUNK, *self.b.shape[1:])])
            self.free = list(range(old + CHUNK - 1, old - 1, -1))
        return self.free.pop()

    def put(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort(reverse=True)


class SlotStore:
    """All of one model's LoRA slot buffers, keyed by (site, rank); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.buffers: dict[tuple[str, int], SlotBuffer] = {}

    def fill(self, site: str, a: torch.Tensor, b_t: torch.Tensor) -> tuple[SlotBuffer, int]:
        """Copy one adapter's A [r, d_in] and scaled B^T [r, d_out] at `site` into a free slot of its rank."""
        rank = a.shape[0]
        with self._lock:
            buffer = self.buffers.get((site, rank))
            if buffer is None:
                buffer = self.buffers[(site, rank)] = SlotBuffer(rank, a.shape[1], b_t.shape[1], a.device, a.dtype)
            slot = buffer.take()
            buffer.a[slot].copy_(a)
            buffer.b[slot].copy_(b_t)
        return buffer, slot

    def free(self, held: list[tuple[SlotBuffer, int]]) -> None:
        """Give back these slots (emptying the list, so a second call frees nothing twice)."""
        with self._lock:
            while held:
                buffer, slot = held.pop()
                buffer.put(slot)

    def bytes(self) -> tuple[int, int]:
        """(bytes in occupied slots, bytes allocated) over every buffer."""
        with self._lock:
            used = total = 0
            for buffer in self.buffers.values():
                used += buffer.slot_bytes * (buffer.capacity - len(buffer.free))
                total += buffer.slot_bytes * buffer.capacity
            return used, total


_stores: weakref.WeakKeyDictionary[nn.Module, SlotStore] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def store_of(model: nn.Module) -> SlotStore:
    """The slot store of `model` (one per model, made at its first LoRA)."""
    with _stores_lock:
        store = _stores.get(model)
        if store is None:
            store = _stores[model] = SlotStore()
        return store
