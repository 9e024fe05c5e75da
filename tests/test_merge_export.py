"""`export_merged` / `hub export --merged`: the adapter folded into a copy of the base; transformers loads the
folder with from_pretrained and its logits equal the unmerged adapter's (PEFT for LoRA/IA3, the BitFit formula)."""
from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import LLAMA_TARGETS, save_bitfit_adapter, save_bottleneck_adapter, save_peft_adapter, tiny_llama
from hub.artifact import ArtifactError, read_adapter
from hub.cli import app
from hub.errors import HubError
from hub.merge_base import export_merged

pytestmark = pytest.mark.slow  # merges folded into base models and compared

IDS = torch.tensor([[1, 5, 9, 33, 70, 4, 100, 7], [1, 64, 3, 3, 12, 90, 41, 2]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def biased_llama():
    """A tiny Llama with non-zero attention biases (so IA3 and lora_bias have biases to act on)."""
    model = tiny_llama(attention_bias=True)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base-bias"
    biased_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True, lora_bias=True),
    IA3Config(target_modules=["k_proj", "v_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"]),
], ids=["lora", "lora-rslora-bias", "ia3"])
def test_folded_logits_equal_peft(tmp_path, base_dir, config):
    base = biased_llama()
    folder = save_peft_adapter(base, config, tmp_path / "adapter")
    out = export_merged(read_adapter(folder), str(base_dir), tmp_path / "out")
    folded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n or "ia3" in n for n, _ in folded.named_parameters())
    expected = logits(PeftModel.from_pretrained(biased_llama(), str(folder)).eval())
    assert (expected - logits(base)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(logits(folded), expected, atol=1e-5, rtol=0)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight,  # the source base stays untouched
                       biased_llama().model.layers[0].self_attn.q_proj.weight)


def _with_bitfit(model, biases: dict[str, torch.Tensor]):
    """The BitFit reference: each delta added to its module's output."""
    modules = dict(model.named_modules())
    for path, delta in biases.items():
        modules[path].register_forward_hook(lambda _m, _i, out, d=delta: out + d)
    return model


@pytest.mark.parametrize("paths,flags", [
    (["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], (True, True)),
    (["model.layers.1.self_attn.o_proj"], (True, False)),
])
def test_bitfit_folds_into_new_biases(tmp_path, tiny_llama_dir, paths, flags):
    gen = torch.Generator().manual_seed(2)
    biases = {p: torch.randn(64, generator=gen) for p in paths}
    folder = save_bitfit_adapter(tmp_path / "bitfit", biases)
    out = export_merged(read_adapter(folder), str(tiny_llama_dir), tmp_path / "out")
    folded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (folded.config.attention_bias, folded.config.mlp_bias) == flags  # only the flags it needs
    torch.testing.assert_close(logits(folded), logits(_with_bitfit(tiny_llama(), biases)), atol=1e-5, rtol=0)


def test_export_keeps_the_base_dtype_unless_asked(tmp_path):
    base = tmp_path / "bf16-base"
    tiny_llama().to(torch.bfloat16).save_pretrained(base)
    adapter = read_adapter(save_peft_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a"))
    assert AutoModelForCausalLM.from_pretrained(export_merged(adapter, str(base), tmp_path / "o")).dtype == torch.bfloat16
    wide = export_merged(adapter, str(base), tmp_path / "w", dtype=torch.float32)
    assert AutoModelForCausalLM.from_pretrained(wide).dtype == torch.float32


def test_refusals(tmp_path, tiny_llama_dir):
    base = tiny_llama()
    prompt = save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path / "p")
    with pytest.raises(ArtifactError, match="cannot be folded"):
        export_merged(read_adapter(prompt), str(tiny_llama_dir), tmp_path / "o1")
    bottleneck = save_bottleneck_adapter(tmp_path / "b")
    with pytest.raises(ArtifactError):
        export_merged(read_adapter(bottleneck), str(tiny_llama_dir), tmp_path / "o2")
    head = save_bitfit_adapter(tmp_path / "head", {"lm_head": torch.ones(128)})
    with pytest.raises(ArtifactError, match="'lm_head' has no bias"):
        export_merged(read_adapter(head), str(tiny_llama_dir), tmp_path / "o3")
    wrong = save_bitfit_adapter(tmp_path / "wrong", {"model.layers.0.self_attn.q_proj": torch.ones(32)})
    with pytest.raises(ArtifactError, match="q_proj"):
        export_merged(read_adapter(wrong), str(tiny_llama_dir), tmp_path / "o4")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    lora = save_peft_adapter(base, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "l")
    with pytest.raises(HubError, match="not an empty folder"):
        export_merged(read_adapter(lora), str(tiny_llama_dir), taken)
    assert (taken / "x").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))] == []  # nothing half-written


def test_cli_export_merged_uses_the_recorded_base(tmp_path, hub_home, tiny_llama_dir):
    folder = save_peft_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path / "a")
    runner = CliRunner()
    pushed = runner.invoke(app, ["push", str(folder), "--name", "task", "--version", "1.0.0",
                                 "--base-model", str(tiny_llama_dir)])
    assert pushed.exit_code == 0, pushed.output
    result = runner.invoke(app, ["export", "task@1.0.0", "--merged", "--out", str(tmp_path / "full")])
    assert result.exit_code == 0, result.output
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    expected = logits(PeftModel.from_pretrained(tiny_llama(), str(folder)).eval())
    torch.testing.assert_close(logits(folded), expected, atol=1e-5, rtol=0)
    plain = runner.invoke(app, ["export", "task@1.0.0", "--out", str(tmp_path / "adapter")])  # unchanged
    assert plain.exit_code == 0 and read_adapter(tmp_path / "adapter").technique.value == "lora"
    again = runner.invoke(app, ["export", "task@1.0.0", "--merged", "--out", str(tmp_path / "full")])
    assert again.exit_code == 1 and "not an empty folder" in again.output
    half = runner.invoke(app, ["export", "task@1.0.0", "--merged", "--dtype", "bfloat16", "--out", str(tmp_path / "bf")])
    assert half.exit_code == 0, half.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf").dtype == torch.bfloat16
    for args, message in ((["--dtype", "bfloat16"], "applies to --merged exports only"),
                          (["--merged", "--dtype", "int3"], "--dtype must be")):
        bad = runner.invoke(app, ["export", "task@1.0.0", *args, "--out", str(tmp_path / "x")])
        assert bad.exit_code == 1 and message in bad.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_base_model_folds_and_loads(tmp_path, real_hub_home, monkeypatch):
    """SmolLM2-135M (tied embeddings, bf16 on disk): the fp32 export equals PEFT's unmerged logits and
    carries the base's tokenizer."""
    from transformers import AutoTokenizer

    from hub import basemodel

    monkeypatch.setenv("HUB_HOME", real_hub_home)
    base, tokenizer = basemodel.load()
    # alpha 1: still a strong adapter (logits move by ~12), while 30 layers of float32 rounding stay < 1e-4
    folder = save_peft_adapter(base, LoraConfig(r=8, lora_alpha=1, target_modules=LLAMA_TARGETS), tmp_path / "a")
    adapter = read_adapter(folder)
    ids = tokenizer("Merging adapters into the base model", return_tensors="pt")["input_ids"]
    fp32 = AutoModelForCausalLM.from_pretrained(export_merged(adapter, "smollm2-135m", tmp_path / "fp32",
                                                              dtype=torch.float32)).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
        assert (expected - plain).abs().max() > 1.0
        torch.testing.assert_close(fp32(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "fp32")("hi")["input_ids"] == tokenizer("hi")["input_ids"]
