"""hub.checkpoint: adapter keys -> base modules, fit checks against a model or a bare config, fingerprints."""
from __future__ import annotations

import pytest
import torch
from helpers import save_bitfit_adapter, save_peft_adapter, tiny_llama
from peft import IA3Config, LoraConfig, PromptTuningConfig

from hub.artifact import Adapter, ArtifactError, Technique, read_adapter
from hub.checkpoint import check_fits, fingerprint, module_tensors


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_lora_keys_map_to_module_paths(base, tmp_path):
    adapter = read_adapter(save_peft_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                              lora_bias=True), tmp_path))
    tensors = module_tensors(adapter)
    assert sorted(tensors) == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]
    q = tensors["model.layers.0.self_attn.q_proj"]
    assert sorted(q) == ["lora_A", "lora_B", "lora_bias"] and q["lora_A"].shape == (4, 64) and q["lora_B"].shape == (64, 4)
    assert set(dict(base.named_modules())) >= set(tensors)


def test_ia3_bitfit_prompt_keys(base, tmp_path):
    ia3 = module_tensors(read_adapter(save_peft_adapter(
        base, IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"]), tmp_path / "i")))
    assert ia3["model.layers.1.mlp.up_proj"]["ia3_l"].shape == (1, 64)
    assert ia3["model.layers.1.self_attn.k_proj"]["ia3_l"].shape == (32, 1)
    bitfit = module_tensors(read_adapter(save_bitfit_adapter(tmp_path / "b", {"lm_head": torch.zeros(128)})))
    assert list(bitfit) == ["lm_head"] and list(bitfit["lm_head"]) == ["bias"]
    prompt = module_tensors(read_adapter(save_peft_adapter(
        base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path / "p")))
    assert prompt[""]["prompt_embeddings"].shape == (3, 64)


def test_check_fits_takes_a_model_or_a_bare_config(base, tmp_path):
    adapter = read_adapter(save_peft_adapter(base, LoraConfig(r=4, target_modules=["v_proj"]), tmp_path))
    touched = check_fits(adapter, base)
    assert touched == {"model.layers.0.self_attn.v_proj": (32, 64), "model.layers.1.self_attn.v_proj": (32, 64)}
    assert check_fits(adapter, base.config) == touched
    narrow = tiny_llama(num_key_value_heads=4)  # v_proj 64 -> 64: lora_B no longer fits
    with pytest.raises(ArtifactError, match=r"model\.layers\.0\.self_attn\.v_proj.*lora_B has shape \(32, 4\)"):
        check_fits(adapter, narrow.config)
    with pytest.raises(ArtifactError, match="holds no tensors"):  # else it would load as a no-op under its name
        check_fits(Adapter(Technique.LORA, adapter.config, {}), base)


def test_a_model_is_walked_once_for_every_check_against_it(base, tmp_path, monkeypatch):
    """A server checks each adapter it loads against one base: the base's modules are read once, not per check,
    and a check after the runtime wraps a module (keeping it as base_layer) answers as before."""
    from torch import nn

    adapter = read_adapter(save_peft_adapter(base, LoraConfig(r=4, target_modules=["v_proj"]), tmp_path))
    model = tiny_llama()
    walks = []
    walk = model.named_modules
    monkeypatch.setattr(model, "named_modules", lambda *a, **k: walks.append(1) or walk(*a, **k))
    touched = check_fits(adapter, model)
    layer = model.model.layers[0].self_attn

    class Wrapper(nn.Module):
        def __init__(self, base_layer: nn.Module):
            super().__init__()
            self.base_layer = base_layer

    layer.v_proj = Wrapper(layer.v_proj)
    assert [check_fits(adapter, model) for _ in range(3)] == [touched] * 3
    assert len(walks) == 1
    assert check_fits(adapter, tiny_llama()) == touched  # another model: its own table

def test_fingerprint_depends_on_architecture_and_touched_shapes(base):
    touched = {"model.layers.0.self_attn.v_proj": (32, 64)}
    fp = fingerprint(base.config, touched)
    assert len(fp) == 64 and fp == fingerprint(base.config.to_dict(), dict(touched))
    assert fp != fingerprint(tiny_llama(num_hidden_layers=3).config, touched)
    assert fp != fingerprint(base.config, {"model.layers.0.self_attn.v_proj": (64, 64)})
    assert fp != fingerprint(base.config, {**touched, "model.layers.1.self_attn.v_proj": (32, 64)})
    # fields that do not change the architecture do not change it
    other = tiny_llama()
    other.config.name_or_path = "elsewhere"
    assert fingerprint(other.config, touched) == fp


def test_unexpected_tensor_key_is_refused(tmp_path):
    folder = save_bitfit_adapter(tmp_path / "b", {"model.layers.0.mlp.up_proj": torch.zeros(128)})
    adapter = read_adapter(folder)
    adapter.tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ArtifactError, match="unexpected tensor key 'model.layers.0.mlp.up_proj.weight'"):
        module_tensors(adapter)



def test_fitted_fingerprint_is_what_a_push_records_and_refuses_a_misfit(base, tmp_path):
    """One helper for the push (a bare config) and the load (the model): same fit check, same fingerprint."""
    from hub.checkpoint import fitted_fingerprint

    adapter = read_adapter(save_peft_adapter(base, LoraConfig(r=4, target_modules=["v_proj"]), tmp_path))
    fp = fitted_fingerprint(adapter, base)
    assert fp == fitted_fingerprint(adapter, base.config) == fingerprint(base.config, check_fits(adapter, base))
    with pytest.raises(ArtifactError, match=r"model\.layers\.1\.self_attn\.v_proj.*does not exist"):
        fitted_fingerprint(adapter, tiny_llama(num_hidden_layers=1))
