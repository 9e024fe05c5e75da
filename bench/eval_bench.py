"""Evaluation: 8 adapters of mixed techniques and the bare base scored on the same examples in one batched
pass through the multi-adapter engine (`hub eval`), against PEFT evaluating them one after another.

    python bench/eval_bench.py [--examples 200] [--batch-size 16] [--base-model NAME|FOLDER]

The adapters: the four PEFT demo adapters (two LoRAs, an IA3, a prompt tuning one, examples/adapters/)
and four more made with PEFT for this run (two LoRAs of other ranks and targets, an IA3, a prompt tuning
one; random weights: timings and the agreement of the numbers do not depend on what they learned).
BitFit and bottleneck adapters have no PEFT implementation to compare with, so they are left out.
The examples: the demo training files' (prompt, reply) rows, replies as the loss targets.

Three ways, each giving every adapter's (and the base's) mean reply-token loss:
- engine: `runtime.evaluate.EngineScorer`, rows of all nine plans mixed in each batch of --batch-size;
- PEFT one by one: `PeftModel.from_pretrained` per adapter, then one example per forward (the plain loop);
- PEFT batched: the same, --batch-size examples of that adapter per forward (right padded).
Loading each adapter is timed with its pass; the copy of the base PEFT gets for each adapter is not.
Prints the largest loss difference from the engine's and the time ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import ROOT, setup_logging, table, write_json

DEMO = ("uppercase-lora", "json-lora", "pirate-ia3", "robot-prompt")
DATA = ("uppercase-lora", "json-lora", "pirate-ia3", "robot-prompt", "answer-bitfit", "signoff-bottleneck")


def made_adapters(model, out: Path) -> dict[str, Path]:
    """Four PEFT adapters with random (non-identity) weights, saved by PEFT."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    configs = {
        "lora-r16-all": LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]),
        "lora-r4-qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "ia3-qkv": IA3Config(target_modules=["q_proj", "k_proj", "v_proj"], feedforward_modules=[]),
        "prompt-20": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (0.02 if "lora" in name else 0.05))
        folders[name] = out / name
        peft_model.save_pretrained(str(folders[name]))
    return folders


def examples(tokenizer, count: int):
    from hub.train import encode_chat, read_jsonl

    rows = [row for name in DATA for row in read_jsonl(ROOT / "examples" / "data" / f"{name}.jsonl")]
    encoded = encode_chat(tokenizer, rows, max_len=128)
    if len(encoded) < count:
        raise SystemExit(f"eval_bench: only {len(encoded)} examples fit in 128 tokens, asked for {count}")
    return encoded[:count]


def engine_pass(engine, folders: dict[str, Path], items, batch_size: int) -> dict[str, float]:
    """Load the adapters, score every (plan, example) pair in mixed batches, unload them: the losses."""
    from hub.artifact import read_adapter
    from runtime.evaluate import EngineScorer
    from runtime.plan import AdapterUse, RowPlan

    plans: dict[str | None, RowPlan] = {None: RowPlan()}
    for name, folder in folders.items():
        engine.load(name, read_adapter(folder))
        plans[name] = RowPlan((AdapterUse(name),))
    keys = list(plans)
    scores = EngineScorer(engine, plans, batch_size).nll([(k, e.prompt_ids, e.reply_ids) for e in items for k in keys])
    out = {}
    for i, key in enumerate(keys):
        nll, n = (sum(x) for x in zip(*scores[i::len(keys)]))
        out[key or "(base)"] = nll / n
    for name in folders:
        engine.unload(name)
    return out


def peft_loss(model, items, batch_size: int) -> float:
    """Mean reply-token loss by HF's own loss (labels -100 outside the replies), `batch_size` per forward."""
    total = tokens = 0.0
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        width = max(len(e.prompt_ids) + len(e.reply_ids) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            seq = [*e.prompt_ids, *e.reply_ids]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(e.prompt_ids): len(seq)] = torch.tensor(e.reply_ids)
            mask[row, : len(seq)] = 1
        n = sum(len(e.reply_ids) for e in batch)
        with torch.no_grad():
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
        tokens += n
    return total / tokens


def peft_pass(model, folders: dict[str, Path], items, batch_size: int) -> tuple[dict[str, float], float]:
    """(losses, seconds): the base, then each adapter loaded by PEFT on a fresh copy of the base."""
    from peft import PeftModel

    started = time.perf_counter()
    out = {"(base)": peft_loss(model, items, batch_size)}
    seconds = time.perf_counter() - started
    for name, folder in folders.items():
        fresh = copy.deepcopy(model)
        started = time.perf_counter()
        out[name] = peft_loss(PeftModel.from_pretrained(fresh, str(folder)).eval(), items, batch_size)
        seconds += time.perf_counter() - started
        del fresh
    return out, seconds


def main() -> None:
    from hub import basemodel
    from runtime.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL, help="embedded name or a model folder")
    ap.add_argument("--examples", type=int, default=200, help="examples each adapter is scored on")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward (engine and batched PEFT)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_bench.json")
    args = ap.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile

    model, tokenizer = basemodel.load(args.base_model)
    peft_base, _ = basemodel.load(args.base_model)  # the engine routes its model's linears: PEFT gets its own
    items = examples(tokenizer, args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: ROOT / "examples" / "adapters" / name for name in DEMO}
        folders.update(made_adapters(peft_base, Path(tmp)))
        engine = Engine(model, tokenizer)
        engine_pass(engine, folders, items[:4], args.batch_size)  # warm-up: first-call allocations
        started = time.perf_counter()
        ours = engine_pass(engine, folders, items, args.batch_size)
        engine_s = time.perf_counter() - started
        one_by_one, one_s = peft_pass(peft_base, folders, items, 1)
        batched, batched_s = peft_pass(peft_base, folders, items, args.batch_size)

    rows = [[name, f"{ours[name]:.5f}", f"{one_by_one[name]:.5f}", f"{batched[name]:.5f}"] for name in ours]
    print(table(["adapter", "engine loss", "PEFT 1-by-1", "PEFT batched"], rows))
    diff = max(abs(ours[k] - peer[k]) for peer in (one_by_one, batched) for k in ours)
    tokens = sum(len(e.reply_ids) for e in items)
    print(f"\n{len(folders)} adapters + base, {len(items)} examples ({tokens} reply tokens each), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads; largest loss difference {diff:.2e}")
    timing = [["engine, one mixed pass", f"{engine_s:.1f}", "1.00"],
              ["PEFT one after another, 1 example/forward", f"{one_s:.1f}", f"{one_s / engine_s:.2f}"],
              [f"PEFT one after another, {args.batch_size}/forward", f"{batched_s:.1f}", f"{batched_s / engine_s:.2f}"]]
    print(table(["way", "seconds", "x engine time"], timing))
    write_json(args.out, {"examples": len(items), "adapters": list(folders), "batch_size": args.batch_size,
                          "threads": torch.get_num_threads(), "engine_s": engine_s, "peft_one_by_one_s": one_s,
                          "peft_batched_s": batched_s, "max_loss_diff": diff,
                          "losses": {"engine": ours, "peft_one_by_one": one_by_one, "peft_batched": batched}})
    print(json.dumps({"engine_s": round(engine_s, 1), "ratio_one_by_one": round(one_s / engine_s, 2),
                      "ratio_batched": round(batched_s / engine_s, 2)}))


if __name__ == "__main__":
    main()
