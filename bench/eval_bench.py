"""Evaluation: 8 adapters of mixed techniques and the bare base scored on the same examples in one batched
pass through the multi-adapter engine (`hub eval`), against PEFT evaluating them one after another.

    python bench/eval_bench.py [--metric loss|generate] [--examples 200] [--batch-size 16] [--threads N]
                               [--max-new-tokens 32] [--base-model NAME|FOLDER] [--skip-one-by-one]

The adapters: the four PEFT demo adapters (two LoRAs, an IA3, a prompt tuning one, examples/adapters/)
and four more made with PEFT for this run (two LoRAs of other ranks and targets, an IA3, a prompt tuning
one; random weights: timings and the agreement of the numbers do not depend on what they learned).
BitFit and bottleneck adapters have no PEFT implementation to compare with, so they are left out.
The examples: the demo training files' (prompt, reply) rows, replies as the loss targets.

Three ways, each giving every adapter's (and the base's) mean reply-token loss (--metric loss), or its greedy
replies to the examples' prompts (--metric generate: what exact_match and contains compare):
- engine: `runtime.evaluate.EngineScorer`, rows of all nine plans mixed in each batch of --batch-size
  (generation: continuously batched, a finished row's place taken by the next prompt of any plan);
- PEFT one by one: `PeftModel.from_pretrained` per adapter, then one example per forward or `generate` call;
- PEFT batched: the same, --batch-size examples of that adapter per forward (right padded) or per `generate`
  call (left padded, a static batch).
--skip-one-by-one leaves out PEFT one by one (the slowest way, by far on long runs).
Loading each adapter is timed with its pass; the copy of the base PEFT gets for each adapter is not.
Prints the largest loss difference from the engine's (generate: the share of replies equal to the engine's),
each way's wall and CPU seconds with the ratios on CPU seconds (see `Clock`; run with --threads 1 on a shared
machine), the forwards, positions and multiply-adds each way computed, the forwards of one token per row
(decode steps) and of more apart with their CPU seconds (`Work`), and the fewest forwards and positions any
grouping of the rows needs at that batch size (`fewest`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from common import ROOT, setup_logging, table, write_json

DEMO = ("uppercase-lora", "json-lora", "pirate-ia3", "robot-prompt")
DATA = ("uppercase-lora", "json-lora", "pirate-ia3", "robot-prompt", "answer-bitfit", "signoff-bottleneck")


class Clock:
    """Wall and CPU seconds of the timed parts. CPU seconds (this process's) are what a machine shared with
    other work measures well with one torch thread: another process's burst lengthens the wall time of
    whichever way runs then, not the CPU time it takes."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._started = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]


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


def peft_pass(model, folders: dict[str, Path], items, batch_size: int) -> tuple[dict[str, float], Clock]:
    """(losses, time taken): the base, then each adapter loaded by PEFT on a fresh copy of the base."""
    from peft import PeftModel

    clock = Clock()
    with clock:
        out = {"(base)": peft_loss(model, items, batch_size)}
    for name, folder in folders.items():
        fresh = copy.deepcopy(model)
        with clock:
            out[name] = peft_loss(PeftModel.from_pretrained(fresh, str(folder)).eval(), items, batch_size)
        del fresh
    return out, clock


def engine_generate(engine, folders: dict[str, Path], items, batch_size: int, max_new: int) -> dict[str, list[str]]:
    """Load the adapters, generate every (plan, prompt) pair's greedy reply in one continuous batch, unload."""
    from hub.artifact import read_adapter
    from runtime.evaluate import EngineScorer
    from runtime.plan import AdapterUse, RowPlan

    plans: dict[str | None, RowPlan] = {None: RowPlan()}
    for name, folder in folders.items():
        engine.load(name, read_adapter(folder))
        plans[name] = RowPlan((AdapterUse(name),))
    keys = list(plans)
    texts = EngineScorer(engine, plans, batch_size).replies([(k, e.prompt_ids) for e in items for k in keys], max_new)
    for name in folders:
        engine.unload(name)
    return {key or "(base)": texts[i::len(keys)] for i, key in enumerate(keys)}


def peft_replies(model, tokenizer, items, batch_size: int, max_new: int) -> list[str]:
    """Greedy replies by `generate`, `batch_size` prompts per call (left padded), special tokens skipped."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e.prompt_ids)) + list(e.prompt_ids) for e in batch])
        mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in batch])
        with torch.no_grad():
            made = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                  pad_token_id=pad)
        out += tokenizer.batch_decode(made[:, width:], skip_special_tokens=True)
    return out


def peft_generate(model, tokenizer, folders: dict[str, Path], items, batch_size: int,
                  max_new: int) -> tuple[dict[str, list[str]], Clock]:
    """(replies, time taken): the base, then each adapter loaded by PEFT on a fresh copy of the base."""
    from peft import PeftModel

    clock = Clock()
    with clock:
        out = {"(base)": peft_replies(model, tokenizer, items, batch_size, max_new)}
    for name, folder in folders.items():
        fresh = copy.deepcopy(model)
        with clock:
            peft_model = PeftModel.from_pretrained(fresh, str(folder)).eval()
            out[name] = peft_replies(peft_model, tokenizer, items, batch_size, max_new)
        del fresh, peft_model
    return out, clock


class Work:
    """Forwards, and token positions a model's decoder layers and its vocabulary head compute (padding and soft
    prompts included): the multiply-adds of a pass are about layers x body weights + head x head weights,
    whatever adapter each row carries, so these bound what any way of grouping the rows can gain; and on a CPU
    each forward also costs a read of all the weights, whatever its rows, so the forwards count too. Forwards of
    one token per row (decode steps) and of more (prefills, scoring) are counted apart, each with the CPU seconds
    from the first decoder layer to the end of the vocabulary head."""

    KINDS = ("one token per row", "more tokens per row")

    def __init__(self, model):
        self.layers = self.head = 0
        self.kinds = {kind: {"forwards": 0, "rows": 0, "positions": 0, "cpu_s": 0.0} for kind in self.KINDS}
        self._kind = self.KINDS[0]
        self._started = 0.0
        body = model.get_decoder().layers
        self.body_params = sum(p.numel() for p in body.parameters())
        self.head_params = model.get_output_embeddings().weight.numel()
        # plain functions, not bound methods: deepcopy (PEFT's fresh base per adapter) keeps them pointing here
        body[0].register_forward_pre_hook(lambda m, args, kwargs: self._count_layers(args, kwargs), with_kwargs=True)
        model.get_output_embeddings().register_forward_pre_hook(lambda m, args: self._count_head(args))
        model.get_output_embeddings().register_forward_hook(lambda m, args, out: self._stop())

    def _count_layers(self, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        self.layers += x.shape[0] * x.shape[1]
        self._kind = self.KINDS[x.shape[1] != 1]
        kind = self.kinds[self._kind]
        kind["forwards"] += 1
        kind["rows"] += x.shape[0]
        kind["positions"] += x.shape[0] * x.shape[1]
        self._started = time.process_time()

    def _count_head(self, args) -> None:
        self.head += args[0].shape[0] * args[0].shape[1]

    def _stop(self) -> None:
        self.kinds[self._kind]["cpu_s"] += time.process_time() - self._started

    def take(self) -> dict:
        """Multiply-adds, forwards and positions (through the decoder layers), and per kind of forward its
        forwards, rows, positions and CPU seconds, counted since the last take."""
        done = {"multiply_adds": float(self.layers * self.body_params + self.head * self.head_params),
                "forwards": sum(k["forwards"] for k in self.kinds.values()), "positions": self.layers,
                "kinds": self.kinds}
        self.layers = self.head = 0
        self.kinds = {kind: {"forwards": 0, "rows": 0, "positions": 0, "cpu_s": 0.0} for kind in self.KINDS}
        return done


def soft_tokens(folders: dict[str, Path]) -> dict[str, int]:
    """Soft-prompt tokens each adapter puts before a row's tokens (0 but for prompt tuning)."""
    configs = {name: json.loads((folder / "adapter_config.json").read_text()) for name, folder in folders.items()}
    return {name: c.get("num_virtual_tokens", 0) if c.get("peft_type") == "PROMPT_TUNING" else 0
            for name, c in configs.items()}


