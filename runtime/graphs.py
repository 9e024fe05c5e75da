"""CUDA graphs for the decode step: a steady batch's step replayed as one graph instead of hundreds of launches.

A decode step of a small model on a large GPU is bound by the host: Python in every module and a kernel launch
per op. A CUDA graph records the step's kernels once and replays them with one call. A graph reads fixed
addresses, so what a step changes lives in static tensors written before each replay: the new tokens, their
positions, the attention mask over the cache's fixed columns and the column the new token's keys and values go
to (runtime/kvcache.py `static_writes`: the cache's buffers are written in place, their addresses survive joins
and leaves while they have room).

Buckets, as vLLM's capture sizes: a step of R live rows runs the graph of a bucket B >= R (1, 2, 4, 8, then
multiples of 8 up to `largest`; `slots.bucket`): the static inputs have B rows, rows R..B-1 padding ones (token
`PAD_TOKEN` at position 0, attending only the column they write, so their softmax is finite), their keys and
values written into buffer rows no live row holds (a cache made for graphs reserves rows up to the bucket:
`room`; a row joining one later has it zeroed left of its columns, kvcache.join_rows), and their logits
dropped. The batch's ops are padded alike (`SiteOp.padded`, `slots.Padding`): each index tensor (which row
reads which slot, with which weight) to a bucketed length, a padded use naming a padding row (or a padding
entry of an op's own index space) with weight 0 and a slot its buffer holds, so no padded use reads or writes
a live row. The bucket is the smallest that holds R, or the next one when a padded use needs a padding row and
R fills its bucket. So rows joining and leaving within a bucket usually keep the structure (`_signature`: the
same sites, slot buffers and padded sizes): the new index values are copied into the tensors the graph reads
(the graph's own copies, never the eager ops') and it replays. A structure (with a cache geometry: bucket,
buffer size and addresses) is captured once it has run `CAPTURE_AFTER` steps eagerly: a capture costs about
two eager steps. A step the graphs cannot take runs eagerly, unchanged: a prefill, a cache that is not in fixed
buffers or has no room (columns, or rows for the bucket), more rows than `largest`, an op that cannot be
padded, a structure not yet steady. Eager steps (and an engine without graphs) pay no padding.

Captured graphs are dropped when an adapter is installed or unloaded (a slot they read may now hold another
adapter) and not replayed after a slot buffer grew (they read its old tensor, which each graph keeps alive: an
adapter prepared in another thread may grow a buffer while a replay is on its way). At most `KEPT` graphs are
kept. `mode` "emulate" runs the same static-buffer path eagerly on any device, replaying by running the step
again: how the bookkeeping is tested where there is no GPU.
"""
from __future__ import annotations

import logging
import os
import types
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch

from runtime import kernels, kvcache
from runtime.techniques.slots import NoRoom, Padding, PerToken, SlotBuffer, bucket

log = logging.getLogger(__name__)

MODES = ("auto", "off", "emulate")
CAPTURE_AFTER = 2  # eager steps of one structure before it is captured: a structure that lasts pays it back
KEPT = 8  # graphs kept (least recently used dropped): a batch alternates between few structures at a time
_SEEN_KEPT = 64  # structures counted towards CAPTURE_AFTER
_SIGNATURES_KEPT = 8  # (ops object, bucket) pairs whose padded ops are remembered (the engine keeps a few ops)
LARGEST = 128  # the largest bucket: a bigger batch is bound by its arithmetic more than by launches
PAD_TOKEN = 0  # what a padding row feeds (any token: its logits are dropped)


@dataclass(eq=False)
class _Graph:
    """One captured step: its static inputs, its output, what it reads that must stay alive, and the replay."""

    ids: torch.Tensor  # (bucket, 1)
    positions: torch.Tensor  # (bucket, 1)
    mask: torch.Tensor  # (bucket, 1, 1, stop), additive: 0 where attended, the dtype's minimum elsewhere
    writes: kvcache.StaticWrites
    logits: torch.Tensor  # (bucket, 1, vocab), written by each replay
    replay: Callable[[], None]
    holds: Any  # what the graph reads and nothing else keeps alive: the slot buffers' tensors
    tensors: list[torch.Tensor]  # the captured ops' own tensors, in `_signature` order: a new batch's values go there
    current: object  # the padded ops whose values those tensors hold now


@dataclass(eq=False)
class _Padded:
    """A batch's ops padded to a bucket, their structure and tensors (`_signature`)."""

    ops: dict
    signature: tuple
    tensors: list[torch.Tensor]


