"""The reference ops in plain torch: the semantics every backend is tested against, and the path on devices
without a fused backend (CUDA for now) or when the CPU kernels cannot be built.

Each use's weights are gathered with `index_select` and applied with one batched matmul while the gathered
copy stays small (decode); past `GATHER_ELEMENTS` the uses go by runs of one slot, one matmul per run
(prefill), so memory stays bounded by the activations, never uses x weights. Deltas are computed in float32
and added into y with `index_add_` (rows in no use are never touched).
"""
from __future__ import annotations

import warnings

import torch

# index_reduce_ (gather_mul's product over a row's uses) warns once per process that its API is in beta.
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

GATHER_ELEMENTS = 1 << 23  # weight elements one call may gather (32 MB in float32) before going by runs


def _runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, slot) of each run of equal consecutive slots."""
    values, counts = torch.unique_consecutive(slots, return_counts=True)
    out, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist()):
        out.append((start, start + count, value))
        start += count
    return out


def _products(inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """out[u] = weights[slots[u]] @ inputs[u] in float32; inputs [U, k], weights [S, n, k] -> [U, n]."""
    uses, n = slots.shape[0], weights.shape[1]
    if uses * n * weights.shape[2] <= GATHER_ELEMENTS:
        return torch.bmm(weights.index_select(0, slots).float(), inputs.float().unsqueeze(-1)).squeeze(-1)
    out = inputs.new_empty((uses, n), dtype=torch.float32)
    for start, end, slot in _runs(slots):
        torch.mm(inputs[start:end].float(), weights[slot].float().t(), out=out[start:end])
    return out


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """h[u] = a[slots[u]] @ x[rows[u]], float32 [U, r]."""
    return _products(x.index_select(0, rows), a, slots)


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), in place."""
    delta = _products(h, b, slots).mul_(scale.float().unsqueeze(1))
    y.index_add_(0, rows, delta.to(y.dtype))


def lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
         scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * (b[slots[u]] @ (a[slots[u]] @ x[rows[u]])), in place: shrink, then expand."""
    lora_expand(y, lora_shrink(x, a, rows, slots), b, rows, slots, scale)


def gather_add(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * v[slots[u]], in place."""
    delta = v.index_select(0, slots).float().mul_(scale.float().unsqueeze(1))
    y.index_add_(0, rows, delta.to(y.dtype))


def gather_mul(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """y[rows[u]] *= v[slots[u]], in place (a row in several uses takes the product)."""
    y.index_reduce_(0, rows, v.index_select(0, slots).to(y.dtype), "prod")
