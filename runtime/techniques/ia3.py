"""IA3: per-row scaling vectors. Attention modules scale their OUTPUT, feed-forward modules
(PEFT's `feedforward_modules`) their INPUT, exactly as PEFT does.

Composition of a row's IA3 adapters (l_i its vector, w_i its weight after the mode's rule):
- stack:   s = prod_i (1 + w_i (l_i - 1))  -- scalings multiply; weight 1 applies l_i fully, 0 not at all;
- average: s = 1 + sum_i w_i (l_i - 1)     -- with weights summing to 1 this is sum_i w_i l_i, the
           weighted mean of the adapters' outputs (AdapterHub Average).
IA3 scales the module with the row's LoRA/BitFit deltas already merged (PRE before, POST after them).
Untouched rows get exact ones, so their output is bit-for-bit the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hub.artifact import Adapter, Technique
from hub.checkpoint import is_feedforward, check_fits, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, nbytes_of, to_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(eq=False)
class IA3Site:
    """An adapter's IA3 vector at one module, and whether it scales that module's input (PEFT's
    feedforward_modules) or its output."""

    feedforward: bool
    scale: torch.Tensor  # (dim,)


class _ScaleOp(SiteOp):
    def __init__(self, scale: torch.Tensor):
        self.scale = scale  # (rows, dim)

    def _apply(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale.view(self.scale.shape[0], *([1] * (t.dim() - 2)), self.scale.shape[1])


class ScaleInput(_ScaleOp):
    stage = Stage.PRE

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self._apply(x)


class ScaleOutput(_ScaleOp):
    stage = Stage.POST

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a POST op is given the layer's output"
        return self._apply(y)


def row_scales(uses: list[Use], batch: BatchInfo, site: str) -> torch.Tensor:
    """(rows, dim) scaling per row by the composition rule above."""
    first = uses[0].resident.sites[site].scale
    scale = torch.ones(batch.rows, first.numel(), device=first.device, dtype=first.dtype)
    for use in uses:
        term = use.weight * (use.resident.sites[site].scale - 1)
        if batch.mode[use.row] == "average":
            scale[use.row] += term
        else:
            scale[use.row] *= 1 + term
    return scale


class IA3(TechniqueImpl):
    technique = Technique.IA3

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident:
        check_fits(adapter, model)
        like = next(model.parameters())
        sites = {path: IA3Site(is_feedforward(adapter, path), to_device(t, like)["ia3_l"].flatten())
                 for path, t in module_tensors(adapter).items()}
        return Resident(key, self.technique, sites, nbytes_of(s.scale for s in sites.values()), adapter.config)

    def compile(self, site: str, uses: list[Use], batch: BatchInfo) -> list[SiteOp]:
        feedforward = uses[0].resident.sites[site].feedforward
        mixed = [u for u in uses if u.resident.sites[site].feedforward != feedforward]
        if mixed:
            # one adapter scales this module's input, another its output: apply each where it belongs
            same = [u for u in uses if u.resident.sites[site].feedforward == feedforward]
            return self.compile(site, same, batch) + self.compile(site, mixed, batch)
        scale = row_scales(uses, batch, site)
        return [ScaleInput(scale) if feedforward else ScaleOutput(scale)]
