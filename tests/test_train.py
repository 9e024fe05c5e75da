"""hub.train: every technique learns a toy task on a tiny random model, saves a folder the hub reads back,
and leaves the base model as it was; bad input fails with one clear error."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from hub.artifact import Technique, read_adapter
from hub.train import (Chat, Example, TokenExample, TrainError, TrainSpec, encode_chat, read_jsonl, train_adapter,
                       write_jsonl)

pytestmark = pytest.mark.slow  # training loops

REPLY = (10, 11, 12, 13, 2)  # every prompt gets this reply (2 = end of turn)
HP = {  # per-technique learning rates for the toy task
    Technique.LORA: dict(lr=3e-2),
    Technique.IA3: dict(lr=1e-1),
    Technique.BITFIT: dict(lr=5e-2),
    Technique.PROMPT_TUNING: dict(lr=5e-2, num_virtual_tokens=4),
    Technique.BOTTLENECK: dict(lr=3e-2, reduction_factor=8),
}


def toy_examples(n: int = 16) -> list[TokenExample]:
    gen = torch.Generator().manual_seed(0)
    return [TokenExample(tuple(torch.randint(3, 128, (int(torch.randint(3, 9, (1,), generator=gen)),),
                                             generator=gen).tolist()), REPLY) for _ in range(n)]


def toy_model():
    """A tiny Llama whose output head is large enough for a few steps to make the reply likely."""
    return tiny_llama(initializer_range=0.2)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("technique", list(HP))
def test_loss_goes_down_folder_reads_back_and_base_is_restored(technique, tmp_path):
    model = toy_model().requires_grad_(False)
    model.config.name_or_path = str(tmp_path / "a-local-folder")  # as a base loaded from disk has
    probe = torch.tensor([[1, 5, 9, 33, 7]])
    before = logits_of(model, probe)
    spec = TrainSpec(technique, steps=30, batch_size=8, **HP[technique])
    result = train_adapter(model, toy_examples(), spec, tmp_path / "out", base_model_id="tiny-llama")

    assert sum(result.losses[-5:]) / 5 < 0.5 * result.losses[0]
    adapter = read_adapter(tmp_path / "out")
    assert adapter.technique is technique
    assert adapter.num_parameters == result.trainable_parameters
    assert (adapter.config["source"]["base_model"] if technique is Technique.BOTTLENECK
            else adapter.config["base_model_name_or_path"]) == "tiny-llama"
    card = tmp_path / "out" / "README.md"  # PEFT's model card (PEFT techniques)
    assert technique in (Technique.BITFIT, Technique.BOTTLENECK) or "base_model: tiny-llama" in card.read_text()
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())
    assert torch.equal(logits_of(model, probe), before)  # no layer, hook or trainable flag left behind
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("technique", list(HP))
def test_runs_are_reproducible(technique, tmp_path):
    spec = TrainSpec(technique, steps=5, seed=3, **HP[technique])
    a = train_adapter(tiny_llama(), toy_examples(), spec, tmp_path / "a", base_model_id="t")
    b = train_adapter(tiny_llama(), toy_examples(), spec, tmp_path / "b", base_model_id="t")
    assert a.losses == b.losses
    ta, tb = read_adapter(tmp_path / "a").tensors, read_adapter(tmp_path / "b").tensors
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_layers_limit_what_is_trained(tmp_path):
    train_adapter(tiny_llama(), toy_examples(), TrainSpec(Technique.LORA, steps=2, layers=(1,)),
                  tmp_path / "lora", base_model_id="t")
    assert {k.split(".layers.")[1].split(".")[0] for k in read_adapter(tmp_path / "lora").tensors} == {"1"}
    train_adapter(tiny_llama(), toy_examples(), TrainSpec(Technique.BITFIT, steps=2, layers=(0,),
                                                          target_modules=("o_proj", "down_proj")),
                  tmp_path / "bitfit", base_model_id="t")
    adapter = read_adapter(tmp_path / "bitfit")
    assert sorted(adapter.tensors) == ["model.layers.0.mlp.down_proj.bias", "model.layers.0.self_attn.o_proj.bias"]
    assert adapter.config["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    assert adapter.tensors["model.layers.0.self_attn.o_proj.bias"].shape == (64,)


def test_bitfit_artifact_is_served_as_trained(tmp_path):
    """The saved bias deltas, served by the runtime engine, give the logits the training hooks gave."""
    from runtime.engine import Engine
    from runtime.plan import AdapterUse, RowPlan

    model = tiny_llama()
    train_adapter(model, toy_examples(), TrainSpec(Technique.BITFIT, steps=10, lr=5e-2), tmp_path / "b",
                  base_model_id="t")
    adapter = read_adapter(tmp_path / "b")
    modules = dict(model.named_modules())
    hooks = [modules[k.removesuffix(".bias")].register_forward_hook(lambda _m, _i, out, b=b: out + b)
             for k, b in adapter.tensors.items()]
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    expected = logits_of(model, ids)
    for h in hooks:
        h.remove()
    engine = Engine(tiny_llama())
    engine.load("b", adapter)
    logits, _ = engine.forward(ids, torch.ones_like(ids), [RowPlan((AdapterUse("b"),))])
    assert not torch.allclose(expected, logits_of(model, ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec, match", [
    (TrainSpec(Technique.BOTTLENECK, bottleneck_config="lora"), "unknown bottleneck config 'lora'"),
    (TrainSpec(Technique.BOTTLENECK, layers=(5,)), r"layers \[5\] not in the base model"),
    (TrainSpec(Technique.PROMPT_TUNING, layers=(0,)), "layers"),
    (TrainSpec(Technique.LORA, steps=0), "steps"),
    (TrainSpec(Technique.BITFIT, target_modules=("no_such_proj",)), "no_such_proj"),
])
def test_bad_spec_fails_clearly_and_writes_nothing(spec, match, tmp_path):
    with pytest.raises(TrainError, match=match):
        train_adapter(tiny_llama(), toy_examples(), spec, tmp_path / "out", base_model_id="t")
    assert not (tmp_path / "out").exists()


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [Example("Hi?", 'Hello "you"'), Example("Ünïcode", "ok")])
    assert read_jsonl(path) == [Example("Hi?", 'Hello "you"'), Example("Ünïcode", "ok")]
    path.write_text('{"prompt": "a", "completion": "b"}\n'
                    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    assert read_jsonl(path) == [Example("a", "b"), Chat((("user", "x"), ("assistant", "y")))]
    cases = {
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n': r"1 bad row\(s\), none used: line 2 \(malformed",
        '{"prompt": "a", "completion": 3}\n\n["a", "b"]\n{"prompt": "a", "completion": "b"}\n':
            r"2 bad row\(s\), none used: line 1 \(expected .*; line 3 \(expected",
        '{"messages": [{"role": "user", "content": "x"}]}\n': r"line 1 \(no assistant turn",
        '{"messages": [{"role": "bot", "content": "x"}]}\n': r"line 1 \(\"messages\" must be",
        "\n\n": "holds no examples",
    }
    for text, match in cases.items():
        path.write_text(text)
        with pytest.raises(TrainError, match=match):
            read_jsonl(path)
    with pytest.raises(TrainError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_encode_chat_uses_the_chat_template_and_drops_long_examples(real_hub_home, monkeypatch):
    from transformers import AutoTokenizer

    from hub import basemodel

    monkeypatch.setenv("HUB_HOME", real_hub_home)
    tokenizer = AutoTokenizer.from_pretrained(basemodel.prepare_embedded())
    short, long = Example("Capital of France?", "Paris."), Example("Tell me a story.", "Once upon a time " * 20)
    [encoded] = encode_chat(tokenizer, [short, long], max_len=64)
    prompt_text = tokenizer.decode(encoded.prompt_ids)
    assert prompt_text.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(encoded.reply_ids) == "Paris.<|im_end|>"
    with pytest.raises(TrainError, match="no example fits in 8 tokens"):
        encode_chat(tokenizer, [short], max_len=8)


@pytest.mark.parametrize("config, locations", [("pfeiffer", ["ffn"]), ("houlsby", ["attention", "ffn"])])
def test_bottleneck_is_served_as_trained(config, locations, tmp_path):
    """The runtime engine, serving the saved bottleneck adapter, gives the logits of the trained modules."""
    from runtime.engine import Engine
    from runtime.plan import AdapterUse, RowPlan

    model, ids, trained = toy_model(), torch.tensor([[1, 5, 9, 33, 7]]), {}
    spec = TrainSpec(Technique.BOTTLENECK, steps=20, lr=3e-2, reduction_factor=8, bottleneck_config=config)

    def capture(step: int) -> None:  # the trained modules are in place until train_adapter returns
        if step == spec.steps:
            trained["logits"] = logits_of(model, ids)

    result = train_adapter(model, toy_examples(), spec, tmp_path / "b", base_model_id="t", on_step=capture)
    assert sum(result.losses[-5:]) / 5 < 0.5 * result.losses[0]
    adapter = read_adapter(tmp_path / "b")
    assert adapter.config["locations"] == locations and adapter.config["bottleneck_size"] == 8
    assert len(adapter.tensors) == 4 * 2 * len(locations)  # down/up weight/bias, 2 layers
    engine = Engine(toy_model())
    engine.load("b", adapter)
    served, _ = engine.forward(ids, torch.ones_like(ids), [RowPlan((AdapterUse("b"),))])
    assert not torch.allclose(trained["logits"], logits_of(model, ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(served, trained["logits"], atol=1e-4, rtol=0)


def stop_at(n: int):
    """An on_step callback that acts as Ctrl-C after step n."""
    def on_step(step: int) -> None:
        if step == n:
            raise KeyboardInterrupt
    return on_step


def test_ctrl_c_keeps_the_best_checkpoint_so_far(tmp_path):
    spec = TrainSpec(Technique.LORA, steps=20, lr=3e-2, eval_every=3)
    val = toy_examples(4)
    runs = {n: train_adapter(toy_model(), toy_examples(), spec, tmp_path / str(n), base_model_id="t", val=val,
                             on_step=stop_at(n)) for n in (6, 8, 100)}
    late, early, full = runs[8].fit, runs[6].fit, runs[100].fit
    assert late.interrupted and len(late.losses) == 8 and [s for s, _ in late.val_losses] == [3, 6]
    assert late.best_step == early.best_step == min(late.val_losses, key=lambda sv: sv[1])[0]
    assert not full.interrupted and len(full.losses) == 20
    tensors = {n: read_adapter(tmp_path / str(n)).tensors for n in runs}
    assert all(torch.equal(tensors[8][k], tensors[6][k]) for k in tensors[6])  # steps 7 and 8 were dropped
    assert not all(torch.equal(tensors[100][k], tensors[6][k]) for k in tensors[6])
    with pytest.raises(TrainError, match=r"interrupted after 2 steps, before the first checkpoint \(step 3\)"):
        train_adapter(toy_model(), toy_examples(), spec, tmp_path / "none", base_model_id="t", on_step=stop_at(2))
    assert not (tmp_path / "none").exists()
