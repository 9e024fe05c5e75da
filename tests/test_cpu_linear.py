"""runtime/cpu_linear.py: float32 CPU linears on oneDNN compute what nn.Linear computes, in place."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from runtime import cpu_linear
from runtime.cpu_linear import OneDnnLinear, route_linears
from runtime.engine import Engine
from helpers import tiny_llama

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch build has no oneDNN")


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_routed_model_computes_the_same_logits_with_the_same_parameters():
    plain = tiny_llama()
    routed = copy.deepcopy(plain)
    assert route_linears(routed) == len(_linears(plain)) == 15  # 7 per layer x 2 + the head
    assert all(type(m) is OneDnnLinear for m in _linears(routed))
    assert routed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(routed.state_dict().values(), plain.state_dict().values()))
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = plain(ids).logits, routed(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert route_linears(routed) == 0  # already routed: nothing left to change


def test_the_op_really_runs_and_any_input_shape_works():
    layer = nn.Linear(16, 8)
    reference = copy.deepcopy(layer)
    layer.__class__ = OneDnnLinear
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    x = torch.randn(4, 5, 16)
    for inp in (x, x.transpose(0, 1), torch.randn(0, 16), torch.randn(16)):
        torch.ops.mkldnn._linear_pointwise, saved = counting, real  # count calls without changing the math
        try:
            got = layer(inp)
        finally:
            torch.ops.mkldnn._linear_pointwise = saved
        torch.testing.assert_close(got, reference(inp), rtol=1e-6, atol=1e-6)
    assert len(calls) == 4


def test_other_dtypes_and_linear_subclasses_are_left_alone():
    bf16 = tiny_llama().to(torch.bfloat16)
    assert route_linears(bf16) == 0

    class Quantized(nn.Linear):  # a subclass has its own forward (bitsandbytes, PEFT-style layers)
        pass

    model = nn.Sequential(nn.Linear(4, 4), Quantized(4, 4))
    assert route_linears(model) == 1 and type(model[1]) is Quantized


def test_a_peft_model_over_a_routed_base_equals_one_over_a_plain_base():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    plain = get_peft_model(tiny_llama(), config)
    routed = copy.deepcopy(plain)
    assert route_linears(routed) == 15 + 2 * 2 * 2  # base layers inside PEFT's wrappers, and lora_A/lora_B
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(routed(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_routed_model_moved_to_bfloat16_still_computes_like_nn_linear():
    routed, plain = tiny_llama(), tiny_llama()
    route_linears(routed)
    routed, plain = routed.to(torch.bfloat16), plain.to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(routed(ids).logits, plain(ids).logits)  # F.linear path: bit for bit


def test_engine_routes_its_float32_cpu_base():
    model = tiny_llama()
    Engine(model)
    assert all(type(m) is OneDnnLinear for m in _linears(model))
    bf16 = tiny_llama().to(torch.bfloat16)
    Engine(bf16)
    assert all(type(m) is nn.Linear for m in _linears(bf16))
