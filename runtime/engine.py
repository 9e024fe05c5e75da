"""The multi-adapter engine: one frozen base model, a different adapter stack per row, one forward.

Base weights are never touched. Each module an adapter targets (a "site") is wrapped once in an
`AdaptedModule` that, during a forward, runs the ops the engine compiled for that batch's plans
(see runtime/techniques/base.py). The ops reach the wrappers through a `_Context` object the engine
owns and fills only for the duration of one forward, under the engine's lock: there is no global
active adapter, and two requests never see each other's adapters. With no forward in flight, or
for rows whose plan is empty, the wrapped model computes exactly the base model. The engine adapts the
model it is given in place: those wrappers, and on a CPU in float32 its `nn.Linear` layers switched to
oneDNN's matmul (runtime/cpu_linear.py; same weights, results differ by accumulation order only).
"""
from __future__ import annotations

import inspect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hub.artifact import Adapter, ArtifactError
from runtime import kernels
from runtime.cpu_linear import route_linears
from runtime.graphs import DecodeGraphs
from runtime.kvcache import new_cache
from runtime.plan import PlanError, RowPlan, resolve
from runtime.techniques import REGISTRY
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, Use
from runtime.techniques.slots import store_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SiteOps = tuple[list[SiteOp], list[SiteOp], list[SiteOp]]  # PRE, DELTA, POST
_NO_OPS: SiteOps = ([], [], [])
# Compiled segments kept: a decode step reuses its batch's (at most generate.MAX_SEGMENTS), a join adds one
# (prompt_lengths, then its prefill), and one more. Few on purpose: the techniques compiled per segment
# (bottleneck, lora_bias) stack per-row weights there, and stacks freed first are memory the next compile
# reuses. LoRA, IA3 and BitFit are batch-wide slot-indexed ops (`batch_ops`) and stack nothing.
_COMPILED_CACHE = 4
_BATCH_OPS_KEPT = 4  # batch-wide index ops kept (small: a few int64 tensors per site and rank class)


