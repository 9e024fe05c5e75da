"""Bottleneck adapters in a decode step: CPU time against the base model, for several batch compositions.

Each row of a batch holds a cached prompt; one decode step is timed (CPU seconds of this process, so other
work on a shared machine does not lengthen it; median over the steps and the interleaved repeats). Adapters:
random Houlsby-layout blocks (after attention and after the feed-forward block, every layer). Compositions:
every row its own adapter; the same, with the batch's composition changing at every step (what joins and
leaves cost: the engine rebuilds the batch's ops); one adapter on every row; every row a stack of two; every
row an average of two.

    .venv/bin/python bench/bottleneck_bench.py                  # smollm2-135m, fp32, 1 thread
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import bottleneck_folder  # noqa: E402
from hub import basemodel  # noqa: E402
from hub.artifact import read_adapter  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402

Plans = Callable[[int], list[RowPlan]]  # a step's plans, from the step number


def compositions(rows: int, adapters: int) -> dict[str, Plans]:
    def one(key: str, weight: float = 1.0) -> AdapterUse:
        return AdapterUse(key, weight)

    return {
        "base model alone": lambda step: [RowPlan()] * rows,
        "every row its own adapter": lambda step: [RowPlan((one(f"b{i % adapters}"),)) for i in range(rows)],
        "the same, changing every step": lambda step: [RowPlan((one(f"b{(i + step) % adapters}"),))
                                                       for i in range(rows)],
        "one adapter on every row": lambda step: [RowPlan((one("b0"),))] * rows,
        "every row a stack of two": lambda step: [RowPlan((one(f"b{i % adapters}"), one(f"b{(i + 1) % adapters}", 0.5)))
                                                  for i in range(rows)],
        "every row an average of two": lambda step: [RowPlan((one(f"b{i % adapters}"), one(f"b{(i + 1) % adapters}")),
                                                             "average") for i in range(rows)],
    }


def decode_seconds(engine: Engine, ids: torch.Tensor, plans: Plans, steps: int) -> list[float]:
    """CPU seconds of each decode step after a prefill (the first two steps are left out: warm-up)."""
    rows, prompt = ids.shape
    _, cache = engine.forward(ids, torch.ones_like(ids), plans(0), last_only=True)
    mask = torch.ones(rows, prompt, dtype=torch.long)
    times = []
    for step in range(1, steps + 3):
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        start = time.process_time()
        _, cache = engine.forward(ids[:, -1:], mask, plans(step), cache=cache, last_only=True)
        times.append(time.process_time() - start)
    return times[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=16, help="distinct adapters loaded")
    ap.add_argument("--size", type=int, default=32, help="bottleneck size b")
    ap.add_argument("--prompt", type=int, default=64, help="cached tokens per row")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL, help="name or local folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = basemodel.load(args.base_model)
    engine = Engine(model)
    tmp = Path(tempfile.mkdtemp(prefix="bottleneck-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random adapters are scratch
    for k in range(args.adapters):
        folder = bottleneck_folder(model, tmp / f"b{k}", seed=k, size=args.size, locations=("attention", "ffn"),
                                   non_linearity="swish")
        assert folder is not None, "this runtime serves bottleneck adapters"
        engine.load(f"b{k}", read_adapter(folder))
    ids = torch.randint(100, 1000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"bottleneck_bench: {args.base_model} fp32, {torch.get_num_threads()} thread(s), {args.rows} rows on a "
          f"{args.prompt}-token cache, {args.adapters} adapters b={args.size} (attention + ffn), kernels "
          f"{engine.kernels}; CPU ms per decode step, median of {args.steps} steps x {args.repeats} repeats")
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, plans in compositions(args.rows, args.adapters).items():
            times.setdefault(name, []).extend(decode_seconds(engine, ids, plans, args.steps))
    base = statistics.median(times["base model alone"])
    for name, t in times.items():
        print(f"  {name:<34} {statistics.median(t) * 1000:8.1f} ms   {base / statistics.median(t):5.2f}x of base")


if __name__ == "__main__":
    main()
