"""Where a CPU decode step with LoRAs on every projection spends its time, for one or more builds of the fused
CPU kernels (runtime/kernels/csrc/cpu_ops.cpp as it is, and e.g. an older copy to compare against).

1. Step: an engine holding only the adapters in use (bench/decode_step.py's random base and LoRAs, r=8, all
   projections), --rows rows: the base alone, every row its own adapter (--rows distinct ones), and one adapter
   shared by every row. Each step is timed in this process's CPU time, with the backend's `lora` calls wrapped in
   CPU timers ("LoRA ops"); "rest" is the step less them. Wall time too: with several torch threads a memory-bound
   op can cost more wall time than its CPU time shows. Beside the builds, two stand-in backends: "reading the
   bytes" only reads the slots each call names (`torch.sum`), the floor of any kernel, since every distinct
   adapter's bytes must be read; "calls only" returns at once, what the calls themselves cost.
2. Kernels: one decode step's shrink and expand calls at the same shapes on their own (a slot buffer of
   --rows adapters per site, each layer its own, so weights stream from memory as in a model), against
   `torch.sum` reading the same buffers: how close the kernels come to reading their bytes.

Builds and configurations are interleaved (A B A B ...) --repeats times; figures are medians. Run it with one
torch thread on a shared machine:

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_cost.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_cost.py --build before=/tmp/old_cpu_ops.cpp --build after=
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table  # noqa: E402
from decode_step import SHAPES, lora_adapters, random_base  # noqa: E402
from stand_in import StandIn  # noqa: E402

from runtime.engine import Engine  # noqa: E402
from runtime.generate import Batch, Row, SamplingParams  # noqa: E402
from runtime.kernels import cpu  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402


def build(name: str, source: str) -> ModuleType:
    """The fused CPU module from `source` (empty: the seam's own build)."""
    if not name.isidentifier():
        raise SystemExit(f"step_cost: a build's name becomes a module's: letters, digits and _, got {name!r}")
    module = cpu.load()
    if not source:
        if module is None:
            raise SystemExit("step_cost: the fused CPU kernels cannot be built here")
        return module
    from torch.utils import cpp_extension

    folder = Path(tempfile.mkdtemp(prefix=f"step_cost_{name}_"))
    copy = folder / f"step_cost_{name}.cpp"
    copy.write_text(Path(source).read_text())
    return cpp_extension.load(f"step_cost_{name}", [str(copy)], extra_cflags=cpu.CFLAGS,
                              extra_ldflags=cpu.LDFLAGS, build_directory=str(folder))


class Timed:
    """A backend whose LoRA calls add their CPU seconds to `seconds` (a build of an older source without the fused
    `lora` runs its two halves)."""

    def __init__(self, module: ModuleType | StandIn):
        self.seconds = 0.0
        self.op: Callable = getattr(module, "lora", None) or (
            lambda x, y, a, b, rows, slots, scale:
            module.lora_expand(y, module.lora_shrink(x, a, rows, slots), b, rows, slots, scale))

    def lora(self, x, y, a, b, rows, slots, scale) -> None:
        start = time.process_time()
        try:
            self.op(x, y, a, b, rows, slots, scale)
        finally:
            self.seconds += time.process_time() - start


def step_parts(engine: Engine, plans: list[RowPlan], steps: int, ops: Timed) -> tuple[float, float, float]:
    """Median (step, LoRA ops) CPU seconds and step wall seconds of `steps` decode steps of a batch of these
    plans."""
    batch = Batch(engine, max_rows=len(plans))
    for i, plan in enumerate(plans):
        batch.add(Row(f"r{i}", [11 + i % 50, 12, 13, 14, 15, 16, 17, 18], plan,
                      SamplingParams(max_new_tokens=steps + 8)))
    for _ in range(3):  # the prefill and two steps
        batch.step()
    totals, in_ops, walls = [], [], []
    for _ in range(steps):
        ops.seconds = 0.0
        start, wall = time.process_time(), time.perf_counter()
        batch.step()
        walls.append(time.perf_counter() - wall)
        totals.append(time.process_time() - start)
        in_ops.append(ops.seconds)
    return statistics.median(totals), statistics.median(in_ops), statistics.median(walls)


def step_level(args, builds: dict[str, ModuleType], folder: str) -> None:
    model, config = random_base(folder, "cpu", torch.float32)
    engine = Engine(model)
    for i, adapter in enumerate(lora_adapters(config, args.rows, SHAPES["all"], seed=1)):
        engine.load(f"a{i}", adapter)
    plans = {"base": [RowPlan()] * args.rows,
             f"{args.rows} distinct": [RowPlan((AdapterUse(f"a{i}"),)) for i in range(args.rows)],
             "one shared": [RowPlan((AdapterUse("a0"),))] * args.rows}
    timed = {label: Timed(module) for label, module in
             {**builds, "reading the bytes": StandIn(read=True), "calls only": StandIn(read=False)}.items()}
    first = next(iter(timed))
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeats):
        for name, rows in plans.items():
            for label, ops in timed.items():
                if name == "base" and label != first:
                    continue  # the base makes no kernel call: once per repeat
                cpu._state["module"] = ops  # the seam's backend on this CPU is now this build, timed
                runs.setdefault((name, "" if name == "base" else label), []).append(
                    step_parts(engine, rows, args.steps, ops))
    base = statistics.median(step for step, _, _ in runs[("base", "")])
    base_wall = statistics.median(wall for _, _, wall in runs[("base", "")])
    lines = []
    for (name, label), values in runs.items():
        step = statistics.median(s for s, _, _ in values)
        in_ops = statistics.median(o for _, o, _ in values)
        wall = statistics.median(w for _, _, w in values)
        lines.append([f"{name}, {label}" if label else name, f"{step * 1000:.1f} ms",
                      f"{in_ops * 1000:.1f} ms" if label else "-", f"{(step - in_ops) * 1000:.1f} ms",
                      f"{base / step:.2f}x", f"{wall * 1000:.1f} ms", f"{base_wall / wall:.2f}x"])
    print(f"Step: {args.rows} rows, {config.model_type} with the shapes of {folder} (random), float32, LoRA r=8 "
          "on all 7 projections; "
          f"CPU time (and wall time), median of {args.steps} steps x {args.repeats} repeats")
    print(table(["configuration", "step", "LoRA ops", "rest", "vs base", "wall", "vs base (wall)"], lines))


