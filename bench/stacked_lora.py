"""The engine's LoRA path before slots (rank-bucketed stacks of every row's A and B, built per batch), kept
only so bench/kernel_bench.py can measure it against slots + the fused kernels: the "stacked" figures of
docs/benchmarks.md, "Kernels". The engine serves LoRA from slots (runtime/techniques/lora.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hub.architectures import SHARED_INPUT
from runtime.techniques.base import BatchInfo, SiteOp, Stage, Use


class RowBiasOp(SiteOp):
    """Adds a per-row vector to the output: `lora_bias` as that path stacked it per batch (zeros elsewhere)."""

    stage = Stage.DELTA

    def __init__(self, bias: torch.Tensor):
        self.bias = bias  # (rows, out)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a DELTA op is given the layer's output"
        return y + self.bias.view(self.bias.shape[0], *([1] * (y.dim() - 2)), self.bias.shape[1])


def row_vectors(uses: list[Use], batch: BatchInfo, vector_of: Callable[[Use], torch.Tensor]) -> torch.Tensor:
    """(rows, dim) tensor: zeros for untouched rows, plus each use's weighted vector summed into its row."""
    first = vector_of(uses[0])
    out = torch.zeros((batch.rows, first.shape[-1]), device=first.device, dtype=first.dtype)
    for use in uses:
        out[use.row] += use.weight * vector_of(use)
    return out


@dataclass
class LoraSite:
    a_t: torch.Tensor  # (in, r); a view into `group_a` when sibling sites share this site's input
    b_t: torch.Tensor  # (r, out), scaling folded in
    bias: torch.Tensor | None  # (out,), scaling folded in
    group: tuple[str, ...] = ()  # the adapter's sibling sites (this one included) whose A's `group_a` holds
    group_a: torch.Tensor | None = None  # (in, their ranks summed): [A_1 | A_2 | ..] in `group` order

    @property
    def rank(self) -> int:
        return self.a_t.shape[1]


def _sibling_group(site: str) -> tuple[str, int] | None:
    """(parent module, group number) of a site whose siblings take the same input, else None."""
    parent, _, name = site.rpartition(".")
    group = next((i for i, names in enumerate(SHARED_INPUT) if name in names), None)
    return None if group is None else (parent, group)


