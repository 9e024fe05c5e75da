"""Float32 linear layers on a CPU through oneDNN, the base model's largest cost on a CPU.

oneDNN's matmul on the model's own dense weight (no copy, no reorder) is faster than PyTorch's default MKL
sgemm at the shapes a small decoder uses, most of all on the vocabulary head. Only float32 on a CPU is
routed: bf16/fp16 linears already run on oneDNN, other devices have their own libraries. Results differ
from MKL's by accumulation order only. Details: docs/engine.md; figures: docs/benchmarks.md.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def available() -> bool:
    """Whether this torch build has the oneDNN matmul (CPU builds for x86 and ARM do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Linear):
    """An `nn.Linear` whose float32 CPU forward runs on oneDNN; any other input takes `F.linear`, so a
    model moved to another device or dtype after routing still computes correctly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def route_linears(model: nn.Module) -> int:
    """Make the model's float32 CPU `nn.Linear` layers `OneDnnLinear`s in place (same parameters, same
    state dict); returns how many. Subclasses of nn.Linear (quantized layers, for one) keep their own
    forward; PEFT's LoRA layers are not nn.Linear, and the base layers inside them are routed."""
    if not available():
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = OneDnnLinear
            routed += 1
    return routed
