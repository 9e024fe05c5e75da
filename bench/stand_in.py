"""Stand-in kernel backends that measure what a LoRA kernel cannot avoid (bench/step_cost.py, and a whole server
through bench/floor/sitecustomize.py).

- `StandIn(read=True)`: each `lora` call reads exactly the slots its uses name (`torch.sum` over the run from the
  first use's slot to the last one's, of A and of B: uses come sorted by slot, and with one row per distinct
  adapter that run is the slots in use) and adds nothing. Any kernel must read each distinct adapter's bytes
  once a step, and those reads evict what the base's ops would find in the caches: this costs both, and no
  arithmetic. Its outputs are wrong (no delta is added): a throughput floor, never a server.
- `StandIn(read=False)`: each call returns at once: what the calls and the ops' Python around them cost.
"""
from __future__ import annotations

import torch


class StandIn:
    """A backend with the seam's `lora` op (the one the LoRA technique calls) that reads or does nothing."""

    def __init__(self, read: bool):
        self.read = read
        self.__name__ = f"stand-in ({'reading the bytes' if read else 'calls only'})"  # as a module has

    def lora(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
             slots: torch.Tensor, scale: torch.Tensor) -> None:
        if self.read and slots.numel():
            first, last = slots[0].item(), slots[-1].item() + 1
            a[first:last].sum()
            b[first:last].sum()
