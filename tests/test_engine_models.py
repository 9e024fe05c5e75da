"""Other families (Qwen2, GPT-2 Conv1D), bf16, and adapters or plans that must be refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import LLAMA_TARGETS, save_bitfit_adapter, save_peft_adapter, tiny_llama
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from hub.artifact import ArtifactError, read_adapter
from runtime.engine import Engine
from runtime.plan import AdapterUse, PlanError, RowPlan

pytestmark = pytest.mark.slow  # several model architectures built and compared with PEFT

ROWS = [[5, 9, 17, 33, 4, 81, 12], [7, 7, 100, 3], [44, 12, 90, 61, 70, 8, 19, 27, 3]]


def one(key: str, weight: float = 1.0) -> RowPlan:
    return RowPlan((AdapterUse(key, weight),))


def batched(engine: Engine, plans: list[RowPlan]) -> list[torch.Tensor]:
    width = max(len(r) for r in ROWS)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in ROWS], device=engine.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ROWS], device=engine.device)
    logits, _ = engine.forward(ids, mask, plans)
    return [logits[i, width - len(r):].float() for i, r in enumerate(ROWS)]


def alone(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -len(tokens):].float()


def check_rows(base, engine, folders: dict, plans_keys: list[str | None], tol: float, effect: float = 10) -> None:
    got = batched(engine, [one(k) if k else RowPlan() for k in plans_keys])
    for key, tokens, logits in zip(plans_keys, ROWS, got):
        ref_model = PeftModel.from_pretrained(copy.deepcopy(base), folders[key]).eval() if key else base
        ref = alone(ref_model, tokens)
        assert (logits - ref).abs().max() <= tol, (key, (logits - ref).abs().max())
        if key:  # the adapter changes the output by far more than the tolerance: the check can fail
            assert (ref - alone(base, tokens)).abs().max() > effect * tol


def check_rows_bf16(base32, engine, folders: dict, plans_keys: list[str | None], fraction: float = 0.05) -> None:
    """bf16 rows against PEFT in float32: each adapter row's error stays below `fraction` of that row's adapter
    effect (max |ref - base|), so an adapter applied 15 % too weakly fails; a base row, within bf16 rounding."""
    got = batched(engine, [one(k) if k else RowPlan() for k in plans_keys])
    for key, tokens, logits in zip(plans_keys, ROWS, got):
        plain = alone(base32, tokens)
        if key is None:
            assert (logits - plain).abs().max() <= 3e-2, (key, (logits - plain).abs().max())
            continue
        ref = alone(PeftModel.from_pretrained(copy.deepcopy(base32), folders[key]).eval(), tokens)
        error, effect = (logits - ref).abs().max(), (ref - plain).abs().max()
        assert error <= fraction * effect, (key, float(error), float(effect))


def tiny_qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        max_position_embeddings=256)).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)).eval()


def test_qwen2_lora_ia3_prompt_and_bitfit_on_biased_projections(tmp_path):
    base = tiny_qwen2()
    folders = {
        "lora": save_peft_adapter(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS), tmp_path / "l"),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]),
                                 tmp_path / "i"),
        "prompt": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path / "p"),
    }
    bias = torch.randn(64)
    folders_bitfit = save_bitfit_adapter(tmp_path / "b", {"model.layers.0.self_attn.q_proj": bias})
    engine = Engine(copy.deepcopy(base))
    for key, folder in folders.items():
        engine.load(key, read_adapter(folder))
    engine.load("bitfit", read_adapter(folders_bitfit))
    check_rows(base, engine, folders, ["lora", "ia3", "prompt"], 1e-5)
    check_rows(base, engine, folders, ["ia3", None, "lora"], 1e-5)
    # BitFit on a projection that has its own bias: the delta adds to it
    ref_model = copy.deepcopy(base)
    with torch.no_grad():
        ref_model.model.layers[0].self_attn.q_proj.bias += bias
    got = batched(engine, [one("bitfit"), RowPlan(), one("lora")])
    assert (got[0] - alone(ref_model, ROWS[0])).abs().max() <= 1e-5


def test_gpt2_conv1d_lora_with_fan_in_fan_out_and_ia3(tmp_path):
    base = tiny_gpt2()
    folders = {
        "lora": save_peft_adapter(base, LoraConfig(r=4, lora_alpha=16, fan_in_fan_out=True,
                                                   target_modules=["c_attn", "c_proj", "c_fc"]), tmp_path / "l"),
        "lora2": save_peft_adapter(base, LoraConfig(r=8, fan_in_fan_out=True, target_modules=["c_attn"]),
                                   tmp_path / "m", seed=2),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                                                 feedforward_modules=["mlp.c_proj"]), tmp_path / "i"),
    }
    engine = Engine(copy.deepcopy(base))
    for key, folder in folders.items():
        engine.load(key, read_adapter(folder))
    check_rows(base, engine, folders, ["lora", "ia3", "lora2"], 1e-5)
    check_rows(base, engine, folders, [None, "lora", "ia3"], 1e-5)


def test_bf16_mixed_batch_matches_peft_in_bf16(tmp_path):
    base32 = tiny_llama()
    folders = {
        "lora": save_peft_adapter(base32, LoraConfig(r=8, target_modules=LLAMA_TARGETS), tmp_path / "l"),
        "ia3": save_peft_adapter(base32, IA3Config(target_modules=LLAMA_TARGETS,
                                                   feedforward_modules=["down_proj"]), tmp_path / "i"),
        "prompt": save_peft_adapter(base32, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                                    tmp_path / "p"),
        "lora_bias": save_peft_adapter(base32, LoraConfig(r=8, target_modules=LLAMA_TARGETS, lora_bias=True),
                                       tmp_path / "lb", seed=2),
        "lora8": save_peft_adapter(base32, LoraConfig(r=8, target_modules=LLAMA_TARGETS), tmp_path / "l8", seed=3),
        "lora4": save_peft_adapter(base32, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                   tmp_path / "l4", seed=4),
    }
    base = copy.deepcopy(base32).to(torch.bfloat16)
    engine = Engine(copy.deepcopy(base))
    assert engine.dtype == torch.bfloat16
    for key, folder in folders.items():
        engine.load(key, read_adapter(folder))
    # on a CPU the LoRA weights stay float32 (bf16 batched matmuls at these shapes are slower there)
    lora_site = engine._residents["lora_bias"].sites["model.layers.0.self_attn.q_proj"]
    assert [p.dtype for p in lora_site.buffer.parts] == [torch.float32] * 2
    assert lora_site.bias is not None and lora_site.bias.buffer.parts[0].dtype == torch.bfloat16  # as PEFT keeps it
    lora8 = read_adapter(folders["lora8"])  # what a memory budget reserves before a load is what the load keeps
    fp32_bytes = 4 * sum(t.numel() for t in lora8.tensors.values())
    assert engine.weights_bytes(lora8) == engine.load("lora8_again", lora8) == fp32_bytes
    check_rows_bf16(base32, engine, folders, ["lora", "ia3", "prompt"])  # one LoRA: the dense kernel
    check_rows_bf16(base32, engine, folders, ["lora", "lora_bias", "lora8"])  # one rank, every row
    check_rows_bf16(base32, engine, folders, ["lora4", "lora", None])  # two ranks: gathered rows


def test_a_base_with_tied_embeddings(tmp_path):
    """The default base ties lm_head to embed_tokens (every other tiny model here unties them): adapters on it
    serve as PEFT computes them, and BitFit on lm_head adds to the output without touching the embedding."""
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    folders = {
        "lora": save_peft_adapter(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS), tmp_path / "l", scale=0.05),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                                 tmp_path / "i"),
        "prompt": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path / "p"),
    }
    bias = 0.1 * torch.randn(128, generator=torch.Generator().manual_seed(4))
    engine = Engine(copy.deepcopy(base))
    for key, folder in folders.items():
        engine.load(key, read_adapter(folder))
    engine.load("head", read_adapter(save_bitfit_adapter(tmp_path / "b", {"lm_head": bias})))
    check_rows(base, engine, folders, ["lora", "ia3", "prompt"], 1e-5)
    got = batched(engine, [one("head"), RowPlan(), one("lora")])
    assert (got[0] - (alone(base, ROWS[0]) + bias)).abs().max() <= 1e-5
    assert (got[1] - alone(base, ROWS[1])).abs().max() <= 1e-5  # the embedding (the same tensor) is untouched


def test_ia3_feed_forward_in_one_adapter_and_attention_in_another_at_one_module(tmp_path):
    """Adapter A scales down_proj's input (feed-forward), B its output: stacked in one row they act as the base
    with W' = diag(l_B) W diag(l_A), each where it belongs."""
    from safetensors.torch import load_file

    base = tiny_llama()
    a = save_peft_adapter(base, IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
                          tmp_path / "a", seed=1)
    b = save_peft_adapter(base, IA3Config(target_modules=["down_proj"], feedforward_modules=[]), tmp_path / "b", seed=2)
    engine = Engine(copy.deepcopy(base))
    engine.load("a", read_adapter(a))
    engine.load("b", read_adapter(b))
    reference = copy.deepcopy(base)
    la, lb = (load_file(str(f / "adapter_model.safetensors")) for f in (a, b))
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            key = f"base_model.model.model.layers.{i}.mlp.down_proj.ia3_l"
            assert la[key].shape == (1, 128) and lb[key].shape == (64, 1)  # an input and an output scaling
            layer.mlp.down_proj.weight.mul_(lb[key]).mul_(la[key])
    got = batched(engine, [RowPlan((AdapterUse("a"), AdapterUse("b"))), RowPlan((AdapterUse("b"), AdapterUse("a"))),
                           one("a")])
    for row in range(2):
        assert (got[row] - alone(reference, ROWS[row])).abs().max() <= 1e-5
        assert (alone(reference, ROWS[row]) - alone(base, ROWS[row])).abs().max() > 1e-3  # the check can fail
    only_a = PeftModel.from_pretrained(copy.deepcopy(base), str(a)).eval()
    assert (got[2] - alone(only_a, ROWS[2])).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def llama_engine():
    return Engine(tiny_llama())