class DecodeGraphs:
    """The captured decode steps of one engine; used under the engine's lock."""

    def __init__(self, device: torch.device, mode: str | None = None, largest: int = LARGEST):
        mode = mode or os.environ.get("HUB_CUDA_GRAPHS", "auto")
        if mode not in MODES:
            raise ValueError(f"graphs: HUB_CUDA_GRAPHS must be one of {', '.join(MODES)}, got {mode!r}")
        if largest < 1 or bucket(largest) != largest:
            raise ValueError(f"graphs: the largest bucket must be a bucket size (1, 2, 4, 8, 16, 24...), got {largest}")
        self.enabled = mode == "emulate" or (mode == "auto" and device.type == "cuda")
        self.emulated = mode == "emulate"
        self.largest = largest
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self._refused: set[tuple] = set()  # structures whose capture failed: they run eagerly
        # (id(ops), bucket) -> (ops, their padding or None where they cannot be padded to that bucket)
        self._padded: OrderedDict[tuple[int, int], tuple[object, _Padded | None]] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.enabled and not self.emulated else None
        self.captures = 0
        self.replays = 0
        self.reuses = 0  # replays of a graph with another batch's index values copied in

    def room(self, rows: int) -> int:
        """The rows a cache buffer for `rows` rows is made with where graphs are enabled (`kvcache.new_cache`):
        their bucket, where a graphed step's padding rows write."""
        return bucket(rows) if rows <= self.largest else rows

    def clear(self) -> None:
        """Forget every graph (an adapter was installed or unloaded)."""
        self._graphs.clear()
        self._seen.clear()
        self._refused.clear()
        self._padded.clear()

    def decode(self, ops: dict, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype,
               cache: Any, holds: Callable[[], Any], forward: Callable[[dict, dict[str, torch.Tensor]], torch.Tensor]
               ) -> torch.Tensor | None:
        """The step's logits (rows, 1, vocab) from a graph, or None where the caller runs it eagerly.

        `ops` are the batch's ops; `mask` is the step's 2-D attention mask over the cache's live columns and the
        new one; `forward(ops, inputs)` runs the model on those inputs with those ops in place and returns its
        logits (the warm-up and the capture call it); what `holds()` returns at a capture is kept alive as long
        as the graph; `dtype` is the model's."""
        if not self.enabled or cache is None:
            return None
        where = kvcache.geometry(cache)
        if where is None or mask.shape[1] != where.end - where.start + 1:
            return None
        chosen = self._bucket(ops, where.rows, where.capacity)
        if chosen is None:
            return None
        size, padded = chosen
        key = (padded.signature, size, where.stop, where.addresses, SlotBuffer.growths)
        if key in self._refused:
            return None
        graph = self._graphs.get(key)
        if graph is None:
            seen = self._seen.pop(key, 0) + 1
            self._seen[key] = seen
            while len(self._seen) > _SEEN_KEPT:
                self._seen.popitem(last=False)
            if seen <= CAPTURE_AFTER:
                return None
            try:
                graph = self._capture(key, where, size, ops, padded, ids, positions, mask, dtype, cache, holds,
                                      forward)
            except RuntimeError as e:  # an op that syncs with the host cannot be captured: this batch runs eagerly
                log.warning("graphs: capturing a decode step failed, it runs eagerly: %s", e)
                self._refused.add(key)
                return None
        else:
            self._graphs.move_to_end(key)
            if graph.current is not padded:  # rows joined or left: the same structure with other index values
                for into, new in zip(graph.tensors, padded.tensors):
                    into.copy_(new)
                    kernels.indices_changed(into)
                graph.current = padded
                self.reuses += 1
            _fill(graph, ids, positions, mask, where.start, where.end)
            graph.replay()
        self.replays += 1
        kvcache.advance(cache)
        return graph.logits[:where.rows].clone()  # padding rows dropped; the next replay overwrites the output

    def _bucket(self, ops: dict, rows: int, capacity: int) -> tuple[int, _Padded] | None:
        """The bucket a step of `rows` rows runs in and its ops padded to it: the smallest bucket that holds the
        rows, or the next one where a padded use needs a padding row and the rows fill the first; None where
        neither fits the largest bucket and the cache's `capacity` rows, or the ops cannot be padded."""
        size = bucket(rows)
        while size <= min(self.largest, capacity):
            padded = self._padded_ops(ops, rows, size)
            if padded is not None:
                return size, padded
            if size > rows:  # a padding row was there: these ops cannot be padded
                return None
            size = bucket(size + 1)
        return None

    def _padded_ops(self, ops: dict, rows: int, size: int) -> _Padded | None:
        """`ops` padded to `size` rows (`_pad`), remembered for the few ops objects the engine reuses."""
        key = (id(ops), size)
        known = self._padded.get(key)
        if known is None or known[0] is not ops:
            padded_ops = _pad(ops, rows, size)
            padded = None
            if padded_ops is not None:
                tensors: list[torch.Tensor] = []
                padded = _Padded(padded_ops, _signature(padded_ops, tensors), tensors)
            known = (ops, padded)
            self._padded[key] = known
            while len(self._padded) > _SIGNATURES_KEPT:
                self._padded.popitem(last=False)
        self._padded.move_to_end(key)
        return known[1]

    def _capture(self, key: tuple, where: kvcache.Geometry, size: int, ops: dict, padded: _Padded,
                 ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, cache: Any,
                 holds: Callable[[], Any], forward: Callable[[dict, dict[str, torch.Tensor]], torch.Tensor]) -> _Graph:
        """Capture the step over `size` rows (running it once: the caller's step is done when this returns),
        with ops padded again: tensors of the graph's own, which later batches' values are copied into."""
        own = _pad(ops, where.rows, size)
        assert own is not None, "padded once, padded alike"
        tensors: list[torch.Tensor] = []
        assert _signature(own, tensors) == padded.signature, "padded alike"
        static = kvcache.StaticWrites(torch.zeros(1, dtype=torch.long, device=ids.device), where.stop, size)
        # additive, in the model's dtype, as every attention implementation reads a 4-D mask handed to it
        attend = torch.zeros(size, 1, 1, where.stop, dtype=dtype, device=ids.device)
        inputs = {"input_ids": ids.new_zeros(size, 1), "position_ids": positions.new_zeros(size, 1),
                  "attention_mask": attend}

        def step() -> torch.Tensor:
            with kvcache.static_writes(cache, static):
                return forward(own, inputs)

        graph = _Graph(inputs["input_ids"], inputs["position_ids"], attend, static, ids.new_empty(0),
                       lambda: None, (own, holds()), tensors, padded)
        _fill(graph, ids, positions, mask, where.start, where.end)
        if self.emulated:
            graph.logits = step()

            def rerun() -> None:
                graph.logits.copy_(step())

            graph.replay = rerun
        else:
            graph.logits, graph.replay = self._record(step)
        while len(self._graphs) >= KEPT:
            self._graphs.popitem(last=False)
        self._graphs[key] = graph
        self._seen.pop(key, None)
        self.captures += 1
        return graph

    def _record(self, step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        """Warm the step up on a side stream (kernels compiled, index tensors built: nothing may allocate from the
        host during a capture), capture it, and replay it once for this step's result."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: an adapter loading in another thread (its copies to the device) does not break the capture
        with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = step()
        cuda_graph.replay()
        return logits, cuda_graph.replay


def _fill(graph: _Graph, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int, column: int
          ) -> None:
    """Write one step's inputs into a graph's static tensors (`mask` covers the live columns from `start`): the
    live rows first, then padding rows that feed `PAD_TOKEN` and attend only the column they write."""
    rows = ids.shape[0]
    graph.ids[:rows].copy_(ids)
    graph.ids[rows:].fill_(PAD_TOKEN)
    graph.positions[:rows].copy_(positions)
    graph.positions[rows:].zero_()
    graph.mask.fill_(torch.finfo(graph.mask.dtype).min)
    graph.mask[:rows, 0, 0, start:start + mask.shape[1]].masked_fill_(mask.bool(), 0)
    graph.mask[rows:, 0, 0, column] = 0
    graph.writes.column.fill_(column)


def _pad(ops: dict, rows: int, size: int) -> dict | None:
    """Per site, each stage's ops padded from `rows` to `size` rows (`SiteOp.padded`): new ops with tensors of
    their own; None where an op cannot be padded or needs a padding row there is none of."""
    padding = Padding(rows, size)
    padded: dict = {}
    try:
        for site, stages in ops.items():
            padded[site] = tuple([op.padded(padding) for op in stage] for stage in stages)
    except NoRoom:
        return None
    if any(op is None for stages in padded.values() for stage in stages for op in stage):
        return None
    return padded


def _signature(obj: Any, tensors: list[torch.Tensor], seen: dict[int, int] | None = None) -> tuple:
    """A hashable description of an ops structure: plain values as they are, each tensor's shape and dtype (the
    tensor itself appended to `tensors`), slot buffers by identity, and every object or tensor met again as a
    reference to its first meeting, so two structures with one signature share tensors alike and a graph
    captured with one reads the other's values once they are copied into its tensors."""
    seen = {} if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str, Enum, torch.device, torch.dtype)):
        return (obj,)
    if id(obj) in seen:
        return ("again", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, SlotBuffer):
        return ("slots", id(obj))
    if isinstance(obj, PerToken):  # a decode step reads the one-token entries; a prefill's expansions may be kept too
        return ("per token", obj.rows, _signature(obj.get(obj.rows), tensors, seen))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *(_signature(item, tensors, seen) for item in obj))
    if isinstance(obj, dict):
        return ("dict", *((k, _signature(v, tensors, seen)) for k, v in obj.items()))
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType, types.MethodType, types.ModuleType)):
        return (type(obj).__qualname__, *((k, _signature(v, tensors, seen)) for k, v in vars(obj).items()))
    return ("object", id(obj))  # anything else (a function, a kernels backend) only matches itself
