"""Reading artifact folders: every technique reads back, and what the runtime cannot serve is refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub.artifact import ArtifactError, Technique, read_adapter, technique_of
from hub.manifest import artifact_files


@pytest.mark.parametrize("technique", ["lora", "ia3", "prompt_tuning", "bitfit", "bottleneck"])
def test_every_technique_reads_back_bit_for_bit(technique, technique_adapters):
    folder = technique_adapters[technique]
    adapter = read_adapter(folder)
    assert adapter.technique is Technique(technique)
    saved = load_file(folder / "adapter_model.safetensors")
    assert adapter.tensors.keys() == saved.keys() and all(torch.equal(adapter.tensors[k], saved[k]) for k in saved)
    assert adapter.num_parameters == sum(t.numel() for t in saved.values())


@pytest.mark.parametrize("option, value, message", [
    ("use_dora", True, "use_dora=true is not served"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("bias", "all", "LoRA bias='all' is not served"),
])
def test_unservable_peft_options_are_refused_by_name(option, value, message, technique_adapters):
    config = json.loads((technique_adapters["lora"] / "adapter_config.json").read_text())
    with pytest.raises(ArtifactError, match=message):
        technique_of({**config, option: value})


def test_servable_lora_options_are_accepted(technique_adapters):
    config = json.loads((technique_adapters["lora"] / "adapter_config.json").read_text())
    options = {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}, "lora_bias": True}
    assert technique_of({**config, **options}) is Technique.LORA


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LOHA"}, "PEFT type 'LOHA' is not served"),
    ({"peft_type": "PREFIX_TUNING"}, "not served"),
    ({"adapter_type": "compacter"}, "unknown adapter config"),
    ({"config": {"reduction_factor": 16}, "hidden_size": 64}, "must be imported first"),
    ({}, "unknown adapter config"),
])
def test_unknown_techniques_are_refused(config, message):
    with pytest.raises(ArtifactError, match=message):
        technique_of(config)


def test_empty_weights_and_non_object_config_are_refused(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["bitfit"], folder)
    save_file({}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ArtifactError, match="holds no tensors"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        read_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match="no adapter_config.json"):
        read_adapter(folder)


def test_missing_weights_file_is_refused(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["ia3"], folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="no adapter_model.safetensors"):
        read_adapter(folder)


def test_artifact_files_are_the_flat_non_hidden_files(technique_adapters, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(technique_adapters["lora"], folder)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert [p.name for p in artifact_files(folder)] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (folder / "bad name.txt").write_text("x")
    with pytest.raises(Exception, match="invalid artifact file name"):
        artifact_files(folder)