def fewest(items, soft: dict[str, int], batch_size: int, decode_rows: int | None) -> tuple[int, int]:
    """(forwards, positions) no grouping of the (plan, example) rows, `batch_size` to a forward, can go below:
    every row's prompt and soft prompt (and, scoring, its reply) once, and for generation each row's tokens
    after its first once more, one position per decode step it takes part in (`decode_rows`: the engine's
    count, which computes no row past its last token)."""
    plans = [0, *soft.values()]  # the bare base, then each adapter
    rows = len(items) * len(plans)
    if decode_rows is None:
        positions = sum(len(e.prompt_ids) + len(e.reply_ids) + s for e in items for s in plans)
        return math.ceil(rows / batch_size), positions
    positions = sum(len(e.prompt_ids) + s for e in items for s in plans) + decode_rows
    return math.ceil(rows / batch_size) + math.ceil(decode_rows / batch_size), positions


def main() -> None:
    from hub import basemodel
    from runtime.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL, help="embedded name or a model folder")
    ap.add_argument("--metric", choices=("loss", "generate"), default="loss",
                    help="loss: reply-token loss; generate: greedy replies (exact_match, contains)")
    ap.add_argument("--examples", type=int, default=200, help="examples each adapter is scored on")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward (engine and batched PEFT)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="--metric generate: tokens per reply at most")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-one-by-one", action="store_true", help="leave out PEFT one example per call")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/eval_bench[_generate].json")
    args = ap.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    generate = args.metric == "generate"
    out_path = args.out or ROOT / "bench" / "results" / f"eval_bench{'_generate' if generate else ''}.json"

    import tempfile

    model, tokenizer = basemodel.load(args.base_model)
    peft_base, _ = basemodel.load(args.base_model)  # the engine routes its model's linears: PEFT gets its own
    items = examples(tokenizer, args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: ROOT / "examples" / "adapters" / name for name in DEMO}
        folders.update(made_adapters(peft_base, Path(tmp)))
        soft = soft_tokens(folders)
        engine = Engine(model, tokenizer)
        if generate:
            def ours_fn(rows):
                return engine_generate(engine, folders, rows, args.batch_size, args.max_new_tokens)

            def peer_fn(rows, batch):
                return peft_generate(peft_base, tokenizer, folders, rows, batch, args.max_new_tokens)
        else:
            def ours_fn(rows):
                return engine_pass(engine, folders, rows, args.batch_size)

            def peer_fn(rows, batch):
                return peft_pass(peft_base, folders, rows, batch)
        ours_fn(items[:4])  # warm-up: first-call allocations
        ours_work, peer_work = Work(engine.model), Work(peft_base)
        with Clock() as engine_clock:
            ours = ours_fn(items)
        work = {"engine": ours_work.take()}
        sizes = {"peft_batched": args.batch_size} if args.skip_one_by_one else {"peft_one_by_one": 1,
                                                                                "peft_batched": args.batch_size}
        peers, clocks = {}, {"engine": engine_clock}
        for key, size in sizes.items():
            peers[key], clocks[key] = peer_fn(items, size)
            work[key] = peer_work.take()

    labels = {"peft_one_by_one": "PEFT 1-by-1", "peft_batched": "PEFT batched"}
    if generate:
        same = {k: [sum(a == b for a, b in zip(ours[k], peer[k])) for peer in peers.values()] for k in ours}
        rows = [[name, *(f"{n}/{len(items)}" for n in counts)] for name, counts in same.items()]
        print(table(["adapter", *(f"{labels[k]} = engine" for k in peers)], rows))
        agreement = sum(sum(counts) for counts in same.values()) / (len(peers) * len(items) * len(ours))
        print(f"\n{len(folders)} adapters + base, {len(items)} prompts, greedy, at most {args.max_new_tokens} new "
              f"tokens, batch {args.batch_size}, {torch.get_num_threads()} threads; replies equal to the engine's: "
              f"{agreement:.1%}")
        figures = {"replies_equal": agreement, "max_new_tokens": args.max_new_tokens,
                   "replies": {"engine": ours, **peers}}
    else:
        rows = [[name, f"{ours[name]:.5f}", *(f"{peer[name]:.5f}" for peer in peers.values())] for name in ours]
        print(table(["adapter", "engine loss", *(labels[k] for k in peers)], rows))
        diff = max(abs(ours[k] - peer[k]) for peer in peers.values() for k in ours)
        tokens = sum(len(e.reply_ids) for e in items)
        print(f"\n{len(folders)} adapters + base, {len(items)} examples ({tokens} reply tokens each), "
              f"batch {args.batch_size}, {torch.get_num_threads()} threads; largest loss difference {diff:.2e}")
        figures = {"max_loss_diff": diff, "losses": {"engine": ours, **peers}}
    decode_rows = work["engine"]["kinds"][Work.KINDS[0]]["rows"]
    least = fewest(items, soft, args.batch_size, decode_rows if generate else None)
    print(f"fewest possible at {args.batch_size} rows per forward: {least[0]} forwards, {least[1]} positions")
    one, many = ("prompt/generate call", "prompts/generate call") if generate else ("example/forward", "examples/forward")
    ways = {"engine": "engine, one mixed pass", "peft_one_by_one": f"PEFT one after another, 1 {one}",
            "peft_batched": f"PEFT one after another, {args.batch_size} {many}"}
    macs = {k: w["multiply_adds"] for k, w in work.items()}
    timing = [[way, f"{clocks[k].wall:.1f}", f"{clocks[k].cpu:.1f}", f"{clocks[k].cpu / engine_clock.cpu:.2f}",
               str(work[k]["forwards"]), str(work[k]["positions"]), f"{macs[k] / 1e9:.0f}",
               f"{macs[k] / macs['engine']:.2f}"] for k, way in ways.items() if k in clocks]
    print(table(["way", "wall s", "CPU s", "x engine CPU", "forwards", "positions", "G multiply-adds", "x engine's"],
                timing))
    kinds = [[way, kind, *(str(work[k]["kinds"][kind][n]) for n in ("forwards", "rows", "positions")),
              f"{work[k]['kinds'][kind]['cpu_s']:.1f}"]
             for k, way in ways.items() if k in clocks for kind in Work.KINDS if work[k]["kinds"][kind]["forwards"]]
    print(table(["way", "forwards of", "forwards", "rows", "positions", "CPU s in them"], kinds))
    load = os.getloadavg()[:2]
    print(f"load average (1, 5 min) at the end: {load[0]:.2f}, {load[1]:.2f} on {os.cpu_count()} CPUs")
    write_json(out_path, {"metric": args.metric, "examples": len(items), "adapters": list(folders),
                          "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                          "load_average_at_end": load, "cpus": os.cpu_count(),
                          "wall_s": {k: c.wall for k, c in clocks.items()}, "cpu_s": {k: c.cpu for k, c in clocks.items()},
                          "work": work, "fewest": {"forwards": least[0], "positions": least[1]},
                          **figures})
    print(json.dumps({"engine_cpu_s": round(engine_clock.cpu, 1),
                      **{f"ratio_{k[5:]}": round(clocks[k].cpu / engine_clock.cpu, 2) for k in peers}}))


if __name__ == "__main__":
    main()
