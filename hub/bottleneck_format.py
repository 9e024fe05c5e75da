"""Our bottleneck-adapter format: its config, its locations and the non-linearities it names.

Why a format of our own: PEFT has no bottleneck adapters, and the `adapters` library's files name
modules by its own wrapper layers and need that library (and transformers 4.x) to be read back
(hub/adapterhub_import.py converts them). Ours is plain: the artifact's two usual files,

- `adapter_config.json`: `{"adapter_type": "bottleneck", "locations": [...], "parallel": bool,
  "non_linearity": str, "scaling": float, "original_ln_before": bool, "original_ln_after": bool,
  "residual_before_ln": bool, "hidden_size": int, "bottleneck_size": int | {layer: int}, "source": {...}}`;
  only `locations` and `non_linearity` are required, the rest default as listed in `BottleneckConfig`
- `adapter_model.safetensors`: `model.layers.<i>.<location>_adapter.{down,up}.{weight,bias}` with
  location "attention" (after the attention block) or "ffn" (after the feed-forward block);
  down.weight (b, hidden), down.bias (b,), up.weight (hidden, b), up.bias (hidden,). A layer may
  lack an adapter (AdapterHub's `leave_out`).

The option names and their math are the `adapters` library's (methods/modeling.py `Adapter`,
`ParallelAdapter`) for pre-norm decoders (Llama, Mistral), where it passes no LayerNorm to the
adapter layer; runtime/techniques/bottleneck.py computes it, hub/train.py trains it and hub/merge.py
merges it. Options that change the math in ways we do not implement are refused, by name, so no
weight is ever silently dropped.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hub.artifact import ArtifactError

LOCATIONS = ("attention", "ffn")  # the places hub/architectures.py BOTTLENECK_SITES names modules for


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation (the tanh approximation, as written there)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# The non-linearities as the `adapters` library computes them (transformers' ACT2FN, plus its own
# "leakyrelu"); names are lower case, as that library lowers them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leakyrelu": F.leaky_relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "linear": lambda x: x,
}


@dataclass(frozen=True)
class BottleneckConfig:
    """Our bottleneck config (see the module docstring); `from_dict` validates a saved one."""

    locations: tuple[str, ...]
    non_linearity: str
    hidden_size: int | None = None  # optional: the tensors' shapes say it too (checked against the base)
    bottleneck_size: int | dict[str, int] | None = None  # optional, informative; {layer: size} when it varies
    parallel: bool = False
    scaling: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": "bottleneck", **asdict(self), "locations": list(self.locations)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BottleneckConfig:
        config = dict(config)
        if config.pop("adapter_type", None) != "bottleneck":
            raise ArtifactError("not a bottleneck config (adapter_type must be 'bottleneck')")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ArtifactError(f"bottleneck config: unknown option(s) {', '.join(unknown)} (not served)")
        missing = sorted(k for k in ("locations", "non_linearity") if k not in config)
        if missing:
            raise ArtifactError(f"bottleneck config: missing {', '.join(missing)}")
        locations = config["locations"]
        if not isinstance(locations, list) or not locations or any(loc not in LOCATIONS for loc in locations) \
                or len(set(locations)) != len(locations):
            raise ArtifactError(f"bottleneck config: locations must be a non-empty list of {LOCATIONS}, "
                                f"got {locations!r}")
        config["locations"] = tuple(locations)
        check_non_linearity(config["non_linearity"])
        for key in ("parallel", "original_ln_before", "original_ln_after", "residual_before_ln"):
            if key in config and not isinstance(config[key], bool):
                raise ArtifactError(f"bottleneck config: {key} must be true or false, got {config[key]!r}")
        check_scaling(config.get("scaling", 1.0))
        config["scaling"] = float(config.get("scaling", 1.0))
        size = config.get("bottleneck_size")
        if size is not None and not (positive_int(size) or isinstance(size, dict) and all(
                isinstance(k, str) and positive_int(v) for k, v in size.items())):
            raise ArtifactError(f"bottleneck config: bottleneck_size must be a positive integer or "
                                f"{{layer: size}}, got {size!r}")
        hidden = config.get("hidden_size")
        if hidden is not None and not positive_int(hidden):
            raise ArtifactError(f"bottleneck config: hidden_size must be a positive integer, got {hidden!r}")
        return cls(**config)


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_non_linearity(name: Any) -> str:
    """The name of a non-linearity the runtime computes (names are lower case); ArtifactError for any other."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS or name != name.lower():
        raise ArtifactError(f"bottleneck non_linearity {name!r} is not served "
                            f"(served: {', '.join(ACTIVATIONS)})")
    return name


def check_scaling(value: Any) -> None:
    """Refuse a scaling other than a constant number (the `adapters` library also has learned ones)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArtifactError(f"bottleneck scaling {value!r} is not served (only a constant number; "
                            "'learned' and 'channel' scalings are not)")
