"""What a request thread's parallel torch op does to the decode loop's steps, and what `runtime.cpu_threads.serial`
changes (see that module).

A decode step's linear work at the default base's shapes (smollm2-135m: 30 layers x 7 projections, random fp32
weights; the base's matmuls and, per projection, the fused kernels' LoRA shrink + expand, r=8, row i using adapter
i mod n) runs in the main thread on torch's threads, in three situations, interleaved, median of the repeats:
- `alone`: no other thread has run torch;
- `beside a parallel load`: a live thread has once copied 32 MB with torch's threads (as an adapter load did);
- `beside a serial load`: the same thread's copy ran under `serial()`.

    python bench/thread_share.py [--rows 64] [--adapters 1,64] [--repeats 5] [--layers 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import kernels  # noqa: E402
from runtime.cpu_threads import serial  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)
RANK = 8


def step_fn(rows: int, distinct: int, layers: int):
    """One decode step's linears (+ LoRA when `distinct`), each projection its own weights and slots."""
    gen = torch.Generator().manual_seed(0)
    sites = [(torch.randn(o, i, generator=gen) * 0.02, torch.randn(max(distinct, 1), RANK, i, generator=gen) * 0.02,
              torch.randn(max(distinct, 1), RANK, o, generator=gen) * 0.02) for _ in range(layers) for i, o in SHAPES]
    x = {d: torch.randn(rows, d, generator=gen) for d in (576, 1536)}
    slots = torch.arange(rows) % max(distinct, 1)
    order = torch.argsort(slots * rows + torch.arange(rows))  # sorted by (slot, row), as the techniques give them
    use_rows, use_slots, scale = order.contiguous(), slots[order].contiguous(), torch.ones(rows)

    def step() -> None:
        for w, a, b in sites:
            y = x[w.shape[1]] @ w.t()
            if distinct:
                h = kernels.lora_shrink(x[w.shape[1]], a, use_rows, use_slots)
                kernels.lora_expand(y, h, b.transpose(1, 2), use_rows, use_slots, scale)
    return step


def beside(context: AbstractContextManager | None):
    """A live thread that ran one 32 MB copy (under `context`), until the returned function ends it."""
    if context is None:
        return lambda: None
    ran, finish = threading.Event(), threading.Event()

    def load() -> None:
        with context:
            torch.randn(8 << 20).clone()
        ran.set()
        finish.wait()

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    ran.wait()

    def end() -> None:
        finish.set()
        thread.join()
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", default="0,1,64", help="distinct adapters per step (0: the base alone)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    situations = {"alone": None, "beside a parallel load": nullcontext, "beside a serial load": serial}
    print(f"torch threads {torch.get_num_threads()}, kernels {kernels.backend_name('cpu')}, rows {args.rows}, "
          f"layers {args.layers}, load average {os.getloadavg()[0]:.1f}")
    counts = [int(n) for n in args.adapters.split(",")]
    steps = {n: step_fn(args.rows, n, args.layers) for n in counts}
    times: dict[tuple[int, str], list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, make in situations.items():
            end = beside(make() if make else None)
            for n in counts:
                started = time.perf_counter()
                steps[n]()
                if repeat:
                    times.setdefault((n, name), []).append((time.perf_counter() - started) * 1e3)
            end()
    print(f"{'adapters':>8}  " + "  ".join(f"{name:>24}" for name in situations) + "  (ms a step, median)")
    for n in counts:
        cells = [statistics.median(times[n, name]) for name in situations]
        print(f"{n or 'base':>8}  " + "  ".join(f"{c:>24.1f}" for c in cells))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
