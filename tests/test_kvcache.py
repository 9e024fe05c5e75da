"""runtime/kvcache.py: the KV cache layer that appends in place, against transformers' own DynamicLayer."""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from runtime.kvcache import HEADROOM, GrowingLayer, join_rows, keep_rows, move_rows, new_cache


def test_growing_layer_holds_what_dynamic_layer_holds_and_writes_in_place():
    """Same keys and values after a prefill and HEADROOM + 6 single-token steps. The prefill's tensors are
    kept as given, the first step copies them into a buffer with HEADROOM of room, and the next copy comes
    when that runs out: three buffers, where DynamicLayer allocates and copies the whole cache every step."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    buffers = set()
    for tokens in [5] + [1] * (HEADROOM + 6):
        k, v = (torch.randn(2, 3, tokens, 4, generator=gen) for _ in range(2))
        given = k.clone()
        got, want = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(k, given)  # never written to
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
        buffers.add(got[0].untyped_storage().data_ptr())
    assert ours.get_seq_length() == 5 + HEADROOM + 6
    assert len(buffers) == 3


def test_setting_keys_and_values_replaces_them_and_updates_append_after():
    """What runtime/generate.py does on a join or leave (and transformers' helpers): assign new tensors."""
    layer = GrowingLayer()
    layer.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2))
    keys, values = torch.ones(1, 1, 4, 2), torch.full((1, 1, 4, 2), 2.0)
    layer.keys, layer.values = keys, values
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values) and layer.get_seq_length() == 4
    k, v = layer.update(torch.full((1, 1, 1, 2), 3.0), torch.full((1, 1, 1, 2), 4.0))
    assert k.shape == (1, 1, 5, 2) and k[0, 0, :, 0].tolist() == [1, 1, 1, 1, 3]
    assert v[0, 0, :, 0].tolist() == [2, 2, 2, 2, 4]
    layer.reset()
    assert layer.keys is None and layer.get_seq_length() == 0


def test_joins_and_leaves_hold_what_concatenation_and_indexing_hold_and_stay_in_the_buffer():
    """A batch's rows joining (prefills of other widths, left-padded with zeros) and leaving (rows from the
    middle, columns of padding dropped), with single-token steps between: a GrowingLayer holds exactly what a
    DynamicLayer holds through the same calls (concatenating and indexing). A join that fits the buffer's rows
    and columns and every leave stay in the buffer; tensors handed in are never written."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def kv(rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = (torch.randn(rows, 2, tokens, 4, generator=gen) for _ in range(2))
        handed.append((k, k.clone()))
        return k, v

    def prefill(rows: int, tokens: int) -> GrowingLayer:
        layer = GrowingLayer()
        layer.update(*kv(rows, tokens))
        return layer

    def same() -> int:
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        return ours.keys.untyped_storage().data_ptr()

    def step(n: int = 1) -> None:
        for _ in range(n):
            k, v = kv(ours.keys.shape[0], 1)
            ours.update(k, v), theirs.update(k, v)
        same()

    def join(rows: int, tokens: int) -> int:
        joining = prefill(rows, tokens)
        width = max(ours.keys.shape[-2], tokens)
        join_rows(ours, joining, width, max_rows=8), join_rows(theirs, joining, width, max_rows=8)
        return same()

    def keep(rows: list[int], drop: int) -> int:
        keep_rows(ours, rows, drop), keep_rows(theirs, rows, drop)
        return same()

    k, v = kv(3, 5)
    ours.update(k, v), theirs.update(k, v)
    step(2)  # 3 rows x 7 tokens, in a buffer of 3 rows
    buffer = join(2, 4)  # more rows than the buffer has: moved once, into one of twice the rows (<= max_rows)
    assert ours._keys_span.buffer.shape[0] == 8
    step()
    assert keep([0, 2, 3], drop=2) == buffer  # a leave from the middle and 2 columns of padding dropped
    assert join(2, 5) == buffer  # fits: written into the buffer
    assert join(1, 8) == buffer  # wider than the batch: the running rows gain zero columns on the left
    step()
    assert keep([1, 3, 4, 5], drop=0) == buffer
    assert join(1, 12) != buffer  # wider than the columns in front: moved once
    step(HEADROOM)  # past the room: moved into a larger buffer, rows for joins kept
    buffer = same()
    assert join(2, 3) == buffer
    assert keep([5], drop=0) == buffer
    assert all(torch.equal(t, copy) for t, copy in handed)


def test_a_join_reserves_twice_the_rows_not_the_whole_batch():
    """Memory is rows x width: a few long rows joined by one more must not reserve a buffer for the whole batch."""
    layer = GrowingLayer()
    layer.update(torch.zeros(2, 1, 300, 4), torch.zeros(2, 1, 300, 4))
    layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    joining = GrowingLayer()
    joining.update(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4))
    join_rows(layer, joining, 301, max_rows=32)
    assert layer.keys.shape == (3, 1, 301, 4) and layer._keys_span.buffer.shape[0] == 6


@pytest.mark.parametrize("one_by_one", [True, False])
def test_move_rows_moves_the_kept_rows_up_in_place(one_by_one):
    """Both ways of a leave's row moves (one copy per row on a CPU, two kernels on a GPU), on a strided view."""
    buffer = torch.randn(9, 2, 12, 3)
    view = buffer[:, :, 2:10]  # the live columns of a buffer
    for keep in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 5, 8], [8], [0, 1, 7]):
        want = view[keep].clone()
        move_rows(view, keep, one_by_one)
        assert torch.equal(view[:len(keep)], want)


