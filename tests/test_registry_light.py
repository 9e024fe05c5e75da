"""Registry commands without the ML stack: `hub push` and `hub pull` check tensors from their safetensors bytes
(hub.artifact.TensorInfo) and an adapter's fit from the base's config.json (hub/base_layout.py), importing
neither torch nor transformers, and record and refuse exactly what transformers' meta model would; and the
registry commands convert their arguments without pydantic (hub.clikit.PlainValues), as Typer would."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from helpers import save_bitfit_adapter
from hub import base_layout
from hub.artifact import ArtifactError, TensorInfo, parse_tensor_infos, parse_tensors, read_adapter
from hub.checkpoint import check_fits, fingerprint, fitted_fingerprint, linear_shape
from hub.registry import Registry
from tests.test_registry import TECHNIQUES

# Runs the `hub` command in this process, then says which of the ML stack's modules it imported.
_RUN_HUB = """
import sys
from hub.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("imported:", sorted(m for m in ("torch", "transformers", "pydantic") if m in sys.modules))
sys.exit(code)
"""


def _hub_process(*args: str | Path, home: Path) -> str:
    done = subprocess.run([sys.executable, "-c", _RUN_HUB, *map(str, args)], capture_output=True, text=True,
                          env={"HUB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_push_and_pull_in_a_process_import_neither_torch_nor_transformers(technique_adapters, tmp_path):
    folders = tmp_path / "folders"
    for technique in TECHNIQUES:  # every technique's tensors and fit are checked
        shutil.copytree(technique_adapters[technique], folders / technique)
    home, other = tmp_path / "home", tmp_path / "other"
    out = _hub_process("push", *sorted(folders.iterdir()), "--name", "team/{dir}", "--version", "1.0.0",
                       "--base-model", technique_adapters["base"], home=home)
    assert out.count("pushed team/") == len(TECHNIQUES) and "fit not checked" not in out, out
    assert out.rstrip().endswith("imported: []"), out
    assert all(m.base_model.fingerprint for m in Registry(home).manifests())

    out = _hub_process("pull", "team/lora@1.0.0", "--from", home, home=other)
    assert out.startswith("pulled team/lora@1.0.0 lora") and out.rstrip().endswith("imported: []"), out


SMALL = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6)
CONFIGS = {  # the model types hub.architectures.CONFIG_LAYOUTS lists, with grouped-query attention and head_dim
    "llama": LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama-head-dim": LlamaConfig(**SMALL, num_key_value_heads=3, head_dim=16),
    "mistral": MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": Qwen2Config(**SMALL, num_key_value_heads=6),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_config_layout_lists_what_transformers_builds(kind, tmp_path):
    CONFIGS[kind].save_pretrained(tmp_path)
    layout = base_layout.read(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    assert layout.linears.keys() <= modules.keys() and layout.layers <= modules.keys()
    for path, module in modules.items():
        if path in layout.linears or path in layout.layers:
            listed = layout.module(path)
            dims = linear_shape(module)
            assert (listed.kind, listed.dims) == (type(module).__name__, dims), path
            assert listed.weight_shape == (None if dims is None else tuple(module.weight.shape)), path
        elif linear_shape(module) is not None:
            pytest.fail(f"{path} is a linear layer the layout does not list")
    embeddings = model.get_input_embeddings()
    assert layout.embedding == (next(n for n, m in modules.items() if m is embeddings), tuple(embeddings.weight.shape))
    assert fingerprint(layout.config, {}) == fingerprint(config, {})


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_a_push_records_the_fingerprint_transformers_gives(technique, technique_adapters):
    base = technique_adapters["base"]
    light = read_adapter(technique_adapters[technique], shapes_only=True)
    full = read_adapter(technique_adapters[technique])
    assert fitted_fingerprint(light, base_layout.read(base)) == fitted_fingerprint(full, AutoConfig.from_pretrained(base))


def test_a_misfit_is_refused_in_the_same_words(technique_adapters, tmp_path):
    """A LoRA for hidden size 64 against a base of hidden size 48: the layout says what the meta model says."""
    CONFIGS["llama"].save_pretrained(tmp_path)
    adapter = read_adapter(technique_adapters["lora"], shapes_only=True)
    with pytest.raises(ArtifactError) as light:
        check_fits(adapter, base_layout.read(tmp_path))
    with pytest.raises(ArtifactError) as full:
        check_fits(adapter, AutoConfig.from_pretrained(tmp_path))
    assert str(light.value) == str(full.value) and "lora_A has shape (4, 64), expected (r, 48)" in str(light.value)


@pytest.mark.parametrize("module, message", [
    ("model.layers.0.input_layernorm", "module 'model.layers.0.input_layernorm' is a LlamaRMSNorm, not a linear layer"),
    ("model.layers.7.mlp.down_proj", "does not exist in the base model (LlamaForCausalLM)"),
])
def test_a_module_the_layout_does_not_list_is_decided_by_transformers(module, message, technique_adapters, tmp_path):
    folder = save_bitfit_adapter(tmp_path / "bitfit", {module: torch.zeros(64)})
    layout = base_layout.read(technique_adapters["base"])
    with pytest.raises(base_layout.Unmapped):
        check_fits(read_adapter(folder, shapes_only=True), layout)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        Registry(tmp_path / "home").push(folder, "b", "1.0.0", base_model=str(technique_adapters["base"]))


def test_a_config_the_layout_cannot_read_is_left_to_transformers(tmp_path):
    CONFIGS["llama"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert base_layout.layout({**config, "model_type": "gpt2"}) is None
    assert base_layout.layout({k: v for k, v in config.items() if k != "num_key_value_heads"}) is None
    assert base_layout.layout({**config, "hidden_size": 48.0}) is None
    (tmp_path / "config.json").write_text("{")
    assert base_layout.read(tmp_path) is None


VALUES = [0.0, -0.0, 1.5, -2.0, 1e-40, 1e-300, 65504.0, 3e38, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_values_are_told_from_the_bytes_as_torch_tells_them(dtype, tmp_path):
    """Every value alone (subnormals, the largest finite ones, infinities, NaN), also at an unaligned offset."""
    for value in VALUES:
        tensor = torch.tensor([[1.0, value]], dtype=torch.float64).to(dtype)
        save_file({"x": tensor}, str(tmp_path / "w.safetensors"))
        data = bytearray((tmp_path / "w.safetensors").read_bytes())
        info, loaded = parse_tensor_infos(data, "w")["x"], parse_tensors(bytearray(data), "w")["x"]
        assert (info.dtype, info.shape, info.numel()) == (str(dtype).removeprefix("torch."), (1, 2), 2)
        unaligned = TensorInfo(info.dtype, info.shape, memoryview(b"\0" + bytes(info.data))[1:])
        assert info.finite() == unaligned.finite() == bool(torch.isfinite(loaded).all()), (dtype, value)


def test_registry_commands_start_without_pydantic(technique_adapters, tmp_path):
    home = tmp_path / "home"
    Registry(home).push(technique_adapters["lora"], "team/lora", "1.0.0")
    for args in (["show", "team/lora@1.0.0"], ["list", "--limit", "20"], ["tag", "team/lora@1.0.0", "stable"]):
        out = _hub_process(*args, "--registry", home, home=home)
        assert "team/lora" in out and out.rstrip().endswith("imported: []"), (args, out)


def test_a_push_naming_the_embedded_base_reads_its_checked_config_alone(technique_adapters, hub_home):
    """Only config.json of the prepared folder is hashed (against the folder's checksum record) and read; the
    weights are not (a damaged weights file is left for the server's load to find and re-prepare)."""
    import hashlib

    from hub import basemodel

    folder = basemodel.prepared_dir("smollm2-135m")
    folder.mkdir(parents=True)
    config = (technique_adapters["base"] / "config.json").read_bytes()
    (folder / "config.json").write_bytes(config)
    (folder / "model.safetensors").write_bytes(b"damaged weights")
    (folder / basemodel.CHECKSUM_FILE).write_text(json.dumps(
        {"config.json": hashlib.sha256(config).hexdigest(), "model.safetensors": "0" * 64}))
    manifest = Registry().push(technique_adapters["lora"], "team/lora", "1.0.0", base_model="smollm2-135m")
    adapter = read_adapter(technique_adapters["lora"], shapes_only=True)
    assert manifest.base_model.id == basemodel.EMBEDDED["smollm2-135m"].hf_id
    assert manifest.base_model.fingerprint == fitted_fingerprint(adapter, base_layout.read(technique_adapters["base"]))
    assert (folder / "model.safetensors").read_bytes() == b"damaged weights"  # neither read nor re-prepared
    (folder / "config.json").write_bytes(config.replace(b"64", b"65"))
    assert basemodel.prepared_file("smollm2-135m", "config.json") is None  # a config its record does not name
    assert basemodel.prepared_file("smollm2-135m", "tokenizer.json") is None
