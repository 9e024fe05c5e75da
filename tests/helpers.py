"""Helpers the tests import: tiny random base models built from a config (fast) and real adapters saved to
disk (PEFT's own save for PEFT techniques, our formats for BitFit and bottleneck)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer random Llama (hidden 64) in fp32: fast enough for every unit test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


# --- engine tests (ENGINE helper): real PEFT adapters with non-trivial weights, saved by PEFT ---

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(base, config, folder: Path, seed: int = 1, scale: float = 0.2) -> Path:
    """Wrap a copy of `base` with PEFT, randomise every adapter weight (PEFT inits LoRA B to zero and
    IA3 to ones, which would make any test pass) as `scale`·randn (IA3: 1 + 0.3·randn), save with
    save_pretrained; return the folder."""
    import copy

    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                p.copy_(1 + 0.3 * noise if "ia3_l" in name else scale * noise)
    peft_model.save_pretrained(folder)
    return Path(folder)


def save_bitfit_adapter(folder: Path, biases: dict[str, torch.Tensor]) -> Path:
    """Our BitFit format (hub/artifact.py): config with adapter_type, `<module>.bias` tensors."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"adapter_type": "bitfit", "target_modules": sorted(biases)}))
    save_file({f"{m}.bias": b.contiguous() for m, b in biases.items()}, str(folder / "adapter_model.safetensors"))
    return folder


# --- registry tests (REGISTRY helper): one small adapter per technique, for tiny_llama() ---

def save_bottleneck_adapter(folder: Path, layers: int = 2, hidden: int = 64, size: int = 8, seed: int = 3,
                            scale: float = 0.01) -> Path:
    """Our bottleneck format (hub/artifact.py): a Pfeiffer-style adapter after each layer's feed-forward block,
    weights `scale`·randn (std 1 drowned the tiny base: one token whatever the prompt)."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}.ffn_adapter"
        tensors.update({
            f"{p}.down.weight": scale * torch.randn(size, hidden, generator=gen),
            f"{p}.down.bias": scale * torch.randn(size, generator=gen),
            f"{p}.up.weight": scale * torch.randn(hidden, size, generator=gen),
            f"{p}.up.bias": scale * torch.randn(hidden, generator=gen),
        })
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"adapter_type": "bottleneck", "locations": ["ffn"], "bottleneck_size": size, "non_linearity": "relu"}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def legacy_registry(root: Path):
    """A registry whose index is one registry.json (the layout before refs/; what a repository ships):
    an empty one written first, so the registry keeps that layout."""
    from hub.registry import Registry

    root.mkdir(parents=True, exist_ok=True)
    (root / "registry.json").write_text('{"schema_version": 1, "adapters": {}}\n')
    return Registry(root)
