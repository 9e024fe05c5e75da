"""The interface every technique implements (like PEFT's tuners/<method>/), and the op it compiles.

The engine never knows a technique's math. It wraps the base model's modules ("sites"), and per
batch asks each technique present in it to compile all rows' uses of its adapters at each site into
`SiteOp`s (`compile_batch`): index tensors into the slot buffers the adapters live in
(runtime/techniques/slots.py), read in place by the kernel seam (runtime/kernels). The wrapped module then
runs, for the rows of each forward of that batch:

    x = op(x)       for PRE ops    (e.g. IA3 on feed-forward modules: scale the input)
    y = base(x)
    y = op(x, y)    for DELTA ops  (LoRA with its lora_bias, BitFit: add a per-row delta)
    y = op(x, y)    for POST ops   (IA3 on attention modules: scale the output; bottleneck layers)

PRE ops see only x and return the new x; DELTA and POST ops return the new y. Rows a technique does
not touch must come out bit-for-bit unchanged (add exact zeros, multiply by exact ones, or skip them).

To add a technique: subclass `TechniqueImpl` in runtime/techniques/<name>.py and list an instance in
`runtime/techniques/__init__.py::REGISTRY`. Nothing else in the engine changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, TypeVar

import torch
from torch import nn

from hub.artifact import Adapter, Technique

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from runtime.techniques.slots import Padding


class Stage(IntEnum):
    PRE = 0
    DELTA = 1
    POST = 2


SiteT = TypeVar("SiteT")  # what a technique prepares at one site: the type its TechniqueImpl names


@dataclass
class Resident(Generic[SiteT]):
    """One loaded adapter, prepared by its technique and living on the model's device."""

    key: str
    technique: Technique
    # site (module path) -> the technique's prepared payload there: lora.LoraSite, ia3.IA3Site, a BitFit
    # slots.Slot, a bottleneck Tap or BlockSlot (prompt tuning has no sites)
    sites: dict[str, SiteT]
    nbytes: int
    config: dict[str, Any] = field(default_factory=dict)
    prompt: torch.Tensor | None = None  # soft prompt (tokens, hidden): prompt tuning only
    free: Callable[[], Any] | None = None  # gives back its slots, once unloaded or replaced


@dataclass(frozen=True)
class Use(Generic[SiteT]):
    """One adapter applied to one row, with the weight the row's mode has already resolved."""

    row: int
    resident: Resident[SiteT]
    weight: float


@dataclass(frozen=True)
class BatchInfo:
    """What a compile step may need to know about the whole batch."""

    rows: int
    mode: tuple[str, ...]  # per row: "stack" | "average"
    device: torch.device
    dtype: torch.dtype
    kernels: ModuleType  # the kernel seam's backend for `device` (runtime/kernels): the ops call it directly


class SiteOp(ABC):
    """A technique's compiled work at one site for one batch; built once per batch change, reused every step."""

    stage: Stage  # set per class, or per instance where one op class serves two stages (IA3's ScaleOp)

    @abstractmethod
    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """PRE: return the new input (y is None). DELTA/POST: return the new output."""

    def padded(self, padding: Padding) -> SiteOp | None:
        """This op over the batch padded as `padding` says, its index tensors new and of bucketed lengths (a
        graphed decode step: runtime/graphs.py); None where the op cannot be padded (the step then runs
        eagerly). May raise slots.NoRoom: a padded use needs a padding row and the batch fills its bucket."""
        return None


class TechniqueImpl(ABC, Generic[SiteT]):
    """How one technique loads its adapters and serves many of them per batch; SiteT is what it prepares at a
    site. The engine holds residents of every technique (Resident[Any]) and hands each technique only its own."""

    technique: ClassVar[Technique]

    @abstractmethod
    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident[SiteT]:
        """Validate the adapter against the model (hub.checkpoint.check_fits) and move it to the device."""

    def weights_dtype(self, model: nn.Module) -> torch.dtype:
        """The dtype `load` keeps this technique's float tensors in on `model` (memory budgets count it)."""
        return next(model.parameters()).dtype

    def compile_batch(self, site_uses: dict[str, list[Use[SiteT]]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        """The ops over the whole batch's rows at once, per site (`site_uses`: all rows' uses of this technique
        that touch the site, in row and stack order). They only index slot buffers, so a batch change costs
        small index tensors, never copies. Default: none (prompt tuning: the engine places soft prompts)."""
        return {}

    def check_plan(self, uses_of_row: list[Use[SiteT]], mode: str) -> None:
        """Raise ValueError when a row's combination of this technique's adapters cannot be served."""


def to_device(tensors: dict[str, torch.Tensor], like: torch.Tensor, dtype: torch.dtype | None = None,
              contiguous: bool = True) -> dict[str, torch.Tensor]:
    """Tensors on the device of `like` (a base parameter, looked up once per load), in `dtype` (default:
    the base's; adapters compute in it), contiguous unless the caller only copies them (a copy takes any
    layout). One already so is passed as it is, without a call: a load has hundreds of small tensors."""
    dtype = dtype or like.dtype

    def moved(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != dtype or t.device != like.device:
            t = t.to(device=like.device, dtype=dtype)
        return t.contiguous() if contiguous else t

    return {k: moved(t) for k, t in tensors.items()}


def nbytes_of(tensors) -> int:
    return sum(int(t.numel()) * t.element_size() for t in tensors)