def kernel_level(args, builds: dict[str, ModuleType], folder: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    hidden, inner, kv = config.hidden_size, config.intermediate_size, \
        config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    dims = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inner), (hidden, inner),
            (inner, hidden)]
    g = torch.Generator().manual_seed(0)
    r, n = 8, args.rows
    sites = [(0.05 * torch.randn(n, r, d_in, generator=g), 0.05 * torch.randn(n, r, d_out, generator=g),
              torch.randn(n, d_in, generator=g), torch.zeros(n, d_out), torch.randn(n, r, generator=g))
             for _ in range(config.num_hidden_layers) for d_in, d_out in dims]
    rows, scale = torch.arange(n), torch.ones(n)
    cases = {f"{n} distinct": torch.arange(n), "one shared": torch.zeros(n, dtype=torch.int64)}
    a_bytes = sum(a.numel() * 4 for a, *_ in sites)
    b_bytes = sum(b.numel() * 4 for _, b, *_ in sites)

    def shrink(module: ModuleType | None, slots: torch.Tensor) -> None:
        for a, _, x, _, _ in sites:
            a.sum() if module is None else module.lora_shrink(x, a, rows, slots)

    def expand(module: ModuleType | None, slots: torch.Tensor) -> None:
        for _, b, _, y, h in sites:
            b.sum() if module is None else module.lora_expand(y, h, b.transpose(1, 2), rows, slots, scale)

    def cpu_seconds(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times)

    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    entries: list[tuple[str, ModuleType | None]] = [("reading the bytes (torch.sum)", None), *builds.items()]
    for _ in range(args.repeats):
        for case, slots in cases.items():
            for label, module in entries:
                if module is None and case != f"{n} distinct":
                    continue
                found.setdefault((case, label), []).append((cpu_seconds(lambda: shrink(module, slots)),
                                                            cpu_seconds(lambda: expand(module, slots))))
    print(f"\nKernels: one decode step's calls, {len(sites)} sites, {n} rows; A {a_bytes / 1e6:.0f} MB, "
          f"B^T {b_bytes / 1e6:.0f} MB per step with distinct adapters; CPU time, median of 5 x {args.repeats}")
    lines = []
    for (case, label), values in found.items():
        s = statistics.median(v for v, _ in values)
        e = statistics.median(v for _, v in values)
        rates = f"{a_bytes / s / 1e9:.1f} / {b_bytes / e / 1e9:.1f} GB/s" if case == f"{n} distinct" else "-"
        lines.append([case, label, f"{s * 1000:.1f} ms", f"{e * 1000:.1f} ms", rates])
    print(table(["adapters", "kernels", "shrink", "expand", "A / B^T read at"], lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", help="a model folder (its config.json); default: the embedded base's")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--build", action="append", default=[], metavar="NAME=SOURCE",
                    help="a kernel build to time: NAME=path to a cpu_ops.cpp, or NAME= for the seam's own "
                         "(default: the seam's own, as 'current')")
    ap.add_argument("--parts", default="step,kernels", help="step, kernels (comma-separated)")
    args = ap.parse_args()
    folder = args.base_model
    if folder is None:
        from hub import basemodel
        folder = str(basemodel.prepared_dir(basemodel.DEFAULT_BASE_MODEL))
    builds = {name: build(name, source) for name, source in (b.split("=", 1) for b in args.build or ["current="])}
    parts = args.parts.split(",")
    if "step" in parts:
        step_level(args, builds, folder)
    if "kernels" in parts:
        kernel_level(args, builds, folder)
    print(f"\nload average (1 minute) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
