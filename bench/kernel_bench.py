"""Kernel benchmark: the kernel seam's backends per op, and a decode step's LoRA work in the stacked form the
engine had before slots against slots + the fused kernel, at the default base's shapes (SmolLM2-135M: hidden
576, 30 layers, q/k/v/o/gate/up/down), 32 rows.

1. Machine: the read bandwidth this CPU sustains (sum over a 256 MB float32 tensor), the floor every
   weight-streaming step is held to.
2. Per op: one decode step's LoRA ops over every layer and projection (shrink + expand per site, each
   layer with its own slot buffers, so weights stream from memory as in a model), for the reference ops, the
   fused backend and a per-row Python loop; r=8 and mixed ranks (8/16/32, one call per rank class); 1, 4 and
   32 distinct adapters; fp32 and bf16. Ratios against the fused backend.
3. Step: the stacked path (bench/stacked_lora.py, the engine's before slots: stacks each row's A and B, then the
   ops run each step) against slots + the fused kernel (weights installed once; a batch change rebuilds
   two small index tensors); the base's own linears of the step for scale.
4. Join: a batch change against the adapter's bytes (the stacked path's one-row segment and the smallest
   segment merge, which stacks, vs an index update), beside the one-time copy into slots at install.

Configurations are interleaved (A B C A B C ...) and each figure is the median of --repeats.

    .venv/bin/python bench/kernel_bench.py                 # the figures in docs/benchmarks.md
    .venv/bin/python bench/kernel_bench.py --device cuda --dtypes bfloat16   # adds the Triton kernels
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, sync, table, wall_times  # noqa: E402
from runtime.kernels import cpu, reference, triton_ops  # noqa: E402
from runtime.techniques.base import BatchInfo, Resident, Use  # noqa: E402
from bench.stacked_lora import LoraSite, _group_siblings, compile_all  # noqa: E402
from hub.artifact import Technique  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 576, 1536, 192  # SmolLM2-135M: 9 query heads and 3 key/value heads of 64
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def site_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{PARENT[proj]}.{proj}"


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def read_bandwidth(device: str, repeats: int) -> float:
    """GB/s of a sum over 256 MB of float32: what streaming weights can reach here."""
    t = torch.ones(64 << 20, device=device)
    t.sum()
    return t.numel() * 4 / statistics.median(wall_times(t.sum, repeats, device)) / 1e9


class Classes:
    """One layer set's slot buffers per rank class: a [S, r, d_in] and b [S, d_out, r] per (layer, site), the
    rows of each class and their slots (row i uses adapter i mod n)."""

    def __init__(self, rows: int, adapters: int, ranks: tuple[int, ...], layers: int, dtype, device, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.buffers: dict[int, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.uses: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        rank_of = [ranks[k % len(ranks)] for k in range(adapters)]
        for r in sorted(set(rank_of)):
            members = [k for k in range(adapters) if rank_of[k] == r]
            row_list = [i for i in range(rows) if rank_of[i % adapters] == r]
            if not row_list:
                continue
            slot_of = {k: s for s, k in enumerate(members)}
            self.uses[r] = (torch.tensor(row_list, device=device),
                            torch.tensor([slot_of[i % adapters] for i in row_list], device=device),
                            torch.ones(len(row_list), device=device))
            # b stored [S, r, d_out] and passed as its transpose: the layout the kernels stream by columns
            self.buffers[r] = [{p: (rand(g, (len(members), r, d_in), d_in, dtype, device),
                                    rand(g, (len(members), r, d_out), r, dtype, device).transpose(1, 2))
                                for p, (d_in, d_out) in SHAPES.items()} for _ in range(layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.buffers.values() for layer in layers
                   for pair in layer.values() for t in pair)


def rand(g: torch.Generator, shape: tuple[int, ...], fan_in: int, dtype, device) -> torch.Tensor:
    return (torch.randn(shape, generator=g) / fan_in ** 0.5).to(device=device, dtype=dtype)


def step_with(ops, classes: Classes, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> None:
    """One decode step's LoRA work through `ops` (a backend module): shrink + expand per site and rank class."""
    for r, layers in classes.buffers.items():
        rows, slots, scale = classes.uses[r]
        for layer in layers:
            for proj, (a, b) in layer.items():
                ops.lora_expand(ys[proj], ops.lora_shrink(xs[proj], a, rows, slots), b, rows, slots, scale)


