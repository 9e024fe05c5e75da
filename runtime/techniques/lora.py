"""LoRA: y += w * scaling * B(A x) per row, many adapters (mixed ranks) in one forward.

Two kernels, chosen per call by the number of tokens per row (both exact to float rounding):
- prefill (many tokens): rows are bucketed by rank; per bucket, gather each row's A and B and run
  two batched matmuls, so a row costs its own rank, never the batch's largest;
- decode (few tokens): "masked dense" over the batch's distinct adapters: h = x @ [A_1 .. A_S],
  multiplied by a per-row mask holding each row's own slots and weights, then h @ [B_1; ..; B_S].
  Few large matmuls beat many tiny ones when a step is dominated by dispatch; concatenating along
  the rank dimension means mixed ranks cost their sum, not S times the largest.
Stacked LoRAs in one row add (each with its weight); `lora_bias` becomes a per-row bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, module_tensors
from runtime.techniques.base import (BatchInfo, Resident, RowBiasOp, SiteOp, Stage, TechniqueImpl, Use,
                                     nbytes_of, row_vectors, to_device)

DENSE_MAX_TOKENS = 4  # at most this many tokens per row: the masked-dense kernel


@dataclass
class LoraSite:
    a_t: torch.Tensor  # (in, r)
    b_t: torch.Tensor  # (r, out), scaling folded in
    bias: torch.Tensor | None  # (out,), scaling folded in

    @property
    def rank(self) -> int:
        return self.a_t.shape[1]


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    import re

    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def scaling(config: dict, path: str) -> tuple[int, float]:
    """(rank, scaling) PEFT uses for the module at `path`."""
    r = int(_pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


class LoraOp(SiteOp):
    stage = Stage.DELTA

    def __init__(self, uses: list[Use], site: str):
        self.slots: list[LoraSite] = []
        index: dict[str, int] = {}
        self.pairs: list[tuple[int, int, float]] = []  # (row, slot, weight)
        for use in uses:
            if use.resident.key not in index:
                index[use.resident.key] = len(self.slots)
                self.slots.append(use.resident.sites[site])
            self.pairs.append((use.row, index[use.resident.key], use.weight))
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buckets: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] | None = None

    def _dense_parts(self, rows: int):
        if self._dense is None:
            a = torch.cat([s.a_t for s in self.slots], dim=1)
            b = torch.cat([s.b_t for s in self.slots], dim=0)
            offsets = [0]
            for s in self.slots:
                offsets.append(offsets[-1] + s.rank)
            mask = torch.zeros(rows, a.shape[1], device=a.device, dtype=a.dtype)
            for row, slot, weight in self.pairs:
                mask[row, offsets[slot]:offsets[slot + 1]] += weight
            self._dense = (a, b, mask)
        return self._dense

    def _bucket_parts(self, rows_total: int):
        if self._buckets is None:
            by_rank: dict[int, list[tuple[int, int, float]]] = {}
            for pair in self.pairs:
                by_rank.setdefault(self.slots[pair[1]].rank, []).append(pair)
            self._buckets = []
            for pairs in by_rank.values():
                order = [p[0] for p in pairs]
                # None: the bucket is every row once, in order (the common case), so no gather/scatter
                device = self.slots[0].a_t.device
                rows = None if order == list(range(rows_total)) else torch.tensor(order, device=device)
                a = torch.stack([self.slots[p[1]].a_t for p in pairs])
                b = torch.stack([self.slots[p[1]].b_t * p[2] for p in pairs])
                self._buckets.append((rows, a, b))
        return self._buckets

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        rows, tokens = x.shape[0], x.shape[1]
        if tokens <= DENSE_MAX_TOKENS:
            a, b, mask = self._dense_parts(rows)
            h = (x.reshape(rows, tokens, -1) @ a) * mask[:, None, :]
            return torch.addmm(y.reshape(rows * tokens, -1), h.reshape(rows * tokens, -1), b).view(y.shape)
        for idx, a, b in self._bucket_parts(rows):
            if idx is None:
                y = y.baddbmm_(torch.bmm(x, a), b)
            else:
                y.index_add_(0, idx, torch.bmm(torch.bmm(x.index_select(0, idx), a), b))
        return y


class Lora(TechniqueImpl):
    technique = Technique.LORA

    def load(self, key: str, adapter: Adapter, model: nn.Module) -> Resident:
        check_fits(adapter, model)
        sites: dict[str, LoraSite] = {}
        for path, t in module_tensors(adapter).items():
            if "lora_A" not in t:
                raise ArtifactError(f"module {path!r}: LoRA on embeddings is not served")
            r, scale = scaling(adapter.config, path)
            if t["lora_A"].shape[0] != r:
                raise ArtifactError(f"module {path!r}: lora_A has rank {t['lora_A'].shape[0]}, config says {r}")
            t = to_device(t, model)
            bias = t["lora_bias"] * scale if "lora_bias" in t else None
            sites[path] = LoraSite(t["lora_A"].t().contiguous(), (t["lora_B"] * scale).t().contiguous(), bias)
        size = sum(nbytes_of([s.a_t, s.b_t] + ([s.bias] if s.bias is not None else [])) for s in sites.values())
        return Resident(key, self.technique, sites, size, adapter.config)

    def compile(self, site: str, uses: list[Use], batch: BatchInfo) -> list[SiteOp]:
        ops: list[SiteOp] = [LoraOp(uses, site)]
        with_bias = [u for u in uses if u.resident.sites[site].bias is not None]
        if with_bias:
            ops.append(RowBiasOp(row_vectors(with_bias, batch, lambda u: u.resident.sites[site].bias)))
        return ops