def refused(engine: Engine, folder, match: str) -> None:
    before = engine.resident()
    with pytest.raises(ArtifactError, match=match):
        engine.load("bad", read_adapter(folder))
    assert engine.resident() == before  # nothing half-loaded, and never served as the base


def test_adapter_for_another_shape_is_refused_naming_the_module(llama_engine, tmp_path):
    wider = tiny_llama(hidden_size=96, intermediate_size=160)
    refused(llama_engine, save_peft_adapter(wider, LoraConfig(r=4, target_modules=["v_proj"]), tmp_path / "l"),
            r"model\.layers\.0\.self_attn\.v_proj.*lora_A")
    refused(llama_engine, save_peft_adapter(wider, IA3Config(target_modules=["up_proj"], feedforward_modules=["up_proj"]),
                                            tmp_path / "i"), r"model\.layers\.0\.mlp\.up_proj.*ia3_l")
    refused(llama_engine, save_peft_adapter(wider, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                            tmp_path / "p"), "prompt_embeddings")
    refused(llama_engine, save_bitfit_adapter(tmp_path / "b", {"model.layers.1.mlp.down_proj": torch.zeros(65)}),
            r"model\.layers\.1\.mlp\.down_proj.*bias")


def test_adapter_for_missing_or_non_linear_modules_is_refused(llama_engine, tmp_path):
    refused(llama_engine, save_peft_adapter(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
                                            tmp_path / "g"), r"transformer\.h\.0\.attn\.c_attn.*does not exist")
    refused(llama_engine, save_bitfit_adapter(tmp_path / "b", {"model.layers.7.mlp.down_proj": torch.zeros(64)}),
            r"model\.layers\.7\.mlp\.down_proj.*does not exist")
    refused(llama_engine, save_bitfit_adapter(tmp_path / "n", {"model.layers.0.input_layernorm": torch.zeros(64)}),
            r"model\.layers\.0\.input_layernorm' is a LlamaRMSNorm, not a linear layer")
    refused(llama_engine, save_peft_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "e"),
            r"model\.embed_tokens")


