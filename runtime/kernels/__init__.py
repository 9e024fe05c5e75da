"""The kernel seam: the four ops the techniques apply adapters with, reading each adapter in place from
a slot buffer, dispatched to a backend by device.

Every op takes "uses": parallel 1-D int64 tensors `rows` (index into the token rows of x/y: for decode one
token per sequence, for prefill every token position flattened) and `slots` (index into the slot buffer,
dim 0 of a/b/v), and where it scales, a float `scale` of the same length. A row may appear in several uses
(stacked adapters); rows in no use are never read from a slot and come out bit for bit unchanged, whatever
the unused slots hold (NaN, inf). Callers give uses sorted by (slot, row) where they can: a run of one slot
is rows that share its weights, which the fused CPU backend computes several at a time from one read of them,
each row's sums in the order they take when it runs alone (a row's result never depends on its neighbours).

- `lora_shrink(x [T, d_in], a [S, r, d_in], rows, slots) -> h [U, r]` float32: h[u] = a[slots[u]] @ x[rows[u]].
- `lora_expand(y [T, d_out], h [U, r], b [S, d_out, r], rows, slots, scale)`, in place:
  y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), summed over u.
- `lora(x, y, a, b, rows, slots, scale)`, in place: both of the above in one call (h never leaves the backend).
- `gather_add(y [T, d], v [S, d], rows, slots, scale)`, in place: y[rows[u]] += scale[u] * v[slots[u]].
- `gather_mul(y [T, d], v [S, d], rows, slots)`, in place: y[rows[u]] *= v[slots[u]] (a row in several uses
  takes the product).

Layout: any strides work; the fast one for `b` is a transposed view of [S, r, d_out] storage
(`b_storage.transpose(1, 2)`, as the LoRA technique keeps B^T today): the fused CPU kernel then adds r
contiguous columns per use, and the Triton kernel reads them coalesced. Row-major [S, d_out, r] costs a dot of
length r per output (several times slower on a CPU).

x/y and the slot buffers may be float32, bfloat16 or float16, independently (a half-precision model with
float32 slots is fine); products accumulate in float32 and round once into y's dtype. Mixed ranks go in
separate calls (one slot buffer per rank class). Semantics: `reference.py`; design: docs/engine.md.

The functions here check their arguments and dispatch per call, for any caller. The engine takes the backend
once per batch change (`backend(device)`, handed to the techniques in `BatchInfo.kernels`) and the techniques'
ops call it directly: a decode step makes a few hundred such calls, and the checks and the dispatch, run with
caches that the base's weights have just flushed, cost about as much as the arithmetic of a one-adapter call.
That skips no safety check: the index tensors and slot shapes are the engine's own (an adapter's shapes are
checked when it loads), and the fused CPU ops check shapes and index ranges again in C++ before they read.

Backends, chosen by the tensors' device and `HUB_KERNELS`: `auto` (default) takes the fused C++
kernels on a CPU (`cpu.py`, built at first use; the reference if they cannot be built) and the reference on
other devices; `reference` forces the torch ops everywhere; `cpu` names the fused CPU backend and `triton` the
Triton kernels for CUDA tensors (`triton_ops.py`; the reference where triton is not installed). `auto` takes
Triton on CUDA once a GPU run has checked it (bench/cuda_checks.sh); until then it is opt-in.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from runtime.kernels import reference

CHOICES = ("auto", "reference", "cpu", "triton")


def backend(device: torch.device | str) -> ModuleType:
    """The module whose ops run tensors on `device` under the current `HUB_KERNELS`."""
    choice = os.environ.get("HUB_KERNELS", "auto")
    if choice not in CHOICES:
        raise ValueError(f"kernels: HUB_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}")
    kind = torch.device(device).type
    if kind == "cpu" and choice in ("auto", "cpu"):
        from runtime.kernels import cpu
        return cpu.load() or reference
    if kind == "cuda" and choice == "triton":
        from runtime.kernels import triton_ops
        return triton_ops if triton_ops.available() else reference
    return reference


def _check(y: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """One clear error for malformed uses (the backends index with them)."""
    if y.dim() != 2:
        raise ValueError(f"kernels: expected a 2-D [tokens, features] tensor, got shape {tuple(y.shape)}")
    if rows.dim() != 1 or rows.shape != slots.shape or (scale is not None and scale.shape != rows.shape):
        got = [tuple(t.shape) for t in (rows, slots, scale) if t is not None]
        raise ValueError(f"kernels: rows, slots (and scale) must be 1-D of one length, got {got}")
    if rows.dtype != torch.int64 or slots.dtype != torch.int64:
        raise ValueError(f"kernels: rows and slots must be int64, got {rows.dtype} and {slots.dtype}")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """h[u] = a[slots[u]] @ x[rows[u]] as float32 [U, r]."""
    _check(x, rows, slots)
    if a.dim() != 3 or a.shape[2] != x.shape[1]:
        raise ValueError(f"kernels: a must be [slots, r, {x.shape[1]}], got {tuple(a.shape)}")
    return backend(x.device).lora_shrink(x, a, rows, slots)


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), in place."""
    _check(y, rows, slots, scale)
    if b.dim() != 3 or b.shape[1] != y.shape[1] or h.shape != (rows.shape[0], b.shape[2]):
        raise ValueError(f"kernels: expected h [{rows.shape[0]}, r] and b [slots, {y.shape[1]}, r], "
                         f"got {tuple(h.shape)} and {tuple(b.shape)}")
    backend(y.device).lora_expand(y, h, b, rows, slots, scale)


def lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
         scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * (b[slots[u]] @ (a[slots[u]] @ x[rows[u]])), in place."""
    _check(y, rows, slots, scale)
    _check(x, rows, slots)
    if a.dim() != 3 or a.shape[2] != x.shape[1] or b.dim() != 3 or b.shape[1] != y.shape[1] or b.shape[2] != a.shape[1]:
        raise ValueError(f"kernels: expected a [slots, r, {x.shape[1]}] and b [slots, {y.shape[1]}, r], "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    backend(y.device).lora(x, y, a, b, rows, slots, scale)


def gather_add(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * v[slots[u]], in place."""
    _check(y, rows, slots, scale)
    _check_vectors(y, v)
    backend(y.device).gather_add(y, v, rows, slots, scale)


def gather_mul(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """y[rows[u]] *= v[slots[u]], in place."""
    _check(y, rows, slots)
    _check_vectors(y, v)
    backend(y.device).gather_mul(y, v, rows, slots)


def _check_vectors(y: torch.Tensor, v: torch.Tensor) -> None:
    if v.dim() != 2 or v.shape[1] != y.shape[1]:
        raise ValueError(f"kernels: v must be [slots, {y.shape[1]}], got {tuple(v.shape)}")


def indices_changed(rows: torch.Tensor) -> None:
    """`rows` (an index tensor the ops were given before) now holds other values, written in place: a backend that
    derived something from it (the Triton kernels' per-row grouping) recomputes that, in place too."""
    from runtime.kernels import triton_ops

    triton_ops.regroup(rows)


def backend_name(device: torch.device | str) -> str:
    """The backend the ops take for tensors on `device` (for logs and metrics)."""
    chosen = backend(device)
    if chosen is reference:
        return "reference"
    return "triton" if chosen.__name__ == "runtime.kernels.triton_ops" else "cpu"
