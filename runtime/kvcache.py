"""The batch's KV cache: transformers' DynamicCache with layers that append, join and drop rows in place.

transformers' DynamicLayer appends each step with `torch.cat`, copying the layer's whole cache every decode
step; `GrowingLayer` writes into buffers with HEADROOM tokens of room, and `join_rows`/`keep_rows` move only
the rows that join or follow a leaver. Sliding-window layers stay transformers' own. The design (buffers,
joins, leaves, what is never written) is described in docs/engine.md, "KV cache".
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEADROOM = 64  # tokens of room a buffer gets past what it holds when it is (re)allocated


@dataclass
class _Span:
    """The live part of a buffer: buffer[:rows, :, start:end]. `owned`: made here, so it may be written."""

    buffer: torch.Tensor | None
    rows: int = 0
    start: int = 0
    end: int = 0
    owned: bool = False

    @classmethod
    def of(cls, tensor: torch.Tensor | None) -> _Span:
        """A tensor handed in: all of it live, never written."""
        if tensor is None or tensor.dim() != 4:
            return cls(tensor)
        return cls(tensor, tensor.shape[0], 0, tensor.shape[-2])

    @property
    def tensor(self) -> torch.Tensor:
        """The buffer of a span past its layer's first write, from then on a 4-D cache tensor."""
        assert self.buffer is not None, "the cache layer has not been written"
        return self.buffer

    @property
    def live(self) -> torch.Tensor | None:
        if self.buffer is None or self.buffer.dim() != 4:
            return self.buffer
        return self.buffer[:self.rows, :, self.start:self.end]

    def moved(self, row_capacity: int, width: int) -> _Span:
        """The live part in a new buffer of `row_capacity` rows, right-aligned in `width` columns (zeros to
        its left) with HEADROOM columns of room after them."""
        live = self.tensor[:self.rows, :, self.start:self.end]
        rows, heads, filled, dim = live.shape
        # zeros, not empty: a graphed decode step (runtime/graphs.py) attends over the room too, masked, and a
        # masked column's value still meets a zero weight in the product (NaN garbage there would survive it)
        buffer = live.new_zeros(row_capacity, heads, width + HEADROOM, dim)
        buffer[:rows, :, width - filled:width] = live
        return _Span(buffer, rows, 0, width, owned=True)


