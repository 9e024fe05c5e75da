"""Sweep: batch throughput against the number of distinct LoRA adapters in the batch.

One "generation" is a prefill of ROWS rows x PROMPT tokens followed by STEPS greedy decode steps
of all rows on that cache. Prefill tokens/s = ROWS*PROMPT / prefill time; decode tokens/s =
ROWS*STEPS / time of the STEPS steps. Row i uses adapter i mod N, for N distinct adapters
(1, 4, 16, 64: with 64 rows, 64 distinct means every row its own). Three systems run it in the
same process, interleaved (base, engine, PEFT, base, engine, PEFT, ...), median of --repeats:
the base model alone, this engine (runtime.engine.Engine), and PEFT's mixed batch
(`model(..., adapter_names=[...])`), all three on the base kernels the engine uses (runtime/cpu_linear.py),
so the ratios measure the adapters. Adapters: random LoRA r=8 on all seven projections.

    .venv/bin/python bench/sweep.py                  # default base (SmolLM2-135M), fp32, CPU
    .venv/bin/python bench/sweep.py --quick          # a smoke run: small sizes
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common import (add_options, build_config, interleaved, jsonable, median, random_loras, script_parser,
                    setup_logging, table)

from hub import basemodel  # noqa: E402  (common puts the repo on sys.path)
from hub.architectures import PROJECTIONS  # noqa: E402
from hub.artifact import read_adapter  # noqa: E402
from runtime.cpu_linear import route_linears  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402

SYSTEMS = ("base model alone", "this engine", "PEFT mixed batch")


@dataclass
class SweepConfig:
    base_model: str = basemodel.DEFAULT_BASE_MODEL
    rows: int = 64
    prompt_tokens: int = 16
    steps: int = 4
    counts: tuple[int, ...] = (1, 4, 16, 64)
    repeats: int = 3
    rank: int = 8
    targets: tuple[str, ...] = PROJECTIONS
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    workdir: Path | None = field(default=None, repr=False)

    def describe(self) -> str:
        return (f"{self.base_model} {self.dtype} on {self.device} ({torch.get_num_threads()} threads): "
                f"{self.rows} rows, prefill {self.rows}x{self.prompt_tokens} tokens + {self.steps} greedy decode steps; "
                f"LoRA r={self.rank} on {','.join(self.targets)}; distinct adapters {list(self.counts)}; "
                f"systems interleaved, median of {self.repeats}")


QUICK = dict(rows=8, prompt_tokens=8, steps=2, counts=(1, 4, 8), repeats=1)


def _generation(prefill: Callable[[], tuple[torch.Tensor, Any]],
                step: Callable[[torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, Any]],
                mask: torch.Tensor, steps: int, tokens_out: list | None = None) -> dict[str, float]:
    """Time a prefill and `steps` greedy decode steps; returns {"prefill": s, "decode": s}."""
    sync = torch.cuda.synchronize if mask.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits, cache = prefill()
    sync()
    t1 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if tokens_out is not None:
            tokens_out.append(nxt)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits, cache = step(nxt, cache, mask)
    sync()
    return {"prefill": t1 - t0, "decode": time.perf_counter() - t1}


def _systems(base, engine: Engine, peft, names: list[str], ids: torch.Tensor, mask: torch.Tensor,
             steps: int, tokens: dict[str, list]) -> dict[str, Callable[[], dict[str, float]]]:
    """One generation per system over the same inputs; `tokens` collects each system's greedy tokens."""
    plans = [RowPlan((AdapterUse(n),)) for n in names]

    def hf_step(model, **extra):
        def step(nxt, cache, m):
            pos = torch.full((nxt.shape[0], 1), m.shape[1] - 1, device=nxt.device)
            out = model(nxt, attention_mask=m, position_ids=pos, cache=cache, use_cache=True, **extra)
            return out.logits, out.cache
        return step

    def hf_prefill(model, **extra):
        def prefill():
            out = model(ids, attention_mask=mask, use_cache=True, **extra)
            return out.logits, out.cache
        return prefill

    def fresh(name: str) -> list:
        tokens[name] = []
        return tokens[name]

    return {
        SYSTEMS[0]: lambda: _generation(hf_prefill(base), hf_step(base), mask, steps, fresh(SYSTEMS[0])),
        SYSTEMS[1]: lambda: _generation(lambda: engine.forward(ids, mask, plans),
                                        lambda nxt, cache, m: engine.forward(nxt, m, plans, cache=cache),
                                        mask, steps, fresh(SYSTEMS[1])),
        SYSTEMS[2]: lambda: _generation(hf_prefill(peft, adapter_names=names), hf_step(peft, adapter_names=names),
                                        mask, steps, fresh(SYSTEMS[2])),
    }


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; returns {"config", "description", "results": [per (adapters, system)], "table"}."""
    log(f"sweep: {config.describe()}")
    base, _ = basemodel.load(config.base_model, dtype=config.dtype, device=config.device)
    route_linears(base)  # the engine's base kernels for all three systems: the ratios measure the adapters
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        workdir = Path(config.workdir or tmp)
        folders = random_loras(base, workdir, max(config.counts), targets=config.targets, r=config.rank,
                               seed=config.seed)
        return _measure(config, base, folders, log)


def _measure(config: SweepConfig, base, folders: list[Path], log: Callable[[str], None]) -> dict[str, Any]:
    from peft import PeftModel

    names = [f.name for f in folders]
    engine = Engine(copy.deepcopy(base))
    for name, folder in zip(names, folders):
        engine.load(name, read_adapter(folder))
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name=names[0]).eval()
    for name, folder in zip(names[1:], folders[1:]):
        peft.load_adapter(folder, adapter_name=name, low_cpu_mem_usage=True)
    peft.to(config.device)
    log(f"sweep: {len(folders)} adapters loaded into the engine and into PEFT")

    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(min(100, vocab // 2), vocab, (config.rows, config.prompt_tokens), generator=gen)
    ids = ids.to(config.device)
    mask = torch.ones_like(ids)
    results = []
    with torch.inference_mode():
        for count in config.counts:
            row_names = [names[i % count] for i in range(config.rows)]
            tokens: dict[str, list] = {}
            systems = _systems(base, engine, peft, row_names, ids, mask, config.steps, tokens)
            warm = _systems(base, engine, peft, row_names, ids[:, :2], mask[:, :2], 1, {})
            interleaved(warm, 1)
            times = interleaved(systems, config.repeats)
            agree = _agreement(tokens[SYSTEMS[1]], tokens[SYSTEMS[2]])
            base_rates = None
            for system in SYSTEMS:
                prefill_s, decode_s = median(times[system]["prefill"]), median(times[system]["decode"])
                rates = (config.rows * config.prompt_tokens / prefill_s, config.rows * config.steps / decode_s)
                base_rates = base_rates or rates
                results.append({
                    "adapters": count, "system": system, "prefill_s": prefill_s, "decode_s": decode_s,
                    "prefill_tokens_per_s": rates[0], "decode_tokens_per_s": rates[1],
                    "prefill_vs_base": rates[0] / base_rates[0], "decode_vs_base": rates[1] / base_rates[1],
                    "samples": times[system],
                    **({"greedy_tokens_equal_to_peft": agree} if system == SYSTEMS[1] else {}),
                })
            log(f"sweep: {count} distinct adapter(s) done")
    text = render(results, config.describe())
    log(text)
    return {"config": jsonable(asdict(config)), "description": config.describe(), "results": results, "table": text}


def _agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Fraction of greedy tokens this engine and PEFT chose alike (a check that both applied the adapters)."""
    if not ours:
        return float("nan")
    a, b = torch.cat(ours, dim=1), torch.cat(theirs, dim=1)
    return float((a == b).float().mean())