def test_a_leave_makes_its_move_indices_once_for_all_layers():
    """The kernel way (a GPU's) moves rows with index tensors; a leave makes them once, not per layer and tensor."""
    from runtime import kvcache

    kvcache._index.cache_clear()
    views = [torch.randn(5, 2, 8, 3) for _ in range(8)]  # 4 layers x keys, values
    wants = [v[[0, 2, 4]].clone() for v in views]
    for view in views:
        move_rows(view, [0, 2, 4], one_by_one=False)
    assert all(torch.equal(v[:3], w) for v, w in zip(views, wants))
    assert kvcache._index.cache_info().misses == 2  # rows moved to, rows moved from


def test_new_cache_grows_full_attention_layers_and_keeps_sliding_ones():
    assert all(type(layer) is GrowingLayer for layer in new_cache(tiny_llama()).layers)
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=8))
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in new_cache(sliding).layers)


def test_new_cache_leaves_models_with_their_own_cache_alone():
    """Models whose generate() does not use a DynamicCache (transformers' own test) build theirs as before."""
    class CustomCacheModel(torch.nn.Module):
        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            return False

    assert new_cache(CustomCacheModel()) is None


def test_room_rounds_buffer_rows_up_and_a_joining_row_is_zeroed_left_of_its_prefill():
    """A layer with `room` (a cache made for graphed steps, runtime/graphs.py) makes buffers of the rows' bucket
    and moves when a join outgrows it; a joining row's buffer row holds zeros left of its prefill whatever was
    there (a graphed step's padding row writes into rows no live row holds, and attends every column, masked)."""
    from runtime.techniques.slots import bucket

    layer = GrowingLayer()
    layer.room = bucket
    layer.update(torch.ones(3, 1, 4, 2), torch.ones(3, 1, 4, 2))
    layer.update(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2))  # the first step moves into a buffer of its own
    span = layer._keys_span
    assert span.tensor.shape[0] == 4
    keep_rows(layer, [1, 2], 2)  # the first live columns dropped: the next joining row starts right of them
    assert span.start == 2
    span.tensor[2:] = float("nan")  # rows no live row holds: what a padding row may leave there
    joining = GrowingLayer()
    joining.update(torch.full((1, 1, 2, 2), 5.0), torch.full((1, 1, 2, 2), 5.0))
    join_rows(layer, joining, 3, max_rows=8)  # three rows: still the buffer of four
    assert layer._keys_span is span and span.rows == 3
    row = span.tensor[2, 0, :span.end, 0]
    assert row.tolist() == [0, 0, 0, 5, 5]
    joining = GrowingLayer()
    joining.update(torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
    join_rows(layer, joining, 3, max_rows=8)  # five rows outgrow the bucket of four: a buffer of eight
    assert layer._keys_span.tensor.shape[0] == 8