class _Live:
    """`keys` / `values` of a GrowingLayer: the live part of its span; assigning a tensor replaces the span."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_span"

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer, self._slot).live

    def __set__(self, layer, value: torch.Tensor | None) -> None:
        setattr(layer, self._slot, _Span.of(value))


@dataclass
class StaticWrites:
    """How a GrowingLayer writes while a decode step is captured as a graph: the new token at column `column`
    (a tensor, set before each replay), and attention over the fixed columns [0, `stop`) of the live rows
    (the columns outside the live ones masked by the step's attention mask), for `rows` rows of the buffers."""

    column: torch.Tensor  # int64, one element
    stop: int
    rows: int  # the rows written and attended: the live ones and the step's padding rows after them


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `update` writes into preallocated room instead of concatenating."""

    keys = _Live()
    values = _Live()
    _keys_span: _Span  # what `keys` and `values` are the live parts of
    _values_span: _Span
    static: StaticWrites | None = None  # set by `static_writes` only
    # rows -> the rows a buffer holding them is made with (a graphed decode step pads its rows to a bucket:
    # runtime/graphs.py); set by `new_cache`
    room: Callable[[int], int] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static is not None:
            return (_write_at(self._keys_span, key_states, self.static),
                    _write_at(self._values_span, value_states, self.static))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys_span = _append(self._keys_span, key_states, self.room)
        self._values_span = _append(self._values_span, value_states, self.room)
        return self.keys, self.values


def _append(span: _Span, new: torch.Tensor, room: Callable[[int], int] | None) -> _Span:
    """`span` after writing `new` (rows, heads, tokens, dim) after its live part (a new buffer's rows: `room`)."""
    if span.buffer is None or span.buffer.dim() != 4:  # the first write (a prefill): keep the model's tensor
        return _Span.of(new)
    tokens = new.shape[-2]
    if not span.owned or span.end + tokens > span.buffer.shape[-2]:
        span = span.moved(max(span.buffer.shape[0], room(span.rows) if room else 0), span.end - span.start)
    span.tensor[:span.rows, :, span.end:span.end + tokens] = new
    span.end += tokens
    return span


def _write_at(span: _Span, new: torch.Tensor, static: StaticWrites) -> torch.Tensor:
    """Write `new` (rows, heads, 1, dim) at the column `static.column` names; the fixed columns attended: all of
    them up to `static.stop`, whatever the live ones (the mask says which), so rows joining or leaving, which
    move the first live column, leave a graph's shapes as they were."""
    rows = span.tensor[:static.rows]
    rows.index_copy_(2, static.column, new)
    return rows[:, :, :static.stop]


@dataclass(frozen=True)
class Geometry:
    """Where a batch's cache stands, for a graphed decode step: live rows, live columns [start, end), `stop`
    the columns every buffer has, `capacity` the rows every buffer has, and the buffers' addresses (a graph
    reads those; a move makes new ones)."""

    rows: int
    capacity: int
    start: int
    end: int
    stop: int
    addresses: tuple[int, ...]


def geometry(cache: DynamicCache) -> Geometry | None:
    """The cache's geometry when a decode step can run over fixed buffers: every layer a GrowingLayer holding
    the same rows and columns in buffers of its own with room for one more token; else None."""
    spans = []
    for layer in cache.layers:
        if not isinstance(layer, GrowingLayer) or not layer.is_initialized:
            return None
        spans += [layer._keys_span, layer._values_span]
    first = spans[0]
    if not all(s.owned and (s.rows, s.start, s.end) == (first.rows, first.start, first.end) for s in spans):
        return None
    stop = min(s.tensor.shape[-2] for s in spans)
    if first.end >= stop:
        return None
    return Geometry(first.rows, min(s.tensor.shape[0] for s in spans), first.start, first.end, stop,
                    tuple(s.tensor.data_ptr() for s in spans))


@contextmanager
def static_writes(cache: DynamicCache, static: StaticWrites) -> Iterator[None]:
    """Every layer of `cache` (a `geometry` one) writes as `static` says while this lasts."""
    layers = [layer for layer in cache.layers if isinstance(layer, GrowingLayer)]
    for layer in layers:
        layer.static = static
    try:
        yield
    finally:
        for layer in layers:
            layer.static = None


def advance(cache: DynamicCache) -> None:
    """Count the token a graphed decode step wrote into every layer (the graph ran no Python to do it)."""
    for layer in cache.layers:
        assert isinstance(layer, GrowingLayer), "only a `geometry` cache is graphed"
        layer._keys_span.end += 1
        layer._values_span.end += 1


def join_rows(layer: CacheLayerMixin, joining: CacheLayerMixin, width: int, max_rows: int) -> None:
    """Put `joining`'s rows (a prefill's cache layer) after `layer`'s, both left-padded with zeros to `width`
    columns. A GrowingLayer writes them into its buffer when it has the rows and columns, else moves once
    into a buffer with rows to spare (twice the rows, at most `max_rows`: rows x width is the memory, so a
    few long rows do not reserve a whole batch; rounded up to the layer's `room`, and moving when the rows
    outgrow their room); other layers concatenate.
    A joining row's buffer row is zeroed left of its columns: a graphed step's padding row may have written
    there (runtime/graphs.py), and a graphed step attends those columns too, masked (garbage could be NaN)."""
    new_keys, new_values = _written(joining)
    if not isinstance(layer, GrowingLayer):
        held = _columns(layer, width)
        keys, values = _written(layer)
        layer.keys = torch.cat([pad_left(keys, held, 2), pad_left(new_keys, held, 2)])
        layer.values = torch.cat([pad_left(values, held, 2), pad_left(new_values, held, 2)])
        if _is_sliding(layer):
            layer.cumulative_length = width
        return
    layer._keys_span = _join(layer._keys_span, new_keys, width, max_rows, layer.room)
    layer._values_span = _join(layer._values_span, new_values, width, max_rows, layer.room)


def _join(span: _Span, new: torch.Tensor, width: int, max_rows: int, room: Callable[[int], int] | None) -> _Span:
    rows = span.rows + new.shape[0]
    start = span.end - width
    room = room or (lambda n: n)
    if not span.owned or room(rows) > span.tensor.shape[0] or start < 0:
        span = span.moved(room(max(rows, min(2 * rows, room(max_rows)))), width)
        start = 0
    elif start < span.start:  # the running rows get zero padding in the columns they gain on the left
        span.tensor[:span.rows, :, start:span.start] = 0
    joined = span.end - new.shape[-2]
    span.tensor[span.rows:rows, :, :joined] = 0
    span.tensor[span.rows:rows, :, joined:span.end] = new
    span.rows, span.start = rows, start
    return span


def keep_rows(layer: CacheLayerMixin, keep: list[int], drop: int) -> None:
    """Keep only the rows `keep` (ascending) and drop the first `drop` columns. A GrowingLayer moves the kept
    rows up over the others inside its buffer; other layers index."""
    if not isinstance(layer, GrowingLayer) or not layer._keys_span.owned or not layer._values_span.owned:
        keys, values = _written(layer)
        index = _index(tuple(keep), keys.device)
        width = layer.get_seq_length() - drop
        first = keys.shape[-2] - _columns(layer, width)
        layer.keys = keys[index, :, first:]
        layer.values = values[index, :, first:]
        if _is_sliding(layer):
            layer.cumulative_length = width
        return
    for span in (layer._keys_span, layer._values_span):
        live = span.tensor[:, :, span.start + drop:span.end]
        move_rows(live, keep, one_by_one=live.device.type == "cpu")
        span.rows, span.start = len(keep), span.start + drop


def take_rows(cache: DynamicCache, rows: list[int]) -> DynamicCache:
    """Rows `rows` (ascending) of a prefill's cache, not yet merged or appended to, as a cache of their own: the
    cache itself when that is all of it, else views of its tensors (copies where the rows are not consecutive).
    No layer writes such tensors in place (a GrowingLayer moves a span it does not own into a buffer of its own
    at its first write), so any of its rows can join a batch in any order."""
    layers = cast("list[CacheLayerMixin]", cache.layers)  # a prefill wrote every one: each holds keys and values
    keys, _ = _written(layers[0])
    if rows == list(range(keys.shape[0])):
        return cache
    index: slice | torch.Tensor = (slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1))
                                   else _index(tuple(rows), keys.device))
    part = copy.copy(cache)
    mine_layers = [copy.copy(layer) for layer in layers]
    part.layers = list(mine_layers)
    for layer, mine in zip(layers, mine_layers):
        keys, values = _written(layer)
        mine.keys, mine.values = keys[index], values[index]
    return part


