"""The Triton backend for CUDA: the seam's four ops (semantics in `runtime/kernels/__init__.py`) as Triton
kernels that read each use's adapter in place from its slot buffer.

Shrink runs one program per (use, block of rank rows). Expand and the gathers run one program per (token row,
block of columns) over the uses of that row, found by binary search in the uses sorted by row: a row in no
use stores nothing, a row in several sums (or multiplies) them in float32 and is rounded into y once, and no
two programs write one element (no atomics). The grids depend on the tensors' shapes only and nothing is
read back to the host, so a launch can be captured in a CUDA graph. Mixed ranks go in one call per rank class
(the seam's rule), each with its own block size. Triton is optional (`pip install '.[cuda]'`); on a CPU the
kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is imported), which is
how the tests check them without a GPU.
"""
from __future__ import annotations

import importlib.util

import torch

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the seam never picks this backend without triton
    triton = None


def available() -> bool:
    """Whether the kernels can run on CUDA tensors here."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:
    @triton.jit
    def _shrink(x, a, h, rows, slots, d, r, sx0, sx1, sa0, sa1, sa2,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        use = tl.program_id(0)
        ks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row = tl.load(rows + use)
        slot = tl.load(slots + use)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            ds = start + tl.arange(0, BLOCK_D)
            xs = tl.load(x + row * sx0 + ds * sx1, mask=ds < d, other=0.0).to(tl.float32)
            w = tl.load(a + slot * sa0 + ks[:, None] * sa1 + ds[None, :] * sa2,
                        mask=(ks[:, None] < r) & (ds[None, :] < d), other=0.0).to(tl.float32)
            acc += tl.sum(w * xs[None, :], axis=1)
        tl.store(h + use * r + ks, acc, mask=ks < r)

    @triton.jit
    def _expand(y, hs, b, starts, order, slots, scale, n, r, sy0, sy1, sh0, sh1, sb0, sb1, sb2,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_R)
        first = tl.load(starts + row)
        last = tl.load(starts + row + 1)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(first, last):
            use = tl.load(order + i)
            slot = tl.load(slots + use)
            hv = tl.load(hs + use * sh0 + ks * sh1, mask=ks < r, other=0.0).to(tl.float32)
            w = tl.load(b + slot * sb0 + cols[:, None] * sb1 + ks[None, :] * sb2,
                        mask=(cols[:, None] < n) & (ks[None, :] < r), other=0.0).to(tl.float32)
            acc += tl.load(scale + use) * tl.sum(w * hv[None, :], axis=1)
        mask = (cols < n) & (last > first)
        out = y + row * sy0 + cols * sy1
        tl.store(out, (tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc).to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather(y, v, starts, order, slots, scale, n, sy0, sy1, sv0, sv1,
                MULTIPLY: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        first = tl.load(starts + row)
        last = tl.load(starts + row + 1)
        if MULTIPLY:
            acc = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(first, last):
            use = tl.load(order + i)
            vals = tl.load(v + tl.load(slots + use) * sv0 + cols * sv1, mask=cols < n, other=0.0).to(tl.float32)
            if MULTIPLY:
                acc *= vals
            else:
                acc += tl.load(scale + use) * vals
        mask = (cols < n) & (last > first)
        out = y + row * sy0 + cols * sy1
        old = tl.load(out, mask=mask, other=0.0).to(tl.float32)
        if MULTIPLY:
            new = old * acc
        else:
            new = old + acc
        tl.store(out, new.to(y.dtype.element_ty), mask=mask)


BLOCK_N = 128  # output columns per program in expand and the gathers
BLOCK_D = 128  # input features per loop step in shrink


def _by_row(rows: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts [tokens + 1], order): the uses of token row t are order[starts[t]:starts[t + 1]], in their given
    order. Sorting and searching on the device: nothing is read back to the host. Kept on the `rows` tensor
    itself (the seam never changes its index tensors; an engine's are inference tensors, which have no version
counter to tell a change by): a batch's index tensors stay the same from step to step, and those launches
    would otherwise be most of a small step's kernels; kept there, they live as long as what reads them (a
    captured graph holds the ops that hold `rows`)."""
    cached = getattr(rows, "_hub_by_row", None)
    if cached is not None and cached[0] == tokens:
        return cached[1], cached[2]
    order = torch.argsort(rows, stable=True)
    starts = torch.searchsorted(rows[order], torch.arange(tokens + 1, device=rows.device))
    rows._hub_by_row = (tokens, starts, order)  # type: ignore[attr-defined]
    return starts, order


def regroup(rows: torch.Tensor) -> None:
    """Recompute `rows`' kept grouping in place after its values were overwritten in place (a captured graph reads
    the grouping's tensors, so they keep their addresses)."""
    cached = getattr(rows, "_hub_by_row", None)
    if cached is not None:
        tokens, starts, order = cached
        order.copy_(torch.argsort(rows, stable=True))
        starts.copy_(torch.searchsorted(rows[order], torch.arange(tokens + 1, device=rows.device)))


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(max(1, n)))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """h[u] = a[slots[u]] @ x[rows[u]], float32 [U, r]."""
    uses, r, d = rows.shape[0], a.shape[1], a.shape[2]
    h = torch.empty(uses, r, device=x.device, dtype=torch.float32)
    if uses and r:
        block_r = min(_block(r), 64)
        _shrink[(uses, triton.cdiv(r, block_r))](x, a, h, rows, slots, d, r, *x.stride(), *a.stride(),
                                                 BLOCK_R=block_r, BLOCK_D=BLOCK_D)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * (b[slots[u]] @ h[u]), in place."""
    if not rows.shape[0] or not y.shape[1]:
        return
    starts, order = _by_row(rows, y.shape[0])
    n, r = y.shape[1], b.shape[2]
    _expand[(y.shape[0], triton.cdiv(n, BLOCK_N))](y, h, b, starts, order, slots, scale.float(), n, r,
                                                   *y.stride(), *h.stride(), *b.stride(),
                                                   BLOCK_R=_block(r), BLOCK_N=BLOCK_N)


def lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
         scale: torch.Tensor) -> None:
    """Shrink, then expand (two launches)."""
    lora_expand(y, lora_shrink(x, a, rows, slots), b, rows, slots, scale)


def _gather_op(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               scale: torch.Tensor | None) -> None:
    if not rows.shape[0] or not y.shape[1]:
        return
    starts, order = _by_row(rows, y.shape[0])
    factors = scale.float() if scale is not None else starts  # a placeholder the product never reads
    _gather[(y.shape[0], triton.cdiv(y.shape[1], BLOCK_N))](y, v, starts, order, slots, factors, y.shape[1],
                                                            *y.stride(), *v.stride(), MULTIPLY=scale is None,
                                                            BLOCK_N=BLOCK_N)


def gather_add(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               scale: torch.Tensor) -> None:
    """y[rows[u]] += scale[u] * v[slots[u]], in place."""
    _gather_op(y, v, rows, slots, scale)


def gather_mul(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """y[rows[u]] *= v[slots[u]], in place (a row in several uses takes the product)."""
    _gather_op(y, v, rows, slots, None)
