"""Plans: what each row of a batch applies, and their resolution into per-technique uses.

A plan is plain data from the request (adapter keys + weights + mode); `resolve` turns the batch's
plans into `Use`s against the resident adapters, applying the mode's weight rule once, here:
- "stack":   every adapter applies with its own weight (AdapterHub Stack);
- "average": weights are normalised to sum to 1 (AdapterHub Average; equal weights by default).
How each technique combines its weighted uses is the technique's rule (runtime/techniques/*).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.techniques.base import Resident, Use

MODES = ("stack", "average")


class PlanError(ValueError):
    """A plan that cannot be served: unknown adapter key, bad weight or mode, or an unservable mix."""


@dataclass(frozen=True)
class AdapterUse:
    """One adapter in one row's stack."""

    key: str  # the resident-adapter key (the server uses "name@version")
    weight: float = 1.0


@dataclass(frozen=True)
class RowPlan:
    """What one row applies; empty = the base model exactly."""

    adapters: tuple[AdapterUse, ...] = ()
    mode: str = "stack"  # "stack" | "average"



def row_weights(plan: RowPlan) -> list[float]:
    """The weights a row's adapters apply with, after its mode's rule."""
    if plan.mode not in MODES:
        raise PlanError(f"unknown mode {plan.mode!r} (expected one of {', '.join(MODES)})")
    weights = [float(a.weight) for a in plan.adapters]
    if not all(math.isfinite(w) for w in weights):
        raise PlanError(f"adapter weights must be finite numbers, got {weights}")
    if plan.mode == "average" and weights:
        total = sum(weights)
        if total == 0:
            raise PlanError("average mode needs weights that do not sum to 0")
        weights = [w / total for w in weights]
    return weights


def resolve(plans: list[RowPlan], residents: dict[str, Resident]) -> list[list[Use]]:
    """Per row, its uses in stack order; PlanError names the first unknown key."""
    rows: list[list[Use]] = []
    for row, plan in enumerate(plans):
        uses = []
        for use, weight in zip(plan.adapters, row_weights(plan)):
            resident = residents.get(use.key)
            if resident is None:
                raise PlanError(f"adapter {use.key!r} is not loaded")
            uses.append(Use(row=row, resident=resident, weight=weight))
        rows.append(uses)
    return rows
