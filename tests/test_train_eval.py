"""`hub eval`: the completion loss of several versions of mixed techniques and the bare base, from one
batched pass through the engine, equals PEFT's loss for each adapter evaluated alone."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig

from helpers import save_peft_adapter, tiny_llama
from hub.registry import Registry
from hub.train import encode_chat, read_jsonl
from test_train_cli import base, data, hub  # noqa: F401  (fixtures: a tiny base with a tokenizer, a JSONL file)

pytestmark = pytest.mark.slow  # training, then `hub eval` over the engine


def peft_loss(model, examples) -> tuple[float, int]:
    """(summed reply-token NLL, reply tokens) with HF's own loss, one example at a time."""
    total, n = 0.0, 0
    for e in examples:
        ids = torch.tensor([list(e.prompt_ids) + list(e.reply_ids)])
        labels = torch.tensor([[-100] * len(e.prompt_ids) + list(e.reply_ids)])
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * len(e.reply_ids)
        n += len(e.reply_ids)
    return total, n


@pytest.fixture
def pushed(base, tmp_path, hub_home):  # noqa: F811
    """(the base model, {name: adapter folder}): a LoRA, an IA3 and a prompt tuning adapter pushed as NAME@1.0.0."""
    model = tiny_llama(initializer_range=0.2)
    configs = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}
    for i, (name, config) in enumerate(configs.items()):
        folder = save_peft_adapter(model, config, tmp_path / name, seed=i + 1)
        assert hub("push", str(folder), "--name", name, "--version", "1.0.0", "--base-model", str(base)).exit_code == 0
    return model, {name: tmp_path / name for name in configs}


def peer(model, folders, ref: str):
    """The PEFT model that evaluates `ref` alone (the base itself for the base)."""
    return model if ref == "(base)" else PeftModel.from_pretrained(copy.deepcopy(model), folders[ref.split("@")[0]])


def test_eval_matches_peft_for_each_adapter_and_the_base(base, data, pushed):  # noqa: F811
    from hub import basemodel

    model, folders = pushed

    result = hub("eval", "lora", "ia3@1.0.0", "prompt", "--data", str(data), "--batch-size", "5", "--json")
    assert result.exit_code == 0, result.output
    got = {r["ref"]: r for r in json.loads(result.stdout)}
    assert list(got) == ["(base)", "lora@1.0.0", "ia3@1.0.0", "prompt@1.0.0"]

    _, tokenizer = basemodel.load(str(base))
    examples = encode_chat(tokenizer, read_jsonl(data), 256)
    for ref, r in got.items():
        nll, n = peft_loss(peer(model, folders, ref), examples)
        assert r["n"] == n and r["metric"] == "loss"
        assert math.isclose(r["value"], nll / n, rel_tol=1e-4), (ref, r["value"], nll / n)
    assert len({round(r["value"], 4) for r in got.values()}) == 4  # every adapter changes the loss

    perplexity = hub("eval", "lora", "--data", str(data), "--metric", "perplexity", "--no-base", "--json")
    [p] = json.loads(perplexity.stdout)
    assert math.isclose(p["value"], math.exp(got["lora@1.0.0"]["value"]), rel_tol=1e-5)
    assert Registry().resolve("lora").sha256 == Registry().resolve("lora@1.0.0").sha256


def test_accuracy_picks_the_likeliest_choice_as_peft_scores_it(base, pushed, tmp_path):  # noqa: F811
    from hub import basemodel
    from hub.train import chat_context, text_ids

    model, folders = pushed
    rng = random.Random(1)
    questions = [{"prompt": "".join(rng.choice("abcdef") for _ in range(4)),
                  "choices": ["".join(rng.choice("ghijk") for _ in range(rng.randint(1, 3))) for _ in range(3)],
                  "answer": rng.randrange(3)} for _ in range(12)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    result = hub("eval", "lora", "ia3", "prompt", "--data", str(path), "--metric", "accuracy", "--batch-size", "7",
                 "--json")
    assert result.exit_code == 0, result.output
    _, tokenizer = basemodel.load(str(base))
    for r in json.loads(result.stdout):
        m = peer(model, folders, r["ref"])
        right = 0
        for q in questions:
            context = list(chat_context(tokenizer, [{"role": "user", "content": q["prompt"]}]))
            scores = []
            for choice in q["choices"]:
                ids = text_ids(tokenizer, choice)
                with torch.no_grad():
                    logits = m(input_ids=torch.tensor([context + list(ids)])).logits[0, -len(ids) - 1: -1]
                scores.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).sum().item())
            right += scores.index(max(scores)) == q["answer"]
        assert (r["metric"], r["n"], r["value"]) == ("accuracy", 12, right / 12), r["ref"]

    path.write_text('{"prompt": "a", "choices": ["x"], "answer": 0}\n'
                    '{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n')
    bad = hub("eval", "lora", "--data", str(path), "--metric", "accuracy")
    assert bad.exit_code == 1 and "2 bad row(s), none used: line 1 (expected" in bad.output and "line 2 (" in bad.output


def test_generation_metrics_check_greedy_replies_as_peft_generates_them(base, pushed, tmp_path):  # noqa: F811
    """exact_match and contains on the engine's batched greedy replies equal plain string checks on PEFT's
    own greedy generations; half the expected replies are the base model's own, so the metrics are not all 0."""
    from hub import basemodel
    from hub.train import chat_context

    model, folders = pushed
    _, tokenizer = basemodel.load(str(base))
    rng = random.Random(2)
    prompts = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5))) for _ in range(6)]

    def replies(m) -> list[str]:
        out = []
        for prompt in prompts:
            ids = torch.tensor([chat_context(tokenizer, [{"role": "user", "content": prompt}])])
            with torch.no_grad():
                new = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return out

    base_replies = replies(model)
    rows = [{"prompt": p, "completion": r if i % 2 else "zz"} for i, (p, r) in enumerate(zip(prompts, base_replies))]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for metric in ("exact_match", "contains"):
        result = hub("eval", "lora", "ia3", "prompt", "--data", str(path), "--metric", metric, "--max-new-tokens", "6",
                     "--batch-size", "5", "--json")
        assert result.exit_code == 0, result.output
        for r in json.loads(result.stdout):
            got = base_replies if r["ref"] == "(base)" else replies(peer(model, folders, r["ref"]))
            want = [(g == row["completion"]) if metric == "exact_match" else (row["completion"] in g)
                    for g, row in zip(got, rows)]
            assert (r["n"], r["value"]) == (6, sum(want) / 6), (metric, r["ref"])
            if r["ref"] == "(base)":
                assert r["value"] >= 0.5
