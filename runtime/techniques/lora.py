"""LoRA: y += w * scaling * B(A x) per row, many adapters (mixed ranks) in one forward, read in place.

Each resident adapter's A and scaled B^T live in slot buffers per site and rank (runtime/techniques/slots.py),
copied there once when it is prepared. A batch compiles, per site and rank class, three small tensors over
all its rows: which row, which slot, which weight (one entry per adapter a row stacks, its weight resolved
by the row's mode). The op then runs the kernel seam's `lora_shrink` / `lora_expand` over them
(runtime/kernels), so a batch change (join, leave, cancel) rebuilds index tensors and moves no adapter
bytes. Rows without an adapter at a site are in no entry: the kernels never read a slot for them (so a NaN
adapter cannot reach them) and leave them bit for bit unchanged. On a CPU a bf16/fp16 base keeps its LoRA
weights in float32 (`Lora.weights_dtype`); the kernels accumulate in float32 and round once into the output.
Why each choice: docs/engine.md, "LoRA slots".
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, lora_rank_alpha, module_tensors
from runtime import kernels
from runtime.techniques.base import (BatchInfo, Resident, RowBiasOp, SiteOp, Stage, TechniqueImpl, Use,
                                     nbytes_of, row_vectors, to_device)
from runtime.techniques.slots import SlotBuffer, store_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class LoraSite:
    buffer: SlotBuffer  # the site's slots for this adapter's rank
    slot: int  # this adapter's slot in it
    bias: torch.Tensor | None  # (out,), scaling folded in

    @property
    def rank(self) -> int:
        return self.buffer.rank


def scaling(config: dict, path: str) -> tuple[int, float]:
    """(rank, scaling) PEFT uses for the module at `path`."""
    r, alpha = lora_rank_alpha(config, path)
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


Indices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rows, slots (int64), scale (float32)


class LoraSlotsOp(SiteOp):
    """One site's LoRA over a whole batch: per rank class, the kernels over (row, slot, weight) entries."""

    stage = Stage.DELTA

    def __init__(self, rows: int, classes: list[tuple[SlotBuffer, Indices]]):
        self.rows = rows
        self.classes = classes
        self._per_token: dict[int, list[Indices]] = {1: [ix for _, ix in classes]}

    def _indices(self, tokens: int) -> list[Indices]:
        """The entries over flattened (row, token) positions: each row's entry repeated for its tokens."""
        got = self._per_token.get(tokens)
        if got is None:
            got = []
            for _, (rows, slots, scale) in self.classes:
                steps = torch.arange(tokens, device=rows.device)
                got.append(((rows[:, None] * tokens + steps).reshape(-1), slots.repeat_interleave(tokens),
                            scale.repeat_interleave(tokens)))
            self._per_token = {1: self._per_token[1], tokens: got}  # decode's and the latest prefill's
        return got

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a DELTA op is given the layer's output"
        if not y.is_contiguous():
            y = y.contiguous()
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        tokens = flat_x.shape[0] // self.rows
        for (buffer, _), (rows, slots, scale) in zip(self.classes, self._indices(tokens)):
            h = kernels.lora_shrink(flat_x, buffer.a, rows, slots)
            kernels.lora_expand(flat_y, h, buffer.b.transpose(1, 2), rows, slots, scale)
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
        store = store_of(model)
        held: list[tuple[SlotBuffer, int]] = []
        sites: dict[str, LoraSite] = {}
        for path, (a, b_t, bias) in prepared.items():
            buffer, slot = store.fill(path, a, b_t)
            held.append((buffer, slot))
            sites[path] = LoraSite(buffer, slot, bias)
        size = sum(s.buffer.slot_bytes + (nbytes_of([s.bias]) if s.bias is not None else 0) for s in sites.values())
        resident = Resident(key, self.technique, sites, size, adapter.config)
        # its slots go back when the engine lets it go, or when it is garbage (prepared, never installed)
        resident.free = weakref.finalize(resident, store.free, held)
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
        ops: dict[str, list[SiteOp]] = {}
        for site, uses in site_uses.items():
            by_buffer: dict[int, tuple[SlotBuffer, list[tuple[int, int, float]]]] = {}
            for use in uses:
                placed = use.resident.sites[site]
                by_buffer.setdefault(id(placed.buffer), (placed.buffer, []))[1].append(
                    (placed.slot, use.row, use.weight))
            classes = []
            for buffer, entries in by_buffer.values():
                entries.sort()  # by (slot, row): a run of one slot is a segment the kernels may run as one GEMM
                key = tuple(entries)
                if key not in made:
                    slots, rows, weights = zip(*entries)
                    made[key] = (torch.tensor(rows, device=batch.device), torch.tensor(slots, device=batch.device),
                                 torch.tensor(weights, device=batch.device, dtype=torch.float32))
                classes.append((buffer, made[key]))
            ops[site] = [LoraSlotsOp(batch.rows, classes)]
        return ops
