"""Shared fixtures: tiny random base models built from a config (fast), and an isolated HUB_HOME."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The real default base model is prepared once into the developer's/CI's hub home by `make test`
# (`hub base prepare`); tests that use it read it from there. Everything else uses a temp HUB_HOME.
REAL_HUB_HOME = os.environ.get("HUB_HOME") or str(Path.home() / ".cache" / "adapterhub")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty HUB_HOME for one test."""
    home = tmp_path / "hubhome"
    monkeypatch.setenv("HUB_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def real_hub_home() -> str:
    return REAL_HUB_HOME


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


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A tiny Llama saved as a local HF folder (what `--base-model PATH` takes)."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path
