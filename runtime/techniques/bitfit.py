"""BitFit: per-row bias deltas, y += sum_i w_i b_i (stack adds; average uses normalised weights).

Served as a delta beside the base module's own bias, so modules without a bias work the same.
"""
from __future__ import annotations

from typing import TYPE_CHECKING


from hub.artifact import Adapter, Technique
from hub.checkpoint import check_fits, module_tensors
from runtime.techniques.base import (BatchInfo, Resident, RowBiasOp, SiteOp, TechniqueImpl, Use, nbytes_of,
                                     row_vectors, to_device)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BitFit(TechniqueImpl):
    technique = Technique.BITFIT

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident:
        check_fits(adapter, model)
        like = next(model.parameters())
        sites = {path: to_device(t, like)["bias"].flatten() for path, t in module_tensors(adapter).items()}
        return Resident(key, self.technique, sites, nbytes_of(sites.values()), adapter.config)

    def compile(self, site: str, uses: list[Use], batch: BatchInfo) -> list[SiteOp]:
        return [RowBiasOp(row_vectors(uses, batch, lambda u: u.resident.sites[site]))]