def test_bad_plans_are_refused_by_name(llama_engine, tmp_path):
    base = tiny_llama()
    llama_engine.load("p", read_adapter(save_peft_adapter(
        base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path / "p")))
    llama_engine.load("l", read_adapter(save_peft_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "l")))
    ids, mask = torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)
    cases = [
        (RowPlan((AdapterUse("ghost"),)), "'ghost' is not loaded"),
        (RowPlan((AdapterUse("l"),), mode="mean"), "unknown mode"),
        (RowPlan((AdapterUse("l", 1.0), AdapterUse("l", -1.0)), mode="average"), "sum to 0"),
        (RowPlan((AdapterUse("l", float("nan")),)), "finite"),
        (RowPlan((AdapterUse("p", 0.5),)), "'p'.*weight 0.5"),
        (RowPlan((AdapterUse("p"), AdapterUse("l")), mode="average"), "'p'.*weight 0.5"),
    ]
    for plan, match in cases:
        with pytest.raises(PlanError, match=match):
            llama_engine.forward(ids, mask, [plan])
    with pytest.raises(PlanError, match="2 plans"):
        llama_engine.forward(ids, mask, [RowPlan(), RowPlan()])
    llama_engine.unload("l")
    with pytest.raises(PlanError, match="'l' is not loaded"):
        llama_engine.forward(ids, mask, [RowPlan((AdapterUse("l"),))])
