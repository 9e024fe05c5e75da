"""Which base model a push records: the hub's prepared folder of an embedded base (the path `hub base prepare`
prints, which PEFT writes into an adapter trained on it), and any folder with its fingerprint, record the
embedded model's canonical id, so listing by base and `hub merge` treat them as the base they are."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from peft import LoraConfig

from hub import basemodel
from helpers import save_peft_adapter, tiny_llama
from tests.test_cli_registry import hub, one_line_error

TINY = "tiny-base"
TINY_ID = "test/tiny-base"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A hub home with a tiny model prepared as an embedded base would be (folder + checksum record)."""
    home = tmp_path / "home"
    monkeypatch.setitem(basemodel.EMBEDDED, TINY, basemodel.EmbeddedModel(TINY, "no_such_package", "x.gguf", TINY_ID))
    prepared = home / "models" / TINY
    tiny_llama().save_pretrained(prepared)
    (prepared / basemodel.CHECKSUM_FILE).write_text(json.dumps(basemodel._folder_checksums(prepared)))
    return home


def _lora_on(base_folder: Path, out: Path, seed: int = 1) -> Path:
    """A LoRA trained the ordinary way on a base loaded from a folder: PEFT records that folder."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    folder = save_peft_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), out, seed=seed)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)
    return folder


def _base_id(home: Path, ref: str) -> str:
    return json.loads(hub("show", ref, "--json", home=home).stdout)["base_model"]["id"]


def test_prepared_folder_and_same_fingerprint_record_the_canonical_id(home, tmp_path):
    prepared = home / "models" / TINY
    copy = Path(shutil.copytree(prepared, tmp_path / "elsewhere" / "my-copy"))
    (copy / basemodel.CHECKSUM_FILE).unlink()
    deeper = tmp_path / "deeper"
    tiny_llama(num_hidden_layers=3).save_pretrained(deeper)

    hub("push", _lora_on(prepared, tmp_path / "a"), "--name", "a", "--version", "1.0.0", home=home)
    hub("push", _lora_on(copy, tmp_path / "c", seed=2), "--name", "c", "--version", "1.0.0", home=home)
    hub("push", _lora_on(prepared, tmp_path / "b", seed=3), "--name", "b", "--version", "1.0.0",
        "--base-model", TINY, home=home)
    hub("push", _lora_on(deeper, tmp_path / "d", seed=4), "--name", "d", "--version", "1.0.0", home=home)
    assert [_base_id(home, n) for n in "abcd"] == [TINY_ID, TINY_ID, TINY_ID, str(deeper.resolve())]

    listed = json.loads(hub("list", "--base-model", TINY, "--json", home=home).stdout)
    assert [m["name"] for m in listed] == ["a", "b", "c"]
    assert [m["name"] for m in json.loads(hub("list", "--base-model", prepared, "--json", home=home).stdout)] == \
        ["a", "b", "c"]

    out = hub("merge", "a", "b", "--method", "linear", "--name", "ab", "--version", "1.0.0", home=home).stdout
    assert out.startswith("merged a@1.0.0 + b@1.0.0 -> ab@1.0.0") and _base_id(home, "ab") == TINY_ID
    one_line_error(hub("merge", "a", "d", "--method", "linear", "--name", "ad", "--version", "1.0.0", home=home,
                       ok=False), "made for different base models (a@1.0.0, d@1.0.0")


def _run_hub(*args: str, **env: str):
    """The real CLI in a fresh process (huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT at import)."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    return subprocess.run([sys.executable, "-m", "hub", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # `hub push` as a process
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_mistyped_base_model_fails_at_once_offline_with_the_closest_name(env, tmp_path):
    """Not embedded, not a folder, not cached, and no Hub: one line suggesting the known name (the loaders
    would otherwise retry a missing hub for most of a minute)."""
    result = _run_hub("base", "generate", "hi", "--base-model", "smollm2-135M", HUB_HOME=str(tmp_path), **env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: unknown base model 'smollm2-135M'") and "not reachable" in result.stderr
    assert result.stderr.rstrip().endswith("did you mean 'smollm2-135m'?")
    result = _run_hub("base", "generate", "hi", "--base-model", "nonexistent/model", HUB_HOME=str(tmp_path), **env)
    assert result.returncode == 1 and "unknown base model 'nonexistent/model'" in result.stderr
    assert "did you mean" not in result.stderr


def test_push_refuses_a_mistyped_embedded_name(technique_adapters, tmp_path):
    home = tmp_path / "home"
    one_line_error(hub("push", technique_adapters["lora"], "--name", "x", "--version", "1.0.0", "--base-model",
                       "smollm2-135M", home=home, ok=False), "unknown base model 'smollm2-135M'; did you mean 'smollm2-135m'?")
    assert not (home / "registry.json").exists()
    out = hub("push", technique_adapters["lora"], "--name", "x", "--version", "1.0.0", "--base-model",
              "someorg/smollm2-135M", home=home).stdout  # an HF id not at hand is recorded unchecked
    assert "base model not at hand" in out
