"""CUDA graphs for the decode step: a steady batch's step replayed as one graph instead of hundreds of launches.

A decode step of a small model on a large GPU is bound by the host: Python in every module and a kernel launch
per op. A CUDA graph records the step's kernels once and replays them with one call. A graph reads fixed
addresses, so what a step changes lives in static tensors written before each replay: the new tokens, their
positions, the attention mask over the cache's fixed columns and the column the new token's keys and values go
to (runtime/kvcache.py `static_writes`: the cache's buffers are written in place, their addresses survive joins
and leaves while they have room). A graph also bakes in the batch's ops (which row reads which adapter slot),
so one is captured per batch composition (the rows' plans) and cache geometry, once that
composition has run `CAPTURE_AFTER` steps eagerly: rows joining or leaving change it, and a capture costs
about two eager steps. A step the graphs cannot take (a prefill, a cache that is not in fixed buffers or has
no room, a composition not yet steady) runs eagerly, unchanged.

Captured graphs are dropped when an adapter is installed or unloaded (a slot they read may now hold another
adapter) and not replayed after a slot buffer grew (they read its old tensor, which each graph keeps alive: an
adapter prepared in another thread may grow a buffer while a replay is on its way). `mode` "emulate" runs the same
static-buffer path eagerly on any device, replaying by running the step again: how the bookkeeping is tested
where there is no GPU.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from runtime import kvcache
from runtime.techniques.slots import SlotBuffer

log = logging.getLogger(__name__)

MODES = ("auto", "off", "emulate")
CAPTURE_AFTER = 2  # eager steps of one composition before it is captured: a composition that lasts pays it back
KEPT = 8  # graphs kept (least recently used dropped): a batch alternates between few compositions at a time
_SEEN_KEPT = 64  # compositions counted towards CAPTURE_AFTER


@dataclass(eq=False)
class _Graph:
    """One captured step: its static inputs, its output, what it reads that must stay alive, and the replay."""

    ids: torch.Tensor  # (rows, 1)
    positions: torch.Tensor  # (rows, 1)
    mask: torch.Tensor  # (rows, 1, 1, stop - start), additive: 0 where attended, the dtype's minimum elsewhere
    writes: kvcache.StaticWrites
    logits: torch.Tensor  # (rows, 1, vocab), written by each replay
    replay: Callable[[], None]
    holds: Any  # what the graph reads and nothing else keeps alive: the ops (index tensors), the slot buffers' tensors


class DecodeGraphs:
    """The captured decode steps of one engine; used under the engine's lock."""

    def __init__(self, device: torch.device, mode: str | None = None):
        mode = mode or os.environ.get("HUB_CUDA_GRAPHS", "auto")
        if mode not in MODES:
            raise ValueError(f"graphs: HUB_CUDA_GRAPHS must be one of {', '.join(MODES)}, got {mode!r}")
        self.enabled = mode == "emulate" or (mode == "auto" and device.type == "cuda")
        self.emulated = mode == "emulate"
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self._refused: set[tuple] = set()  # compositions whose capture failed: they run eagerly
        self._pool = torch.cuda.graph_pool_handle() if self.enabled and not self.emulated else None
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        """Forget every graph (an adapter was installed or unloaded)."""
        self._graphs.clear()
        self._seen.clear()
        self._refused.clear()

    def decode(self, composition: tuple, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               dtype: torch.dtype, cache: Any, holds: Callable[[], Any], forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]
               ) -> torch.Tensor | None:
        """The step's logits (rows, 1, vocab) from a graph, or None where the caller runs it eagerly.

        `mask` is the step's 2-D attention mask over the cache's live columns and the new one; `forward(inputs)`
        runs the model on those inputs with the step's ops in place and returns its logits (the warm-up and the
        capture call it); what `holds()` returns at a capture is kept alive as long as the graph; `dtype` is the
        model's."""
        if not self.enabled or cache is None:
            return None
        where = kvcache.geometry(cache)
        if where is None or mask.shape[1] != where.end - where.start + 1:
            return None
        key = (composition, where.rows, where.start, where.stop, where.addresses, SlotBuffer.growths)
        graph = self._graphs.get(key)
        if key in self._refused:
            return None
        if graph is None:
            seen = self._seen.pop(key, 0) + 1
            self._seen[key] = seen
            while len(self._seen) > _SEEN_KEPT:
                self._seen.popitem(last=False)
            if seen <= CAPTURE_AFTER:
                return None
            try:
                graph = self._capture(key, where, ids, positions, mask, dtype, cache, holds, forward)
            except RuntimeError as e:  # an op that syncs with the host cannot be captured: this batch runs eagerly
                log.warning("graphs: capturing a decode step failed, it runs eagerly: %s", e)
                self._refused.add(key)
                return None
        else:
            self._graphs.move_to_end(key)
            _fill(graph, ids, positions, mask, where.end)
            graph.replay()
        self.replays += 1
        kvcache.advance(cache)
        return graph.logits.clone()  # the next replay overwrites the static output

    def _capture(self, key: tuple, where: kvcache.Geometry, ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, dtype: torch.dtype, cache: Any, holds: Callable[[], Any],
                 forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> _Graph:
        """Capture the step (running it once: the caller's step is done when this returns)."""
        static = kvcache.StaticWrites(torch.zeros(1, dtype=torch.long, device=ids.device), where.stop)
        # additive, in the model's dtype, as every attention implementation reads a 4-D mask handed to it
        attend = torch.zeros(where.rows, 1, 1, where.stop - where.start, dtype=dtype, device=ids.device)
        inputs = {"input_ids": ids.clone(), "position_ids": positions.clone(), "attention_mask": attend}

        def step() -> torch.Tensor:
            with kvcache.static_writes(cache, static):
                return forward(inputs)

        graph = _Graph(inputs["input_ids"], inputs["position_ids"], attend, static, ids.new_empty(0),
                       lambda: None, holds())
        _fill(graph, ids, positions, mask, where.end)
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


def _fill(graph: _Graph, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, column: int) -> None:
    """Write one step's inputs into a graph's static tensors."""
    graph.ids.copy_(ids)
    graph.positions.copy_(positions)
    graph.mask.fill_(torch.finfo(graph.mask.dtype).min)
    graph.mask[:, 0, 0, :mask.shape[1]].masked_fill_(mask.bool(), 0)
    graph.writes.column.fill_(column)
