"""The multi-adapter engine: one frozen base model, a different adapter stack per row, one forward.

Base weights are never touched. Each module an adapter targets (a "site") is wrapped once in an
`AdaptedModule` that, during a forward, runs the ops the engine compiled for that batch's plans
(see runtime/techniques/base.py): index tensors into the slot buffers the adapters live in, so a batch change
builds small tensors and moves no adapter bytes. The ops reach the wrappers through a `_Context` object the engine
owns and fills only for the duration of one forward, under the engine's lock: there is no global
active adapter, and two requests never see each other's adapters. With no forward in flight, or
for rows whose plan is empty, the wrapped model computes exactly the base model. The engine adapts the
model it is given in place: those wrappers, and on a CPU in float32 its `nn.Linear` layers switched to
oneDNN's matmul (runtime/cpu_linear.py; same weights, results differ by accumulation order only).
"""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from types import ModuleType
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
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Use
from runtime.techniques.slots import store_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SiteOps = tuple[list[SiteOp], list[SiteOp], list[SiteOp]]  # PRE, DELTA, POST
_BATCH_OPS_KEPT = 4  # batch ops kept (small: a few int64 tensors per site and slot buffer): a decode step's, a join's


class _Context:
    """The ops of the forward in flight, per site; none between forwards."""

    def __init__(self) -> None:
        self.ops: dict[str, SiteOps] = {}


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
        """The PRE ops, the base, then the DELTA ops, then the POST ops: a scaling (IA3) applies to the output with
        every delta (LoRA, BitFit) merged and a bottleneck block sees the scaled output."""
        ops = self._context.ops.get(self._site)
        if ops is None:
            return self.base_layer(x, *args, **kwargs)
        pre, delta, post = ops
        for op in pre:
            x = op(x, None)
        out = self.base_layer(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        for op in delta:
            y = op(x, y)
        for op in post:
            y = op(x, y)
        return (y, *out[1:]) if isinstance(out, tuple) else y


class Engine:
    """Serves many adapters over one frozen base model; see the module docstring."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None):
        self._model: PreTrainedModel = model.eval().requires_grad_(False)
        route_linears(self._model)  # float32 on a CPU: the base's linears on oneDNN (runtime/cpu_linear.py)
        self._tokenizer = tokenizer
        self._context = _Context()
        self._residents: dict[str, Resident] = {}
        self._wrapped: set[str] = set()
        # keyed by the kernels' backend too: ops call the backend they were built with
        self._batch_ops: OrderedDict[tuple[ModuleType, tuple[RowPlan, ...]], dict[str, SiteOps]] = OrderedDict()
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
        """Drop the batch ops (cheap to rebuild; some may index a resident that goes) and give back its slots
        (unless it is installed again)."""
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

    def _uses(self, plans: list[RowPlan]) -> dict[Any, dict[str, list[Use]]]:
        """Per technique and site all rows' uses there, in row and stack order; every row's mix checked."""
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
        return by_technique

    def batch_ops(self, plans: list[RowPlan]) -> dict[str, SiteOps]:
        """Per site, the techniques' ops over all of these rows at once (`TechniqueImpl.compile_batch`), by
        stage: index tensors into slot buffers, kept for the last few batches (a decode step and a join's
        prefill). A join, leave or cancel costs one of these, never a copy of adapter bytes."""
        with self._lock:
            backend = kernels.backend(self.device)
            key = (backend, tuple(plans))
            hit = self._batch_ops.get(key)
            if hit is not None:
                self._batch_ops.move_to_end(key)
                return hit
            by_technique = self._uses(plans)
            batch = BatchInfo(len(plans), tuple(p.mode for p in plans), self.device, self.dtype, backend)
            ops: dict[str, SiteOps] = {}
            # in the table's order, so a module runs its ops of one stage in one order whatever the rows' plans
            # (IA3's scaling of an output before the bottleneck block there)
            for technique, impl in REGISTRY.items():
                if technique in by_technique:
                    _stage(ops, impl.compile_batch(by_technique[technique], batch))
            while len(self._batch_ops) >= _BATCH_OPS_KEPT:
                self._batch_ops.popitem(last=False)
            self._batch_ops[key] = ops
            return ops

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
                last_only: bool = False, keep_last: int = 0):
        """Logits (rows, tokens, vocab) for `input_ids`, each row under its own plan, and the KV cache.

        Left-pad rows; `attention_mask` covers the cache plus the new tokens. Position ids default to
        the count of attended positions before each token, so padding never shifts a row. Soft
        prompts are inserted on prefill (no cache yet), left of each row's tokens, and their
        positions are not part of the returned logits.
        `last_only` returns (and computes: the vocabulary projection of a prefill is no small part of
        it) only each row's last logits, as generation needs; `keep_last` > 0 likewise the last `keep_last`
        positions' logits (scoring a completion needs only the positions that predict it).
        """
        if input_ids.shape[0] != len(plans):
            raise PlanError(f"{input_ids.shape[0]} rows but {len(plans)} plans")
        with self._lock, torch.inference_mode():
            ops = self.batch_ops(plans)
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
                # appends in place (runtime/kvcache.py), with rows for a graphed step's padding rows
                cache = new_cache(self._model, self.graphs.room if self.graphs.enabled else None)
            if not prefill and tokens == 1 and use_cache:
                def step(step_ops: dict[str, SiteOps], static: dict[str, torch.Tensor]) -> torch.Tensor:
                    self._context.ops = step_ops
                    try:
                        return self._model(**static, cache=cache, use_cache=True).logits
                    finally:
                        self._context.ops = {}

                graphed = self.graphs.decode(ops, input_ids, position_ids, attention_mask, self.dtype, cache,
                                             store_of(self._model).parts, step)
                if graphed is not None:
                    return graphed, cache
            self._context.ops = ops
            try:
                out = self._model(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache)
            finally:
                self._context.ops = {}
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