class _Context:
    """The ops of the forward in flight, per row segment and site; no segments between forwards.

    A batch is a few row segments (rows that joined together), each compiled on its own, so rows
    joining or leaving re-compile only their segment, never the whole batch (see `Engine.forward`).
    """

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, dict[str, SiteOps]]] = []
        self.batch: dict[str, SiteOps] = {}  # per site, ops over every row (slot-indexed: LoRA, IA3, BitFit)
        self._x: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []

    def set(self, segments: list[tuple[int, int, dict[str, SiteOps]]],
            batch: dict[str, SiteOps] | None = None) -> None:
        self.segments, self.batch, self._x, self._parts = segments, batch or {}, None, []

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x's rows per segment; the same view objects for the same x, so sibling sites fed one
        tensor (q/k/v) see one input and can share work (runtime/techniques/lora.py SharedInput)."""
        if x is not self._x:
            self._x, self._parts = x, [x[start:end] for start, end, _ in self.segments]
        return self._parts


class AdaptedModule(nn.Module):
    """A base module plus the per-row ops of the current forward (pass-through when there are none)."""

    def __init__(self, base_layer: nn.Module, site: str, context: _Context):
        super().__init__()
        self.base_layer = base_layer
        self._site = site
        self._context = context

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # model code reads attributes of the module it expects (weight, attention_type...)
            return getattr(self._modules["base_layer"], name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The batch-wide PRE ops, then each segment's; the base; then DELTA ops (batch-wide first), then POST
        ops likewise, so a scaling (IA3) applies to the output with every delta (LoRA, BitFit) merged and a
        bottleneck block sees the scaled output."""
        segments = self._context.segments
        per_segment = [ops.get(self._site) for _, _, ops in segments]
        whole = self._context.batch.get(self._site)
        if not any(per_segment) and whole is None:
            return self.base_layer(x, *args, **kwargs)
        whole = whole or _NO_OPS
        for op in whole[Stage.PRE]:
            x = op(x, None)
        if len(segments) == 1:
            pre, delta, post = per_segment[0] or _NO_OPS
            for op in pre:
                x = op(x, None)
            out = self.base_layer(x, *args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            for op in whole[Stage.DELTA] + delta + whole[Stage.POST] + post:
                y = op(x, y)
            return (y, *out[1:]) if isinstance(out, tuple) else y
        x = self._pre_segments(x, per_segment)
        out = self.base_layer(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        for stage in (Stage.DELTA, Stage.POST):
            for op in whole[stage]:
                y = op(x, y)
            for site_ops, x_part, (start, end, _) in zip(per_segment, self._context.parts(x), segments):
                if site_ops is None or not site_ops[stage]:
                    continue
                y_part = result = y[start:end]
                for op in site_ops[stage]:
                    result = op(x_part, result)
                if result is not y_part:  # ops that add in place have written into y already
                    y_part.copy_(result)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def _pre_segments(self, x: torch.Tensor, per_segment: list[SiteOps | None]) -> torch.Tensor:
        """x with each segment's PRE ops applied to its rows (x itself when none changes it)."""
        new = x
        for site_ops, part, (start, end, _) in zip(per_segment, self._context.parts(x), self._context.segments):
            result = part
            for op in site_ops[Stage.PRE] if site_ops is not None else ():
                result = op(result, None)
            if result is not part:
                if new is x:
                    new = x.clone()
                new[start:end] = result
        return new


class Compiled:
    """A segment's plans turned into per-site ops."""

    def __init__(self, ops: dict[str, SiteOps]):
        self.ops = ops


class Engine:
    """Serves many adapters over one frozen base model; see the module docstring."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None):
        self._model: PreTrainedModel = model.eval().requires_grad_(False)
        route_linears(self._model)  # float32 on a CPU: the base's linears on oneDNN (runtime/cpu_linear.py)
        self._tokenizer = tokenizer
        self._context = _Context()
        self._residents: dict[str, Resident] = {}
        self._wrapped: set[str] = set()
        self._compiled: OrderedDict[tuple, Compiled] = OrderedDict()
        self._batch_ops: OrderedDict[tuple[RowPlan, ...], dict[str, SiteOps]] = OrderedDict()
        self._lock = threading.RLock()
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # the kernels' backend now (a fused CPU build or load costs seconds), not in a running batch's first step
        self.kernels = kernels.backend_name(self.device)
        self.graphs = DecodeGraphs(self.device)  # CUDA graphs for steady decode steps (runtime/graphs.py)

    @property
    def model(self) -> PreTrainedModel:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    # -- adapters -------------------------------------------------------------------------------

    def load(self, key: str, adapter: Adapter) -> int:
        """Make an adapter resident under `key` (replacing one of the same key); returns its bytes."""
        return self.install(self.prepare(key, adapter))

    def prepare(self, key: str, adapter: Adapter) -> Resident:
        """The adapter's tensors in the engine's layout (checked, on the device), made without the engine
        lock: the slow part of a load (copies, transposes) runs in the caller's thread while batches keep
        running, and `install` then makes it live between two forwards."""
        impl = REGISTRY.get(adapter.technique)
        if impl is None:
            raise ArtifactError(f"technique {adapter.technique.value!r} is not served by this runtime")
        return impl.load(key, adapter, self._model)

    def install(self, resident: Resident) -> int:
        """Make a prepared adapter resident under its key (replacing one of the same key); returns its bytes."""
        with self._lock:
            for site in resident.sites:
                self._wrap(site)
            replaced = self._residents.pop(resident.key, None)
            if replaced is not None:
                self._forget(replaced, free=replaced is not resident)
            self._residents[resident.key] = resident
            self.graphs.clear()  # a graph may read the slots this adapter now holds
            return resident.nbytes

    def weights_bytes(self, adapter: Adapter) -> int:
        """Bytes `load` will keep for the adapter's tensors (float ones in its technique's weights dtype),
        before loading it: what a memory budget reserves."""
        impl = REGISTRY.get(adapter.technique)
        itemsize = (impl.weights_dtype(self._model) if impl is not None else self.dtype).itemsize
        return sum(int(t.numel()) * (itemsize if t.is_floating_point() else t.element_size())
                   for t in adapter.tensors.values())

    def unload(self, key: str) -> None:
        with self._lock:
            resident = self._residents.pop(key, None)
            if resident is None:
                raise KeyError(f"adapter {key!r} is not loaded")
            self._forget(resident)

    def _forget(self, resident: Resident, free: bool = True) -> None:
        """Drop what was compiled with a resident that goes (the other segments, e.g. the running batch's,
        stay; batch-wide ops are cheap to rebuild and all go) and give back its slots (unless it is installed
        again)."""
        key = resident.key
        for k in [k for k in self._compiled if any(u.key == key for plan in k[0] for u in plan.adapters)]:
            del self._compiled[k]
        self._batch_ops.clear()
        self.graphs.clear()
        if free and resident.free is not None:
            resident.free()

    def resident(self) -> dict[str, int]:
        with self._lock:
            return {key: r.nbytes for key, r in self._residents.items()}

    def _wrap(self, site: str) -> None:
        if site in self._wrapped:
            return
        parent_name, _, child = site.rpartition(".")
        parent = self._model.get_submodule(parent_name)
        setattr(parent, child, AdaptedModule(getattr(parent, child), site, self._context))
        self._wrapped.add(site)

    # -- plans ----------------------------------------------------------------------------------

    def check(self, plans: list[RowPlan]) -> None:
        """Raise PlanError if these plans cannot be served (unknown adapter, unservable mix); builds nothing."""
        with self._lock:
            self._uses(plans)

    def compile(self, plans: list[RowPlan], copy: int = 0) -> Compiled:
        """The ops for one segment's plans, cached so a decode loop compiles once. `copy` > 0: another set of
        ops for the same plans, for a second segment of one forward with the same plans (ops keep state for
        the forward in flight, e.g. a bottleneck block's residual, so no two segments share them)."""
        with self._lock:
            key = (tuple(plans), copy)
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
            while len(self._compiled) >= _COMPILED_CACHE:  # before compiling: the new stacks reuse what this frees
                self._compiled.popitem(last=False)
            compiled = self._compiled[key] = self._compile(plans)
            return compiled

    def _uses(self, plans: list[RowPlan]) -> tuple[list[list[Use]], dict[Any, dict[str, list[Use]]]]:
        """Per row its uses, and per technique and site all rows' uses there; every row's mix checked."""
        rows = resolve(plans, self._residents)
        by_technique: dict[Any, dict[str, list[Use]]] = {}
        for row_uses, plan in zip(rows, plans):
            for technique in {u.resident.technique for u in row_uses}:
                try:
                    REGISTRY[technique].check_plan([u for u in row_uses if u.resident.technique is technique],
                                                   plan.mode)
                except ValueError as e:
                    raise PlanError(str(e)) from None
            for use in row_uses:
                for site in use.resident.sites:
                    by_technique.setdefault(use.resident.technique, {}).setdefault(site, []).append(use)
        return rows, by_technique

    def batch_ops(self, plans: list[RowPlan]) -> dict[str, SiteOps]:
        """Per site, the techniques' ops over all of these rows at once (`TechniqueImpl.compile_batch`), by
        stage: index tensors into slot buffers, kept for the last few batches (a decode step and a join's
        prefill)."""
        with self._lock:
            key = tuple(plans)
            hit = self._batch_ops.get(key)
            if hit is not None:
                self._batch_ops.move_to_end(key)
                return hit
            _, by_technique = self._uses(plans)
            batch = BatchInfo(len(plans), tuple(p.mode for p in plans), self.device, self.dtype)
            ops: dict[str, SiteOps] = {}
            for technique, sites in by_technique.items():
                _stage(ops, REGISTRY[technique].compile_batch(sites, batch))
            while len(self._batch_ops) >= _BATCH_OPS_KEPT:
                self._batch_ops.popitem(last=False)
            self._batch_ops[key] = ops
            return ops

    def _compile(self, plans: list[RowPlan]) -> Compiled:
        _, by_technique = self._uses(plans)
        batch = BatchInfo(len(plans), tuple(p.mode for p in plans), self.device, self.dtype)
        ops: dict[str, SiteOps] = {}
        for technique, sites in by_technique.items():
            _stage(ops, REGISTRY[technique].compile_all(sites, batch))
        return Compiled(ops)

    def _prompts(self, plans: list[RowPlan]) -> list[list[torch.Tensor]]:
        """Per row, the soft prompts it puts before its tokens, in stack order: the residents' own tensors (read
        at prefill only, never copied per batch)."""
        with self._lock:
            return [[u.resident.prompt for u in row_uses if u.resident.prompt is not None]
                    for row_uses in resolve(plans, self._residents)]

    def prompt_lengths(self, plans: list[RowPlan]) -> list[int]:
        """Soft-prompt tokens a prefill puts before each row's tokens (its cache is that much longer)."""
        return [sum(p.shape[0] for p in parts) for parts in self._prompts(plans)]

    # -- forward --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plans: list[RowPlan],
                cache: Any = None, position_ids: torch.Tensor | None = None, use_cache: bool = True,
                segments: Sequence[int] | None = None, last_only: bool = False, keep_last: int = 0):
        """Logits (rows, tokens, vocab) for `input_ids`, each row under its own plan, and the KV cache.

        Left-pad rows; `attention_mask` covers the cache plus the new tokens. Position ids default to
        the count of attended positions before each token, so padding never shifts a row. Soft
        prompts are inserted on prefill (no cache yet), left of each row's tokens, and their
        positions are not part of the returned logits. `segments` splits the rows into consecutive
        groups (row counts) compiled apart, so a batch whose rows come and go re-compiles only the
        groups that changed (runtime/generate.py keeps one group per join); default: one group.
        `last_only` returns (and computes: the vocabulary projection of a prefill is no small part of
        it) only each row's last logits, as generation needs; `keep_last` > 0 likewise the last `keep_last`
        positions' logits (scoring a completion needs only the positions that predict it).
        """
        if input_ids.shape[0] != len(plans):
            raise PlanError(f"{input_ids.shape[0]} rows but {len(plans)} plans")
        bounds = _bounds(len(plans), segments)
        with self._lock, torch.inference_mode():
            seen: list[tuple[RowPlan, ...]] = []  # each segment's plans, so equal segments get their own ops
            compiled = []
            for start, end in bounds:
                segment = tuple(plans[start:end])
                compiled.append(self.compile(list(segment), copy=seen.count(segment)))
                seen.append(segment)
            tokens = input_ids.shape[1]
            inputs: dict[str, Any] = {"input_ids": input_ids}
            prefill = cache is None or cache.get_seq_length() == 0
            prompts = self._prompts(plans) if prefill else []
            if any(prompts):
                if position_ids is not None:
                    raise PlanError("position_ids cannot be given with soft prompts (the engine places them)")
                inputs, attention_mask = self._with_prompts(input_ids, attention_mask, prompts)
            length = next(iter(inputs.values())).shape[1]  # tokens fed now, soft prompts included
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            keep = min(1 if last_only else keep_last, tokens)
            if keep and self._keeps_logits:
                # An index tensor, not the int: the model's slice [:, -1:] of a prefill is not contiguous, and
                # the vocabulary projection of a non-contiguous (rows, 1, hidden) input runs as a batched
                # matmul over a per-row copy of the whole head (slow in fp32, far slower in bf16).
                inputs["logits_to_keep"] = torch.arange(length - keep, length, device=input_ids.device)
            if cache is None and use_cache:
                cache = new_cache(self._model)  # appends in place (runtime/kvcache.py)
            segment_ops = [(start, end, c.ops) for (start, end), c in zip(bounds, compiled)]
            batch = self.batch_ops(plans)
            if not prefill and tokens == 1 and use_cache:
                def step(static: dict[str, torch.Tensor]) -> torch.Tensor:
                    self._context.set(segment_ops, batch)
                    try:
                        return self._model(**static, cache=cache, use_cache=True).logits
                    finally:
                        self._context.set([])

                graphed = self.graphs.decode((tuple(plans), tuple(bounds)), input_ids, position_ids, attention_mask,
                                             self.dtype, cache,
                                             lambda: (compiled, batch, store_of(self._model).parts()), step)
                if graphed is not None:
                    return graphed, cache
            self._context.set(segment_ops, batch)
            try:
                out = self._model(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache)
            finally:
                self._context.set([])
            return out.logits[:, -(keep or tokens):], out.cache

    def _with_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompts: list[list[torch.Tensor]]) -> tuple[dict[str, Any], torch.Tensor]:
        """Embeddings with each row's soft prompts (in order) left of its first real token, rows left-padded."""
        embeds = self._model.get_input_embeddings()(input_ids)
        lengths = [sum(p.shape[0] for p in parts) for parts in prompts]
        longest = max(lengths)
        rows, tokens, hidden = embeds.shape
        full = embeds.new_zeros(rows, longest + tokens, hidden)
        mask = attention_mask.new_zeros(rows, longest + tokens)
        for row, parts in enumerate(prompts):
            real = int(attention_mask[row].sum())
            start = longest + tokens - real - lengths[row]  # left padding, then prompts, then real tokens
            at = start
            for prompt in parts:
                full[row, at:at + prompt.shape[0]] = prompt
                at += prompt.shape[0]
            full[row, longest + tokens - real:] = embeds[row, tokens - real:]
            mask[row, start:] = 1
        return {"inputs_embeds": full}, mask


def _stage(ops: dict[str, SiteOps], site_ops: dict[str, list[SiteOp]]) -> None:
    """Add a technique's ops per site into `ops`, each into its stage's list (sites without ops get none)."""
    for site, made in site_ops.items():
        if made:
            staged = ops.setdefault(site, ([], [], []))
            for op in made:
                staged[op.stage].append(op)


def _bounds(rows: int, segments: Sequence[int] | None) -> list[tuple[int, int]]:
    """(start, end) of each row segment; PlanError unless the counts are positive and cover the rows."""
    counts = [rows] if segments is None else list(segments)
    if any(c <= 0 for c in counts) or sum(counts) != rows:
        raise PlanError(f"segments {counts} do not split {rows} rows")
    ends = list(itertools.accumulate(counts))
    return list(zip([0] + ends[:-1], ends))
