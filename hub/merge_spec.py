"""What a merge is asked to do: the method, its parameters, and their checks (no tensors, so the
`hub` commands and the server's request checks load without torch). The math is in hub/merge.py."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hub.artifact import ArtifactError, Technique


class MergeError(ArtifactError):
    """Adapters that cannot be merged (different bases, techniques, shapes) or invalid merge parameters."""


LORA_METHODS = (
    "linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)
METHODS: dict[Technique, tuple[str, ...]] = {
    Technique.LORA: LORA_METHODS,
    Technique.IA3: ("linear",),
    Technique.BITFIT: ("linear",),
    Technique.BOTTLENECK: ("linear",),
    Technique.PROMPT_TUNING: ("cat",),
}
MAJORITY_SIGNS = ("total", "frequency")


def method_family(method: str) -> str:
    """The task-tensor combination a method applies ("ties_svd" -> "ties", "svd" -> "linear")."""
    return "linear" if method == "svd" else method.removesuffix("_svd")


def uses_density(method: str) -> bool:
    return method_family(method) in ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def uses_sign(method: str) -> bool:
    return method_family(method) in ("ties", "dare_ties")


def _uses_seed(method: str) -> bool:
    return method_family(method).startswith("dare")


def uses_svd(method: str) -> bool:
    return method.endswith("svd")


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: the method and only the parameters it uses (others are refused, never ignored)."""

    method: str
    weights: tuple[float, ...] | None = None  # one per adapter; None = 1.0 each
    density: float | None = None  # ties / dare / magnitude_prune: fraction of entries kept, in (0, 1]
    majority_sign: str | None = None  # ties / dare_ties: "total" (default) or "frequency"
    svd_rank: int | None = None  # svd forms: rank of the result (default: the largest parent rank)
    svd_clamp: float | None = None  # svd forms: quantile at which PEFT clamps the factors
    seed: int | None = None  # dare forms: seed of the pruning masks (default 0)

    def checked(self, technique: Technique, count: int) -> CheckedMergeSpec:
        """This spec validated for `count` adapters of `technique`, with defaults filled in."""
        allowed = METHODS[technique]
        if self.method not in allowed:
            raise MergeError(f"method {self.method!r} does not apply to {technique.value} adapters "
                             f"(use: {', '.join(allowed)})")
        weights = tuple(float(w) for w in self.weights) if self.weights is not None else (1.0,) * count
        if len(weights) != count:
            raise MergeError(f"{len(weights)} weights given for {count} adapters")
        if not all(math.isfinite(w) for w in weights):
            raise MergeError(f"weights must be finite numbers, got {list(weights)}")
        method = self.method
        for name, value, used in (
            ("density", self.density, uses_density(method)),
            ("majority_sign", self.majority_sign, uses_sign(method)),
            ("svd_rank", self.svd_rank, uses_svd(method)),
            ("svd_clamp", self.svd_clamp, uses_svd(method)),
            ("seed", self.seed, _uses_seed(method)),
        ):
            if value is not None and not used:
                raise MergeError(f"{name} does not apply to method {method!r}")
        density = self.density
        if uses_density(method) and (density is None or not 0.0 < density <= 1.0):
            raise MergeError(f"method {method!r} needs a density in (0, 1], got {density}")
        sign = self.majority_sign or ("total" if uses_sign(method) else None)
        if sign is not None and sign not in MAJORITY_SIGNS:
            raise MergeError(f"majority sign must be one of {', '.join(MAJORITY_SIGNS)}, got {sign!r}")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise MergeError(f"svd_rank must be >= 1, got {self.svd_rank}")
        if self.svd_clamp is not None and not 0.0 < self.svd_clamp <= 1.0:
            raise MergeError(f"svd_clamp is a quantile in (0, 1], got {self.svd_clamp}")
        seed = self.seed if self.seed is not None else (0 if _uses_seed(method) else None)
        return CheckedMergeSpec(method, weights, density, sign, self.svd_rank, self.svd_clamp, seed)

    def params(self) -> dict[str, Any]:
        """The parameters that determine the result, for lineage records and cache keys (unset ones omitted)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CheckedMergeSpec(MergeSpec):
    """A MergeSpec as `MergeSpec.checked` returns it, what the merge math takes: one weight per adapter, the
    density its method needs, the default majority sign and seed filled in."""

    weights: tuple[float, ...] = ()
