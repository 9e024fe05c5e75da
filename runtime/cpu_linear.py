"""Float32 linear layers on a CPU through oneDNN, the base model's largest cost on a CPU.

PyTorch computes a float32 `nn.Linear` on a CPU with MKL's sgemm; oneDNN's matmul on the same dense
weight (no copy, no reorder: the weights stay the model's own tensors) measured 20-35 % faster at the
shapes a decode step and a prefill of SmolLM2 use on this project's CPUs (AVX-512), and 2x on the
49k-row vocabulary head (most likely MKL packs the weight on every call). Development measurements;
README has the `make bench` figures. bfloat16/float16 linears already run on oneDNN in PyTorch, and
other devices have their own libraries: only float32 on a CPU is routed. Results differ from MKL's by
accumulation order only (about 1e-6 relative).
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
