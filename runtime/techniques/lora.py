"""LoRA: y += w * scaling * B(A x) per row, many adapters (mixed ranks) in one forward, read in place.

Each resident adapter's A and scaled B^T live in slot buffers per site and rank (runtime/techniques/slots.py),
copied there once when it is prepared. A batch compiles, per site and rank class, three small tensors over
all its rows: which row, which slot, which weight (one entry per adapter a row stacks, its weight resolved
by the row's mode). The op then runs the kernel seam's `lora_shrink` / `lora_expand` over them
(runtime/kernels), so a batch change (join, leave, cancel) rebuilds index tensors and moves no adapter
bytes. Rows without an adapter at a site are in no entry: the kernels never read a slot for them (so a NaN
adapter cannot reach them) and leave them bit for bit unchanged. On a CPU a bf16/fp16 base keeps its LoRA
weights in float32 (`Lora.weights_dtype`); the kernels accumulate in float32 and round once into the output.
A `lora_bias` (scaling folded in) lives in a vector slot of the site in the model's dtype, as PEFT keeps it,
and the same op adds it with `gather_add` over its own (row, slot, weight) entries.
Why each choice: docs/engine.md, "Slots".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, lora_rank_alpha, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, to_device
from runtime.techniques.slots import Indices, Padding, PerToken, Scaled, Slot, SlotBuffer, place, slot_classes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(eq=False)
class LoraSite(Slot):
    """The adapter's slot in the site's buffer for its rank (A, scaled B^T), and its `lora_bias`'s slot."""

    bias: Slot | None  # a vector slot [out] in the model's dtype, scaling folded in

    @property
    def rank(self) -> int:
        return self.buffer.parts[0].shape[1]


def scaling(config: dict, path: str) -> tuple[int, float]:
    """(rank, scaling) PEFT uses for the module at `path`."""
    r, alpha = lora_rank_alpha(config, path)
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


class LoraSlotsOp(SiteOp):
    """One site's LoRA over a whole batch: per rank class, the kernels over (row, slot, weight) entries; then
    `gather_add` of the `lora_bias` slots (per vector buffer) over theirs."""

    stage = Stage.DELTA

    def __init__(self, rows: int, classes: list[tuple[SlotBuffer, Indices]],
                 biases: list[tuple[SlotBuffer, Indices]], ops: ModuleType):
        self.ops = ops  # the kernel seam's backend (runtime/kernels): called directly, once per rank class
        self.classes = classes
        self.biases = [buffer for buffer, _ in biases]
        self.indices = PerToken(rows, [ix for _, ix in classes] + [ix for _, ix in biases])

    def padded(self, padding: Padding) -> LoraSlotsOp:
        entries = padding.slot_uses(self.indices.get(self.indices.rows))
        classes = [(buffer, ix) for (buffer, _), ix in zip(self.classes, entries)]
        biases = [(buffer, ix) for buffer, ix in zip(self.biases, entries[len(self.classes):])]
        return LoraSlotsOp(padding.to, classes, biases, self.ops)  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a DELTA op is given the layer's output"
        if not y.is_contiguous():
            y = y.contiguous()
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        entries = self.indices.get(flat_x.shape[0])
        for (buffer, _), (rows, slots, scale) in zip(self.classes, entries):
            a, b_t = buffer.parts
            self.ops.lora(flat_x, flat_y, a, b_t.transpose(1, 2), rows, slots, scale)
        for buffer, (rows, slots, scale) in zip(self.biases, entries[len(self.classes):]):
            self.ops.gather_add(flat_y, buffer.parts[0], rows, slots, scale)
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
        # per site: A [r, in] and scaled B^T [r, out] in one slot; a lora_bias (in the model's dtype, which the
        # weights' may not be) in a vector slot of its own
        prepared: dict[str, list[tuple[torch.Tensor | Scaled, ...]]] = {}
        for path, t in module_tensors(adapter).items():
            if "lora_A" not in t:
                raise ArtifactError(f"module {path!r}: LoRA on embeddings is not served")
            _, scale = scaling(adapter.config, path)  # check_fits has checked the rank against the tensors
            t = to_device(t, like, weights_dtype, contiguous=False)  # place copies them
            prepared[path] = [(t["lora_A"], Scaled(t["lora_B"].t(), scale))]
            if "lora_bias" in t:
                prepared[path].append(((t["lora_bias"] * scale).to(model_dtype),))
        return place(key, self.technique, model, prepared, adapter.config,
                     lambda path, slots: LoraSite(slots[0].buffer, slots[0].slot, slots[1] if len(slots) > 1 else None))

    def compile_batch(self, site_uses: dict[str, list[Use[LoraSite]]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        made: dict[tuple, Indices] = {}  # equal entries (every layer's q_proj, say) share their tensors
        ops: dict[str, list[SiteOp]] = {}
        for site, uses in site_uses.items():
            with_bias = [u for u in uses if u.resident.sites[site].bias is not None]
            biases = slot_classes(with_bias, site, batch.device, made, _bias_slot(site)) if with_bias else []
            ops[site] = [LoraSlotsOp(batch.rows, slot_classes(uses, site, batch.device, made), biases,
                                     batch.kernels)]
        return ops


def _bias_slot(site: str) -> Callable[[Use[LoraSite]], Slot]:
    """The `lora_bias` slot of a use at `site` (only asked of uses with one)."""
    def slot_of(use: Use[LoraSite]) -> Slot:
        bias = use.resident.sites[site].bias
        assert bias is not None, "asked only of uses with a lora_bias"
        return bias
    return slot_of