def step_loop(classes: Classes, xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> None:
    """The same with a Python loop over rows: y[row] += (B @ (A @ x[row])) per row."""
    for r, layers in classes.buffers.items():
        rows, slots, _ = classes.uses[r]
        pairs = list(zip(rows.tolist(), slots.tolist()))
        for layer in layers:
            for proj, (a, b) in layer.items():
                x, y = xs[proj], ys[proj]
                for row, slot in pairs:
                    y[row] += (b[slot] @ (a[slot] @ x[row]))


def activations(rows: int, dtype, device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    xs = {p: torch.randn(rows, d_in, device=device).to(dtype) for p, (d_in, _) in SHAPES.items()}
    ys = {p: torch.zeros(rows, d_out, device=device, dtype=dtype) for p, (_, d_out) in SHAPES.items()}
    return xs, ys


def fast_backend(device: str):
    """(name, ops) of the device's fast backend, or None."""
    if device.startswith("cuda"):
        return ("triton", triton_ops) if triton_ops.available() else None
    module = cpu.load()
    return ("fused", module) if module is not None else None


def timed(fns: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, float]:
    """Median ms per call of each function, interleaved, after one warm-up call each."""
    def synced(fn):
        def run():
            fn()
            sync(device)
        return run
    runs = {name: synced(fn) for name, fn in fns.items()}
    for run in runs.values():
        run()
    return {name: median_ms(t["total"]) for name, t in interleaved(runs, repeats).items()}


def per_op(args) -> None:
    fast = fast_backend(args.device)
    head = ["dtype", "ranks", "adapters", "slot MB", "reference ms", f"{fast[0] if fast else 'fast'} ms",
            "per-row loop ms", "reference / fast", "loop / fast"]
    lines = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for ranks in ((8,), (8, 16, 32)):
            for n in args.adapters:
                classes = Classes(args.rows, n, ranks, args.layers, dtype, args.device, seed=n)
                xs, ys = activations(args.rows, dtype, args.device)
                fns = {"reference": lambda: step_with(reference, classes, xs, ys)}
                if fast:
                    fns["fast"] = lambda: step_with(fast[1], classes, xs, ys)
                if args.loop and dtype == torch.float32 and ranks == (8,):  # its cost is Python's, not the dtype's
                    fns["loop"] = lambda: step_loop(classes, xs, ys)
                ms = timed(fns, args.repeats, args.device)
                f = ms.get("fast")
                lines.append([dtype_name, "/".join(map(str, ranks)), str(n), f"{classes.nbytes() / 1e6:.0f}",
                              f"{ms['reference']:.1f}", f"{f:.1f}" if f else "-",
                              f"{ms['loop']:.1f}" if "loop" in ms else "-",
                              f"{ms['reference'] / f:.2f}" if f else "-",
                              f"{ms['loop'] / f:.2f}" if f and "loop" in ms else "-"])
                print(" | ".join(lines[-1]), flush=True)
    print(f"\nPer op: one decode step's LoRA ops ({args.layers} layers x 7 projections, {args.rows} rows, "
          f"row i uses adapter i mod n), ms per step\n")
    print(table(head, lines))


# --- the stacked path the engine had before slots (bench/stacked_lora.py) ---

def stacked_residents(adapters: int, r: int, layers: int, dtype, device, seed: int) -> list[Resident]:
    """Residents laid out as `Lora.load` lays them (A^T, B^T with the scaling folded, sibling A's grouped)."""
    out = []
    for k in range(adapters):
        g = torch.Generator().manual_seed(seed + k)
        sites = {}
        for layer in range(layers):
            for proj, (d_in, d_out) in SHAPES.items():
                a = rand(g, (r, d_in), d_in, dtype, device)
                b = rand(g, (d_out, r), r, dtype, device)
                sites[site_name(layer, proj)] = LoraSite(a.t(), b.t().contiguous(), None)
        _group_siblings(sites)
        for site in sites.values():
            if site.group_a is None:
                site.a_t = site.a_t.contiguous()
        out.append(Resident(f"a{k}", Technique.LORA, sites, 0))
    return out


def compile_stacked(residents: list[Resident], rows: range, layers: int, dtype, device):
    """Today's compile of a segment of `rows` (a join compiles its joining rows): the stacks and ops."""
    site_uses = {site_name(layer, p): [Use(i - rows.start, residents[i % len(residents)], 1.0) for i in rows]
                 for layer in range(layers) for p in SHAPES}
    batch = BatchInfo(len(rows), ("stack",) * len(rows), torch.device(device), dtype, reference)  # (unused there)
    return compile_all(site_uses, batch)


def run_stacked(ops, xs3: dict[str, torch.Tensor], ys3: dict[str, torch.Tensor], layers: int) -> None:
    for layer in range(layers):
        for proj in SHAPES:
            for op in ops[site_name(layer, proj)]:
                op(xs3[proj], ys3[proj])


def base_linears(rows: int, layers: int, dtype, device):
    """The base model's own linears of one decode step (7 per layer), for scale."""
    weights = [{p: torch.randn(d_out, d_in, device=device).to(dtype) for p, (d_in, d_out) in SHAPES.items()}
               for _ in range(layers)]
    xs, _ = activations(rows, dtype, device)

    def run():
        for layer in weights:
            for proj, w in layer.items():
                torch.nn.functional.linear(xs[proj], w)
    return run


def step_level(args) -> None:
    fast = fast_backend(args.device)
    if fast is None:
        print("\nStep: no fast backend here, skipped")
        return
    dtype = torch.float32  # the set-up (a bf16 CPU base keeps LoRA weights in float32 too)
    base = base_linears(args.rows, args.layers, dtype, args.device)
    head = ["adapters", "base linears ms", "stacked LoRA ms", "slots + fused LoRA ms", "stacked / fused",
            "(base+stacked) / (base+fused)", "batch rebuild: stacks ms", "batch rebuild: indices ms"]
    lines = []
    for n in args.adapters:
        residents = stacked_residents(n, 8, args.layers, dtype, args.device, seed=100 * n)
        ops = compile_stacked(residents, range(args.rows), args.layers, dtype, args.device)
        classes = Classes(args.rows, n, (8,), args.layers, dtype, args.device, seed=n)
        xs, ys = activations(args.rows, dtype, args.device)
        xs3 = {p: x.unsqueeze(1) for p, x in xs.items()}
        ys3 = {p: y.unsqueeze(1) for p, y in ys.items()}
        rows_list = list(range(args.rows))
        ms = timed({"base": base,
                    "stacked": lambda: run_stacked(ops, xs3, ys3, args.layers),
                    "fused": lambda: step_with(fast[1], classes, xs, ys),
                    "rebuild": lambda: compile_stacked(residents, range(args.rows), args.layers, dtype, args.device),
                    "indices": lambda: (torch.tensor(rows_list, device=args.device),
                                        torch.tensor([i % n for i in rows_list], device=args.device),
                                        torch.ones(args.rows, device=args.device))}, args.repeats, args.device)
        lines.append([str(n), f"{ms['base']:.1f}", f"{ms['stacked']:.1f}", f"{ms['fused']:.1f}",
                      f"{ms['stacked'] / ms['fused']:.2f}",
                      f"{(ms['base'] + ms['stacked']) / (ms['base'] + ms['fused']):.2f}",
                      f"{ms['rebuild']:.1f}", f"{ms['indices']:.3f}"])
        print(" | ".join(lines[-1]), flush=True)
    print(f"\nStep: LoRA on all 7 projections, r=8, {args.rows} rows, float32, ms per decode step "
          f"({args.layers} layers)\n")
    print(table(head, lines))


def joins(args) -> None:
    """A batch change against the adapters' bytes. Today a joining row compiles its own segment (one adapter
    at a site takes plain matmuls, no stacks) and segments later merge, stacking every row's weights: the
    smallest merge, two rows with distinct adapters, copies both. With slots an adapter is copied into its
    slot once, at install, and every batch change writes the index tensors."""
    dtype = torch.float32
    head = ["rank", "adapter MB", "one-row segment, stacked ms", "2-row merge, stacked ms", "indices ms",
            "install into slots ms (once)"]
    lines = []
    for r in args.join_ranks:
        residents = stacked_residents(2, r, args.layers, dtype, args.device, seed=7)
        size = sum((s.a_t.numel() + s.b_t.numel()) * s.b_t.element_size() for s in residents[0].sites.values())
        slots = {site: (torch.zeros(4, *s.a_t.t().shape, device=args.device, dtype=dtype),
                        torch.zeros(4, *s.b_t.shape, device=args.device, dtype=dtype))
                 for site, s in residents[0].sites.items()}

        def install():
            for site, s in residents[0].sites.items():
                a, b = slots[site]
                a[1].copy_(s.a_t.t())
                b[1].copy_(s.b_t)
        rows_list = list(range(args.rows))
        ms = timed({"stacked": lambda: compile_stacked(residents, range(1), args.layers, dtype, args.device),
                    "merge": lambda: compile_stacked(residents, range(2), args.layers, dtype, args.device),
                    "indices": lambda: (torch.tensor(rows_list, device=args.device),
                                        torch.tensor([1] * args.rows, device=args.device)),
                    "install": install}, args.repeats, args.device)
        lines.append([str(r), f"{size / 1e6:.1f}", f"{ms['stacked']:.2f}", f"{ms['merge']:.1f}",
                      f"{ms['indices']:.3f}", f"{ms['install']:.1f}"])
        print(" | ".join(lines[-1]), flush=True)
    print(f"\nBatch changes against the adapter's bytes (all 7 projections, {args.layers} layers, float32, "
          f"{args.rows} rows' indices)\n")
    print(table(head, lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--adapters", nargs="+", type=int, default=[1, 4, 32])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--join-ranks", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--no-loop", dest="loop", action="store_false", help="leave out the per-row Python loop")
    ap.add_argument("--only", choices=["ops", "step", "join"], help="run one part")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"read bandwidth: {read_bandwidth(args.device, args.repeats):.1f} GB/s\n", flush=True)
    if args.only in (None, "ops"):
        per_op(args)
    if args.only in (None, "step"):
        step_level(args)
    if args.only in (None, "join"):
        joins(args)


if __name__ == "__main__":
    main()
