"""The batch's KV cache: transformers' DynamicCache with layers that append in place.

transformers' DynamicLayer appends a step's keys and values with `torch.cat`, which copies the layer's whole
cache every decode step: per step, O(cached tokens) bytes per layer read and written again, and a fresh
allocation each time. `GrowingLayer` keeps keys and values in buffers with room for HEADROOM more tokens and
writes each step's token into them; the attention gets views of the filled part. Only when the room runs
out does a layer copy into a larger buffer (once per HEADROOM steps). A prefill's keys and values are kept as
the model made them (the first decode step copies them into a buffer with room, as a concatenation would),
so a prefill allocates nothing more than before. Anything that sets `keys`/`values` (runtime/generate.py's
joins and leaves, transformers' own helpers) just replaces the buffer; a buffer is only written past what it
holds, so tensors handed in are never written to.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 64  # tokens of room a buffer gets past what it holds when it is (re)allocated


class _Filled:
    """`keys` / `values` of a GrowingLayer: the filled part of its buffer; assigning a tensor makes it the buffer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_buffer"

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        buffer, length = getattr(layer, self._slot)
        return buffer if buffer is None or buffer.dim() != 4 else buffer[:, :, :length]

    def __set__(self, layer, value: torch.Tensor | None) -> None:
        setattr(layer, self._slot, (value, value.shape[-2] if value is not None and value.dim() == 4 else 0))


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `update` writes into preallocated room instead of concatenating."""

    keys = _Filled()
    values = _Filled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys_buffer = _append(*self._keys_buffer, key_states)
        self._values_buffer = _append(*self._values_buffer, value_states)
        return self.keys, self.values


def _append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(buffer, length) after writing `new` (rows, heads, tokens, dim) at position `length`."""
    end = length + new.shape[-2]
    if buffer.dim() != 4:  # the first write (a prefill): keep the model's tensor, no copy and no room yet
        return new, end
    if end > buffer.shape[-2]:
        rows, heads, _, dim = new.shape
        grown = new.new_empty(rows, heads, end + HEADROOM, dim)
        if length:
            grown[:, :, :length] = buffer[:, :, :length]
        buffer = grown
    buffer[:, :, length:end] = new
    return buffer, end


def new_cache(model: torch.nn.Module) -> DynamicCache | None:
    """An empty cache for `model`: the DynamicCache `generate()` would give it (sliding-window and other layer
    kinds stay as they are), its full-attention layers growing in place; None for a model `generate()` would
    not give a DynamicCache (it then builds its own)."""
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
