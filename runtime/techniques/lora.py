"""LoRA: y += w * scaling * B(A x) per row, many adapters (mixed ranks) in one forward, read in place.

Each resident adapter's A and scaled B^T live in slot buffers per site and rank (runtime/techniques/slots.py),
copied there once when it is prepared. A batch compiles, per site and rank class, three small tensors over
all its rows: which row, which slot, which weight (one entry per adapter a row stacks, its weight resolved
by the row's mode). The op then runs the kernel seam's `lora_shrink` / `lora_expand` over them
(runtime/kernels), so a batch change (join, leave, cancel) rebuilds index tensors and moves no adapter
bytes. Rows without an adapter at a site are in no entry: the kernels never read a slot for them (so a NaN
adapter cannot reach them) and leave them bit for bit unchanged. On a CPU a bf16/fp16 base keeps its LoRA
weights in float32 (`Lora.weights_dtype`); the kernels accumulate in float32 and round once into the output.
Why each choice: docs/engine.md, "Slots".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, lora_rank_alpha, module_tensors
from runtime import kernels
from runtime.techniques.base import (BatchInfo, Resident, RowBiasOp, SiteOp, Stage, TechniqueImpl, Use,
                                     nbytes_of, row_vectors, to_device)
from runtime.techniques.slots import Indices, PerToken, Slot, SlotBuffer, place, slot_classes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(eq=False)
class LoraSite(Slot):
    """The adapter's slot in the site's buffer for its rank (A, scaled B^T), and its `lora_bias`."""

    bias: torch.Tensor | None  # (out,), scaling folded in

    @property
    def rank(self) -> int:
        return self.buffer.parts[0].shape[1]


def scaling(config: dict, path: str) -> tuple[int, float]:
    """(rank, scaling) PEFT uses for the module at `path`."""
    r, alpha = lora_rank_alpha(config, path)
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


class LoraSlotsOp(SiteOp):
    """One site's LoRA over a whole batch: per rank class, the kernels over (row, slot, weight) entries."""

    stage = Stage.DELTA

    def __init__(self, rows: int, classes: list[tuple[SlotBuffer, Indices]]):
        self.classes = classes
        self.indices = PerToken(rows, [ix for _, ix in classes])

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a DELTA op is given the layer's output"
        if not y.is_contiguous():
            y = y.contiguous()
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for (buffer, _), (rows, slots, scale) in zip(self.classes, self.indices.get(flat_x.shape[0])):
            a, b_t = buffer.parts
            h = kernels.lora_shrink(flat_x, a, rows, slots)
            kernels.lora_expand(flat_y, h, b_t.transpose(1, 2), rows, slots, scale)
        return y


class Lora(TechniqueImpl[LoraSite]):
    technique = Technique.LORA

    def weights_dtype(self, model: nn.Module) -> torch.dtype:
        """float32 for a half-precision base on a CPU (see the module docstring), else the base's dtype."""
        param = next(model.parameters())
        half = param.dtype in (torch.bfloat16, torch.float16)
        return torch.float32 if half and param.device.type == "cpu" else param.dtype

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident[LoraSite]:
        check_fits(adapter, model)
        like = next(model.parameters())
        model_dtype, weights_dtype = like.dtype, self.weights_dtype(model)
        prepared: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for path, t in module_tensors(adapter).items():
            if "lora_A" not in t:
                raise ArtifactError(f"module {path!r}: LoRA on embeddings is not served")
            _, scale = scaling(adapter.config, path)  # check_fits has checked the rank against the tensors
            t = to_device(t, like, weights_dtype)
            bias = (t["lora_bias"] * scale).to(model_dtype) if "lora_bias" in t else None
            prepared[path] = (t["lora_A"], t["lora_B"].t() * scale, bias)  # A [r, in], scaled B^T [r, out]
        resident = place(key, self.technique, model, {path: (a, b_t) for path, (a, b_t, _) in prepared.items()},
                         adapter.config, lambda path, p: LoraSite(p.buffer, p.slot, prepared[path][2]))
        resident.nbytes += nbytes_of(s.bias for s in resident.sites.values() if s.bias is not None)
        return resident

    def compile(self, site: str, uses: list[Use[LoraSite]], batch: BatchInfo) -> list[SiteOp]:
        """Per segment only `lora_bias` (a per-row vector); the LoRA product is `compile_batch`'s."""
        with_bias = [u for u in uses if u.resident.sites[site].bias is not None]
        if not with_bias:
            return []
        def bias(use: Use[LoraSite]) -> torch.Tensor:
            b = use.resident.sites[site].bias
            assert b is not None  # with_bias holds only these
            return b

        return [RowBiasOp(row_vectors(with_bias, batch, bias))]

    def compile_batch(self, site_uses: dict[str, list[Use[LoraSite]]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        made: dict[tuple, Indices] = {}  # equal entries (every layer's q_proj, say) share their tensors
        return {site: [LoraSlotsOp(batch.rows, slot_classes(uses, site, batch.device, made))]
                for site, uses in site_uses.items()}
