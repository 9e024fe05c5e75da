"""The embedded default base model and base-model resolution."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hub import basemodel


def test_local_folder_resolves_and_loads(tiny_llama_dir, hub_home):
    assert basemodel.resolve(str(tiny_llama_dir)) == str(tiny_llama_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(basemodel.resolve(str(tiny_llama_dir)))
    assert model.config.hidden_size == 64


def test_unreachable_hub_id_fails_clearly(hub_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(basemodel.BaseModelError, match="not a local folder"):
        basemodel.load("no-such-org/no-such-model")


def test_tampered_prepared_folder_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_HOME", str(tmp_path))
    folder = basemodel.prepared_dir()
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"abc")
    (folder / basemodel.CHECKSUM_FILE).write_text(json.dumps(basemodel._folder_checksums(folder)))
    assert basemodel._verified(folder)
    (folder / "model.safetensors").write_bytes(b"abd")  # half-written or corrupted
    assert not basemodel._verified(folder)
    (folder / basemodel.CHECKSUM_FILE).unlink()
    assert not basemodel._verified(folder)


@pytest.mark.slow
def test_default_base_model_prepares_once_and_answers_offline(real_hub_home, monkeypatch):
    monkeypatch.setenv("HUB_HOME", real_hub_home)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "hub", "base", "generate", "What is the capital of France?", "--max-new-tokens", "16"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    # prepared exactly once: the folder verifies, and preparing again does not rewrite it
    folder = basemodel.prepared_dir()
    assert basemodel._verified(folder)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    basemodel.prepare_embedded()
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
