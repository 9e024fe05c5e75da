"""IA3: per-row scaling vectors, read in place from slots. Attention modules scale their OUTPUT, feed-forward
modules (PEFT's `feedforward_modules`) their INPUT, exactly as PEFT does.

Composition of a row's IA3 adapters (l_i its vector, w_i its weight after the mode's rule):
- stack:   s = prod_i (1 + w_i (l_i - 1))  -- scalings multiply; weight 1 applies l_i fully, 0 not at all;
- average: s = 1 + sum_i w_i (l_i - 1)     -- with weights summing to 1 this is sum_i w_i l_i, the
           weighted mean of the adapters' outputs (AdapterHub Average).
IA3 scales the module with the row's LoRA/BitFit deltas already merged (PRE before, POST after them).

Each vector is copied once, at load, into the site's vector slot buffer (runtime/techniques/slots.py). A batch
compiles per site its factors: a stacked use with weight 1 is its slot itself (`gather_mul` straight from the
buffer); any other (weighted, or an average row's sum) is c + sum_j w_j l_j, made per forward with
`gather_add` into a small [factors, dim] tensor from the slots, then multiplied in. So a batch change builds
index tensors and moves no vector. Untouched rows are in no entry: their output is bit-for-bit the base.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch

from hub.artifact import Adapter, Technique
from hub.checkpoint import is_feedforward, check_fits, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, to_device
from runtime.techniques.slots import Indices, Padding, PerToken, Slot, SlotBuffer, bucket, place, slot_classes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(eq=False)
class IA3Site(Slot):
    """An adapter's IA3 vector at one module (its slot), and whether it scales that module's input (PEFT's
    feedforward_modules) or its output."""

    feedforward: bool


class ScaleOp(SiteOp):
    """One site's IA3 over a whole batch, for the uses that scale its input (PRE) or its output (POST)."""

    def __init__(self, stage: Stage, rows: int, buffer: SlotBuffer, direct: list[Indices],
                 fills: torch.Tensor | None, terms: Indices | None, factor_rows: torch.Tensor | None, ops: ModuleType):
        self.ops = ops  # the kernel seam's backend (runtime/kernels), called directly
        self.stage = stage  # per instance: PRE scales the input, POST the output
        self.buffer = buffer
        self.fills, self.terms = fills, terms  # factor f = fills[f] + sum of its terms' weighted slots
        entries = [(rows_, slots) for rows_, slots, _ in direct]
        if factor_rows is not None:
            entries.append((factor_rows, torch.arange(len(factor_rows), device=factor_rows.device)))
        self.indices = PerToken(rows, entries)

    def padded(self, padding: Padding) -> ScaleOp:
        """Direct uses padded as slot uses; computed factors padded to a bucket with a spare factor where the
        terms need one (a padded term adds 0 times a held slot into it), padding factors (1) scaling padding
        rows."""
        op = copy.copy(self)
        entries = self.indices.get(self.indices.rows)
        direct = padding.slot_uses(entries[:-1] if self.terms is not None else entries)
        if self.terms is not None:
            assert self.fills is not None, "terms come with their fills"
            factor_rows, factors = entries[-1]
            count, terms = factors.shape[0], self.terms[0].shape[0]
            size = bucket(count + (bucket(terms) != terms))
            op.fills = padding.pad(self.fills, size, 1.0)
            op.terms = cast(Indices, padding.uses(self.terms, (None, 0.0), space=(count, size)))
            direct.append((padding.pad(factor_rows, size, space=(padding.rows, padding.to)),
                           padding.pad(factors, size, space=(count, size))))
        op.indices = PerToken(padding.to, direct)
        return op

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.stage is Stage.PRE:  # the input is the caller's tensor: scale a copy
            t = x.clone(memory_format=torch.contiguous_format)
        else:  # the output is this module's own
            assert y is not None, "a POST op is given the layer's output"
            t = y if y.is_contiguous() else y.contiguous()
        flat = t.view(-1, t.shape[-1])
        entries = self.indices.get(flat.shape[0])
        vectors = self.buffer.parts[0]
        if self.terms is not None:
            rows, slots, weights = self.terms
            assert self.fills is not None, "terms come with their fills"
            factors = self.fills[:, None].expand(-1, vectors.shape[1]).contiguous()
            self.ops.gather_add(factors, vectors, rows, slots, weights)
            self.ops.gather_mul(flat, factors, *entries[-1])
            entries = entries[:-1]
        for rows, slots in entries:
            self.ops.gather_mul(flat, vectors, rows, slots)
        return t


def _scale_op(stage: Stage, uses: list[Use[IA3Site]], site: str, batch: BatchInfo, made: dict[tuple, Indices]) -> ScaleOp:
    """The op for `uses` of one direction at `site`: stacked weight-1 uses read their slot directly, every other
    row's uses go into computed factors (one per weighted stacked use, one per average row)."""
    direct: list[Use[IA3Site]] = []
    factors: dict[tuple[int, int], list[Use[IA3Site]]] = {}  # (row, n): an average row's one factor, a stacked use's own
    for n, use in enumerate(uses):
        if batch.mode[use.row] == "average":
            factors.setdefault((use.row, -1), []).append(use)
        elif use.weight == 1.0:
            direct.append(use)
        else:
            factors[(use.row, n)] = [use]
    fills = terms = factor_rows = None
    if factors:
        device = batch.device
        fills = torch.tensor([1.0 - sum(u.weight for u in group) for group in factors.values()], device=device)
        entries = sorted((u.resident.sites[site].slot, f, u.weight)
                         for f, group in enumerate(factors.values()) for u in group)
        slots, rows, weights = zip(*entries)
        terms = (torch.tensor(rows, device=device), torch.tensor(slots, device=device),
                 torch.tensor(weights, device=device, dtype=torch.float32))
        factor_rows = torch.tensor([row for row, _ in factors], device=device)
    classes = slot_classes(direct, site, batch.device, made) if direct else []
    buffer = uses[0].resident.sites[site].buffer
    return ScaleOp(stage, batch.rows, buffer, [ix for _, ix in classes], fills, terms, factor_rows, batch.kernels)


class IA3(TechniqueImpl[IA3Site]):
    technique = Technique.IA3

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident[IA3Site]:
        check_fits(adapter, model)
        like = next(model.parameters())
        return place(key, self.technique, model,
                     {path: [(to_device(t, like)["ia3_l"].flatten(),)] for path, t in module_tensors(adapter).items()},
                     adapter.config, lambda path, s: IA3Site(s[0].buffer, s[0].slot, is_feedforward(adapter, path)))

    def compile_batch(self, site_uses: dict[str, list[Use[IA3Site]]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        made: dict[tuple, Indices] = {}
        ops: dict[str, list[SiteOp]] = {}
        for site, uses in site_uses.items():
            ops[site] = []
            for feedforward, stage in ((True, Stage.PRE), (False, Stage.POST)):
                # one adapter may scale this module's input, another its output: each where it belongs
                mine = [u for u in uses if u.resident.sites[site].feedforward == feedforward]
                if mine:
                    ops[site].append(_scale_op(stage, mine, site, batch, made))
        return ops