def _add_into(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """y += delta in y's dtype (delta may be the float32 of a half-precision base's LoRA)."""
    return y.add_(delta if delta.dtype == y.dtype else delta.to(y.dtype))


class LoraOp(SiteOp):
    stage = Stage.DELTA

    def __init__(self, uses: list[Use], site: str, rows: int):
        self.site = site
        slots: dict[str, LoraSite] = {}
        for use in uses:
            slots.setdefault(use.resident.key, use.resident.sites[site])
        first = next(iter(slots.values()))
        device, dtype = first.a_t.device, first.a_t.dtype
        self.shared: tuple[SharedInput, int] | None = None  # set by SharedInput
        self.dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.buckets: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]] = []  # (rows, A, B)
        self.bucket_slots: list[list[LoraSite]] = []
        self.signature: tuple = ()
        if len(slots) == 1:
            weight: dict[int, float] = {}  # per row using it, its weights summed (a stack may repeat it)
            for use in uses:
                weight[use.row] = weight.get(use.row, 0.0) + use.weight
            order = list(weight)
            # None: every row once, in order, so no gather/scatter; None: every weight 1, so no multiply
            idx = None if order == list(range(rows)) else torch.tensor(order, device=device)
            scale = None if all(w == 1.0 for w in weight.values()) else torch.tensor(
                list(weight.values()), device=device, dtype=dtype).view(-1, 1, 1)
            self.dense = (first.a_t, first.b_t, idx, scale)
            return
        by_rank: dict[int, list[Use]] = {}
        for use in uses:
            by_rank.setdefault(slots[use.resident.key].rank, []).append(use)
        for rank, group in by_rank.items():
            order = [u.row for u in group]
            # None: the bucket is every row once, in order (the common case), so no gather/scatter
            idx = None if order == list(range(rows)) else torch.tensor(order, device=device)
            bucket = [slots[u.resident.key] for u in group]
            b = torch.stack([slot.b_t for slot in bucket])
            if any(u.weight != 1.0 for u in group):
                b.mul_(torch.tensor([u.weight for u in group], device=device, dtype=dtype).view(-1, 1, 1))
            self.buckets.append((idx, None, b))
            self.bucket_slots.append(bucket)
            self.signature += ((rank, tuple((u.row, u.resident.key) for u in group)),)

    def stack_a(self) -> None:
        """Stack each bucket's A's (skipped for a site whose A projection a SharedInput computes)."""
        if self.shared is None:
            self.buckets = [(idx, torch.stack([s.a_t for s in slots]), b)
                            for (idx, _, b), slots in zip(self.buckets, self.bucket_slots)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.dense is not None:
            a, b, idx, scale = self.dense
            used = x if idx is None else x.index_select(0, idx)
            rows, tokens = used.shape[0], used.shape[1]
            h = torch.mm(used.reshape(rows * tokens, -1).to(a.dtype), a)
            if scale is not None:
                h.view(rows, tokens, -1).mul_(scale)
            if idx is not None:
                return y.index_add_(0, idx, torch.mm(h, b).view(rows, tokens, -1).to(y.dtype))
            if y.dtype == b.dtype:
                return torch.addmm(y.reshape(rows * tokens, -1), h, b).view(y.shape)
            return _add_into(y, torch.mm(h, b).view(y.shape))
        projected = self.shared[0].project(x) if self.shared else None
        for k, (idx, a, b) in enumerate(self.buckets):
            if projected is not None:
                start = self.shared[1] * b.shape[1]
                h = projected[k][..., start:start + b.shape[1]]
            else:
                h = torch.bmm((x if idx is None else x.index_select(0, idx)).to(a.dtype), a)
            if idx is None and y.dtype == b.dtype:
                y = y.baddbmm_(h, b)
            elif idx is None:
                y = _add_into(y, torch.bmm(h, b))
            else:
                y.index_add_(0, idx, torch.bmm(h, b).to(y.dtype))
        return y


class SharedInput:
    """The A projections of sibling sites fed the same input, computed once per input tensor.

    Each adapter keeps its sibling A's concatenated (`LoraSite.group_a`, made at load), so a batch
    stacks one [A_1 | A_2 | ..] per row and the first sibling called computes x @ it per bucket; the
    others reuse it if they get the very same tensor object (checked by identity, so a different
    input is never mistaken for it).
    """

    def __init__(self, members: list[LoraOp]):
        self.members = len(members)
        self.a = [torch.stack([slot.group_a for slot in slots]) for slots in members[0].bucket_slots]
        self.idx = [bucket[0] for bucket in members[0].buckets]
        self._x: torch.Tensor | None = None
        self._h: list[torch.Tensor] = []
        self._served = 0
        layout = members[0].bucket_slots[0][0].group
        for m in members:
            m.shared = (self, layout.index(m.site))

    @staticmethod
    def fits(members: list[LoraOp]) -> bool:
        """True when every row's adapter holds exactly these sites' A's, in one layout, at one rank."""
        layout = members[0].bucket_slots[0][0].group
        return (len(members) > 1 and set(layout) == {m.site for m in members}
                and all(slot.group == layout for slots in members[0].bucket_slots for slot in slots))

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x is not self._x:
            self._x, self._served = x, 0
            self._h = [torch.bmm((x if idx is None else x.index_select(0, idx)).to(a.dtype), a)
                       for idx, a in zip(self.idx, self.a)]
        h = self._h
        self._served += 1
        if self._served == self.members:  # every sibling has had it: drop the activation
            self._x, self._h = None, []
        return h


def compile_all(site_uses: dict[str, list[Use]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
    """A batch's stacks and ops, as `Lora.compile_all` made them."""
    ops: dict[str, list[SiteOp]] = {}
    siblings: dict[tuple, list[LoraOp]] = {}
    for site, uses in site_uses.items():
        op = LoraOp(uses, site, batch.rows)
        ops[site] = [op]
        with_bias = [u for u in uses if u.resident.sites[site].bias is not None]
        if with_bias:
            ops[site].append(RowBiasOp(row_vectors(with_bias, batch, lambda u, s=site: u.resident.sites[s].bias)))
        group = _sibling_group(site)
        if group is not None and op.dense is None:
            siblings.setdefault((group, op.signature), []).append(op)
    for members in siblings.values():
        if SharedInput.fits(members):
            SharedInput(members)
    for site_ops in ops.values():
        site_ops[0].stack_a()
    return ops


def _group_siblings(sites: dict[str, LoraSite]) -> None:
    """Concatenate the A's of an adapter's sibling sites (fed one input) into one tensor they view."""
    groups: dict[tuple[str, int], list[str]] = {}
    for path in sites:
        group = _sibling_group(path)
        if group is not None:
            groups.setdefault(group, []).append(path)
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()  # one layout for every adapter, whatever order its file listed the tensors in
        group_a = torch.cat([sites[m].a_t for m in members], dim=1)  # views in, one contiguous copy out
        offset = 0
        for m in members:
            rank = sites[m].rank
            sites[m].a_t, sites[m].group, sites[m].group_a = group_a[:, offset:offset + rank], tuple(members), group_a
            offset += rank
