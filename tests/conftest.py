"""Shared fixtures: tiny random base models saved to disk, one adapter per technique, an isolated HUB_HOME; the server fixtures come in as a plugin."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import save_bitfit_adapter, save_bottleneck_adapter, save_peft_adapter, tiny_llama

pytest_plugins = ["server_support"]  # the server fixtures, for every module that asks for them

# The real default base model is prepared once into the developer's/CI's hub home by `make test`
# (`hub base prepare`); tests that use it read it from there. Everything else uses a temp HUB_HOME.
REAL_HUB_HOME = os.environ.get("HUB_HOME") or str(Path.home() / ".cache" / "adapterhub")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The kernel seam runs its torch reference unless a test asks for a backend (tests/test_kernels.py), so the
# suite pays the fused kernels' first build only there.
os.environ.setdefault("HUB_KERNELS", "reference")
# Without a GPU the Triton kernels run in Triton's interpreter (read when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A tiny Llama saved as a local HF folder (what `--base-model PATH` takes)."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def technique_adapters(tmp_path_factory) -> dict[str, Path]:
    """{"base": a tiny Llama folder, and per technique an adapter folder for it}: LoRA, IA3 and prompt
    tuning saved by PEFT; BitFit and bottleneck in our format. Read-only: copy before changing one."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("technique-adapters")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(5)
    return {
        "base": root / "base",
        "lora": save_peft_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                  root / "lora"),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                                 root / "ia3"),
        "prompt_tuning": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                                           root / "prompt_tuning"),
        "bitfit": save_bitfit_adapter(root / "bitfit", {
            f"model.layers.{i}.mlp.down_proj": 0.005 * torch.randn(64, generator=gen) for i in range(2)}),
        "bottleneck": save_bottleneck_adapter(root / "bottleneck"),
    }


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `server` (and `slow`) every test that needs the served base (directly or through `registry` /
    `start_server`): those build the served model and run a real server, so `pytest -m "not slow"` leaves the
    fast unit tests."""
    for item in items:
        if "served_base" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
            item.add_marker(pytest.mark.slow)
