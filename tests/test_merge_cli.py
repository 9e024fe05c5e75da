"""`hub merge`: a new registry version whose manifest lineage records exact parents, method and parameters."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from typer.testing import CliRunner

from helpers import save_peft_adapter, tiny_llama
from hub.artifact import read_adapter
from hub.cli import app
from hub.merge import lora_modules, merge
from hub.merge_spec import MergeSpec
from hub.registry import Registry

runner = CliRunner()


def hub(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def registry(tmp_path, hub_home, tiny_llama_dir) -> Registry:
    """task-a@1.0.0 and task-b@1.0.0 (tagged stable), LoRAs of one rank pushed against a tiny Llama."""
    base = tiny_llama()
    for i, name in enumerate(("task-a", "task-b")):
        folder = save_peft_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
                                   tmp_path / name, seed=i + 1)
        result = hub("push", str(folder), "--name", name, "--version", "1.0.0", "--base-model", str(tiny_llama_dir))
        assert result.exit_code == 0, result.output
    assert hub("tag", "task-b@1.0.0", "stable").exit_code == 0
    return Registry()


def manifest(ref: str) -> dict:
    result = hub("show", ref, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_merge_writes_version_with_lineage(registry):
    result = hub("merge", "task-a", "task-b@stable", "--method", "ties", "--weights", "0.6,0.4", "--density", "0.5",
                 "--name", "both", "--version", "1.0.0")
    assert result.exit_code == 0, result.output
    merged = manifest("both@1.0.0")
    parents = [registry.resolve("task-a@1.0.0"), registry.resolve("task-b@1.0.0")]
    assert merged["lineage"]["parents"] == ["task-a@1.0.0", "task-b@1.0.0"]  # tags and bare names resolved
    assert merged["lineage"]["merge"] == {
        "parents": [{"ref": m.ref, "sha256": m.sha256} for m in parents],
        "method": "ties", "weights": [0.6, 0.4], "density": 0.5, "majority_sign": "total",
    }
    assert merged["technique"] == "lora" and merged["base_model"]["fingerprint"]  # fit checked against the base
    # the stored files are exactly hub.merge's result on the parents
    expected = merge([read_adapter(registry.materialize(m)) for m in parents],
                     MergeSpec("ties", (0.6, 0.4), density=0.5))
    stored = read_adapter(registry.materialize(registry.resolve("both@1.0.0")))
    assert stored.tensors.keys() == expected.tensors.keys()
    assert all(torch.equal(stored.tensors[k], expected.tensors[k]) for k in stored.tensors)


def test_merge_is_reproducible_from_its_lineage(registry):
    args = ["task-a@1.0.0", "task-b@1.0.0", "--method", "dare_ties", "--density", "0.3", "--seed", "5"]
    for version in ("1.0.0", "1.0.1"):
        result = hub("merge", *args, "--name", "dare", "--version", version)
        assert result.exit_code == 0 and f"dare@{version}" in result.output, result.output
    first, second = manifest("dare@1.0.0"), manifest("dare@1.0.1")
    assert first["sha256"] == second["sha256"]  # same parents + parameters + seed -> same files
    assert first["lineage"]["merge"]["seed"] == 5
    assert hub("merge", *args[:-1], "6", "--name", "dare", "--version", "1.0.2").exit_code == 0
    assert manifest("dare@1.0.2")["sha256"] != first["sha256"]


def test_task_negation_and_svd_rank(registry):
    result = hub("merge", "task-a", "task-b", "--method", "svd", "--weights", "-1,1", "--svd-rank", "2",
                 "--name", "diff", "--version", "0.1.0")
    assert result.exit_code == 0, result.output
    merged = manifest("diff@0.1.0")
    assert merged["hyperparams"]["r"] == 2 and merged["lineage"]["merge"]["weights"] == [-1.0, 1.0]
    single = hub("merge", "task-a", "--method", "linear", "--weights=-1", "--name", "not-a", "--version", "1.0.0")
    assert single.exit_code == 0, single.output
    negated = lora_modules(read_adapter(registry.materialize(registry.resolve("not-a@1.0.0"))))
    original = lora_modules(read_adapter(registry.materialize(registry.resolve("task-a@1.0.0"))))
    assert sorted(negated) == sorted(original)
    for path, module in original.items():  # task negation: the delta, sign flipped
        torch.testing.assert_close(negated[path].delta(), -module.delta(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("args,message", [
    (["task-a", "task-b", "--method", "ties"], "needs a density"),
    (["task-a", "task-b", "--method", "linear", "--weights", "1,x"], "comma-separated numbers"),
    (["task-a", "task-b", "--method", "linear", "--weights", "1,2,3"], "3 weights given for 2 adapters"),
    (["task-a", "nope", "--method", "linear"], "nope"),
    (["task-a", "task-b", "--method", "linear", "--density", "0.5"], "density does not apply"),
])
def test_refusals_write_nothing(registry, args, message):
    result = hub("merge", *args, "--name", "bad", "--version", "1.0.0")
    assert result.exit_code == 1 and message in result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert [m.ref for m in registry.list()] == ["task-a@1.0.0", "task-b@1.0.0"]


def test_refuses_adapters_for_different_bases(registry, tmp_path):
    other_base = tmp_path / "wider"
    tiny_llama(hidden_size=96).save_pretrained(other_base)
    folder = save_peft_adapter(tiny_llama(hidden_size=96), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                               tmp_path / "wide")
    assert hub("push", str(folder), "--name", "wide", "--version", "1.0.0", "--base-model", str(other_base)).exit_code == 0
    result = hub("merge", "task-a", "wide", "--method", "cat", "--name", "bad", "--version", "1.0.0")
    assert result.exit_code == 1 and result.output.startswith("error: ") and "different base models" in result.output
    assert "bad" not in {m.name for m in registry.list()}


def test_one_base_under_two_names_is_the_same_base(registry, tmp_path, tiny_llama_dir):
    """Adapters trained the ordinary way on two copies of one base (PEFT records each folder's path in
    base_model_name_or_path): one architecture fingerprint, so they merge, whatever the id strings say."""
    import shutil

    from transformers import AutoModelForCausalLM

    copy = shutil.copytree(tiny_llama_dir, tmp_path / "same-llama-elsewhere")
    for name, base in (("here", tiny_llama_dir), ("there", copy)):
        model = AutoModelForCausalLM.from_pretrained(base)
        folder = save_peft_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / name)
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
        pushed = hub("push", str(folder), "--name", name, "--version", "1.0.0", "--base-model", str(base))
        assert pushed.exit_code == 0, pushed.output
    result = hub("merge", "here", "there", "--method", "linear", "--name", "both-ids", "--version", "1.0.0")
    assert result.exit_code == 0, result.output


def test_adapters_touching_different_modules_merge(registry, tmp_path, tiny_llama_dir):
    """Their registry fingerprints differ (they cover the touched modules), yet they share the base."""
    folder = save_peft_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj", "o_proj"]), tmp_path / "c")
    assert hub("push", str(folder), "--name", "task-c", "--version", "1.0.0", "--base-model", str(tiny_llama_dir)
               ).exit_code == 0
    result = hub("merge", "task-a", "task-c", "--method", "cat", "--name", "ac", "--version", "1.0.0")
    assert result.exit_code == 0, result.output
    assert manifest("ac@1.0.0")["target_modules"] == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_existing_version_is_not_overwritten(registry):
    before = manifest("task-a@1.0.0")
    result = hub("merge", "task-a", "task-b", "--method", "cat", "--name", "task-a", "--version", "1.0.0")
    assert result.exit_code == 1 and result.output.startswith("error: ") and "already exists" in result.output
    assert manifest("task-a@1.0.0") == before and before["lineage"]["parents"] == []