def move_rows(t: torch.Tensor, keep: list[int], one_by_one: bool) -> None:
    """Rows `keep` (ascending) of `t` moved to its first len(keep) rows, in place. One by one, each moved row is
    copied once (a CPU is bound by memory bandwidth); else in two kernels through a temporary (a GPU is bound
    by kernel launches, one per row per layer otherwise)."""
    moves = [(to, row) for to, row in enumerate(keep) if to != row]
    if not moves:
        return
    if one_by_one:
        for to, row in moves:  # to < row, in order: a row is read before anything overwrites it
            t[to].copy_(t[row])
        return
    targets, sources = zip(*moves)
    t.index_copy_(0, _index(targets, t.device), t.index_select(0, _index(sources, t.device)))


@functools.lru_cache(maxsize=8)
def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`, made once per leave rather than per layer and tensor (on a GPU each one is
    a host-to-device copy)."""
    return torch.tensor(values, device=device)


def _columns(layer: CacheLayerMixin, width: int) -> int:
    """The columns `layer` holds for a batch `width` tokens wide: all of them, or for a sliding-window layer
    (transformers' DynamicSlidingWindowLayer, whose `cumulative_length` is the batch's width) the last
    window - 1."""
    if not _is_sliding(layer):
        return width
    if not isinstance(layer, DynamicSlidingWindowLayer) or layer.record_past:
        raise NotImplementedError(f"continuous batching over a {type(layer).__name__} is not supported")
    return min(width, layer.sliding_window - 1)


def _written(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a layer that holds rows (a prefill wrote it)."""
    assert layer.keys is not None and layer.values is not None, "the cache layer has not been written"
    return layer.keys, layer.values


def _is_sliding(layer: CacheLayerMixin) -> bool:
    """Whether the layer keeps a window: every transformers layer class sets `is_sliding`, the base class
    does not declare it."""
    return getattr(layer, "is_sliding")


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `width` (itself when already that wide)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def new_cache(model: PreTrainedModel, room: Callable[[int], int] | None = None) -> DynamicCache | None:
    """An empty cache for `model`: the DynamicCache `generate()` would give it (sliding-window and other layer
    kinds stay as they are), its full-attention layers growing in place, a buffer for n rows made with at least
    `room(n)` rows; None for a model `generate()` would not give a DynamicCache (it then builds its own)."""
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.room = room
    return cache
