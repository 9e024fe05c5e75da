"""Slot buffers (runtime/techniques/slots.py): what one fill of many groups leaves in each slot."""
from __future__ import annotations

import torch

from runtime.techniques.slots import CHUNK, Scaled, SlotStore


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
