"""Slot buffers (runtime/techniques/slots.py): what one fill of many groups leaves in each slot."""
from __future__ import annotations

import gc
import threading

import torch
from torch import nn

from hub.artifact import Technique
from runtime.techniques.slots import CHUNK, Scaled, SlotStore, place, store_of


def test_a_fill_that_grows_its_buffers_keeps_every_group_in_its_own_slot():
    """One fill takes more slots than its buffers have (they grow mid-fill, which remakes their slot views):
    each group still lands in its own slot, a `Scaled` tensor multiplied there, as copying its product would
    give; a second fill reuses nothing the first holds."""
    gen = torch.Generator().manual_seed(0)

    def group(i: int) -> tuple[str, tuple[torch.Tensor | Scaled, ...]]:
        a, b = torch.randn(2, 3, generator=gen), torch.randn(3, 2, generator=gen)
        return f"site{i % 2}", (a, Scaled(b.t(), 0.25 * (i + 1)))

    store = SlotStore()
    groups = [group(i) for i in range(4 * CHUNK + 1)]
    held = store.fill(groups) + store.fill(more := [group(i) for i in range(3)])
    assert len({(id(buffer), slot) for buffer, slot in held}) == len(groups) + len(more)
    for (buffer, slot), (_, (a, b)) in zip(held, groups + more):
        assert isinstance(a, torch.Tensor) and isinstance(b, Scaled)
        assert torch.equal(buffer.parts[0][slot], a)
        assert torch.equal(buffer.parts[1][slot], b.tensor * b.scale)


def test_a_prepared_adapter_the_gc_collects_inside_a_locked_section_gives_its_slots_back_without_a_hang():
    """A prepared adapter that is dropped in a reference cycle (e.g. held by the traceback of a damaged load's
    error) is freed by the cyclic GC, which runs at any allocation: also inside the slot store's own locked
    sections, e.g. while another adapter is being placed. Its finalizer must not wait on the lock its own
    thread holds; its slots still go back."""
    model = nn.Linear(2, 2)
    store = store_of(model)
    dropped = place("dropped", Technique.LORA, model, {"site": [(torch.ones(2, 3),)]}, {})
    assert store.bytes()[0] == dropped.nbytes > 0
    dropped.config["cycle"] = dropped  # only the cyclic GC frees it
    del dropped

    def collect_inside_the_lock() -> None:  # what an allocation inside `fill` does when it starts a collection
        with store._lock:
            gc.collect()

    thread = threading.Thread(target=collect_inside_the_lock, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the finalizer waited on the slot store's lock held by its own thread"
    assert store.bytes()[0] == 0
    (buffer, slot), = store.fill([("site", (torch.zeros(2, 3),))])
    assert slot == 0  # the collected adapter's slot is taken again
