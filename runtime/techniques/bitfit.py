"""BitFit: per-row bias deltas, y += sum_i w_i b_i (stack adds; average uses normalised weights).

Served as a delta beside the base module's own bias, so modules without a bias work the same. Each bias is
copied once, at load, into the site's vector slot buffer (runtime/techniques/slots.py); a batch compiles per
site (row, slot, weight) index tensors and the op adds the slots in place with the kernel seam's `gather_add`,
so a batch change moves no bias. Untouched rows are in no entry: their output is bit-for-bit the base.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from hub.artifact import Adapter, Technique
from hub.checkpoint import check_fits, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, to_device
from runtime.techniques.slots import Indices, Padding, PerToken, Slot, SlotBuffer, place, slot_classes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BiasOp(SiteOp):
    """One site's BitFit over a whole batch: `gather_add` of the slots over (row, slot, weight) entries."""

    stage = Stage.DELTA

    def __init__(self, rows: int, classes: list[tuple[SlotBuffer, Indices]], ops: ModuleType):
        self.ops = ops  # the kernel seam's backend (runtime/kernels), called directly
        self.buffers = [buffer for buffer, _ in classes]
        self.indices = PerToken(rows, [ix for _, ix in classes])

    def padded(self, padding: Padding) -> BiasOp:
        entries = padding.slot_uses(self.indices.get(self.indices.rows))
        return BiasOp(padding.to, list(zip(self.buffers, entries)), self.ops)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a DELTA op is given the layer's output"
        if not y.is_contiguous():
            y = y.contiguous()
        flat = y.view(-1, y.shape[-1])
        for buffer, (rows, slots, weights) in zip(self.buffers, self.indices.get(flat.shape[0])):
            self.ops.gather_add(flat, buffer.parts[0], rows, slots, weights)
        return y


class BitFit(TechniqueImpl[Slot]):  # a site's payload: the slot holding the adapter's bias delta there
    technique = Technique.BITFIT

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident[Slot]:
        check_fits(adapter, model)
        like = next(model.parameters())
        return place(key, self.technique, model,
                     {path: [(to_device(t, like)["bias"].flatten(),)] for path, t in module_tensors(adapter).items()},
                     adapter.config)

    def compile_batch(self, site_uses: dict[str, list[Use[Slot]]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        made: dict[tuple, Indices] = {}
        return {site: [BiasOp(batch.rows, slot_classes(uses, site, batch.device, made), batch.kernels)]
                for site, uses in site_uses.items()}
