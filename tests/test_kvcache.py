"""runtime/kvcache.py: the KV cache layer that appends in place, against transformers' own DynamicLayer."""
from __future__ import annotations

import torch
from conftest import tiny_llama
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from runtime.kvcache import HEADROOM, GrowingLayer, new_cache


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