def render(results: list[dict], description: str) -> str:
    rows = [[str(r["adapters"]), r["system"], f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_vs_base']:.2f}x",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_vs_base']:.2f}x"] for r in results]
    head = ["distinct adapters", "system", "prefill tok/s", "vs base", "decode tok/s", "vs base"]
    return f"throughput vs distinct adapters in a batch\n{description}\n" + table(head, rows)


def plot_throughput(sweep: dict[str, Any], path: Path) -> Path:
    """Two panels (prefill, decode): tokens/s against distinct adapters, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase, title in ((axes[0], "prefill", "prefill"), (axes[1], "decode", "decode")):
        for system, style in zip(SYSTEMS, ("k--", "o-", "s-")):
            points = [(r["adapters"], r[f"{phase}_tokens_per_s"]) for r in sweep["results"] if r["system"] == system]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=system)
        counts = sorted({r["adapters"] for r in sweep["results"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("distinct LoRA adapters in the batch")
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    c = sweep["config"]
    fig.suptitle(f"{c['base_model']} {c['dtype']} {c['device']}, {c['rows']} rows: prefill {c['rows']}x"
                 f"{c['prompt_tokens']} tokens + {c['steps']} decode steps, LoRA r={c['rank']} on 7 projections",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


OPTIONS = ("rows", "prompt_tokens", "steps", "counts", "repeats", "dtype", "device")


def add_arguments(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    add_options(ap, SweepConfig(), OPTIONS, prefix, {"counts": "distinct adapter counts, comma-separated"})


def config_from(args: argparse.Namespace, base_model: str, quick: bool = False, prefix: str = "") -> SweepConfig:
    config = build_config(SweepConfig, args, OPTIONS, base_model, prefix, QUICK if quick else None)
    if max(config.counts) > config.rows:
        raise SystemExit(f"distinct adapter counts up to {max(config.counts)} need as many rows (got {config.rows})")
    return config


def main() -> None:
    ap = script_parser(__doc__, add_arguments)
    ap.add_argument("--plot", type=Path, help="also write the throughput plot here")
    args = ap.parse_args()
    setup_logging()
    result = run_sweep(config_from(args, args.base_model, args.quick))
    if args.plot:
        plot_throughput(result, args.plot)


if __name__ == "__main__":
    main()
