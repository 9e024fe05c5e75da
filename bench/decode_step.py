"""The engine's decode step, in process: a full batch's step time with many distinct LoRAs against the base alone,
eager against CUDA graphs (runtime/graphs.py) and the reference kernels against Triton (runtime/kernels).

A batch of --rows rows (row i uses LoRA i % N of N distinct ones, r=8) runs `Batch.step` (the forward, greedy
sampling, the tokens' bookkeeping: what a server's engine loop does per token) until every configuration's
graphs are captured, then --steps timed steps; the figure is the median step. Configurations are interleaved
--repeats times. The base has a model folder's shapes (its config.json) and random weights made on the device,
so no weights travel; LoRAs are drawn in memory in PEFT's layout.

    python bench/decode_step.py --device cuda --dtype bfloat16 --base-model DIR       # SmolLM2's shapes: DIR
    python bench/decode_step.py --device cuda --dtype bfloat16 --base-model DIR --sizes 1,8,64 --graphs-only
    .venv/bin/python bench/decode_step.py --quick                                     # CPU smoke run
    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_step.py --rows 64 --sizes 1,64 --graphs-only --cpu-time
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lora_template, table, wall_times  # noqa: E402

from hub.artifact import Adapter, Technique  # noqa: E402
from hub.architectures import PROJECTIONS  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.generate import Batch, Row, SamplingParams  # noqa: E402
from runtime.graphs import DecodeGraphs  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402

SHAPES = {"all": list(PROJECTIONS), "q,v": ["q_proj", "v_proj"]}


def random_base(folder: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), config


def lora_adapters(config, count: int, targets: list[str], seed: int) -> list[Adapter]:
    """`count` random LoRAs (r=8) on `targets` of every layer, in PEFT's config and key layout (the config taken
    from PEFT's own save of a one-layer model of the same architecture). The module shapes come from a model
    built from `config` on the meta device, not from the model being served: once an engine has loaded an
    adapter its targeted layers are wrapped (the linear is then `<site>.base_layer`)."""
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "num_hidden_layers": 1}))
    with tempfile.TemporaryDirectory() as tmp:
        peft_config, _ = lora_template(small, Path(tmp), targets=targets, r=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and re.search(r"\.\d+\.", name):
            shapes[f"base_model.model.{name}.lora_A.weight"] = (8, module.in_features)
            shapes[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, 8)
    gen = torch.Generator().manual_seed(seed)
    return [Adapter(Technique.LORA, peft_config, {k: 0.005 * torch.randn(s, generator=gen) for k, s in shapes.items()})
            for _ in range(count)]


def step_times(engine: Engine, plans: list[RowPlan], warm: int, steps: int, cpu_time: bool = False) -> list[float]:
    """Seconds per `Batch.step` of a batch of these plans, after its prefill and `warm` steps: wall-clock, or
    with `cpu_time` this process's CPU time (on a CPU shared with other work, what the step itself costs)."""
    batch = Batch(engine, max_rows=len(plans))
    for i, plan in enumerate(plans):
        batch.add(Row(f"r{i}", [11 + i % 50, 12, 13, 14, 15, 16, 17, 18], plan,
                      SamplingParams(max_new_tokens=warm + steps + 2)))
    for _ in range(1 + warm):
        batch.step()
    if not cpu_time:
        return wall_times(batch.step, steps, engine.device)
    times = []
    for _ in range(steps):
        start = time.process_time()
        batch.step()
        times.append(time.process_time() - start)
    return times


def with_settings(engine: Engine, graphs: str, backend: str, run: Callable[[], list[float]]) -> list[float]:
    os.environ["HUB_KERNELS"] = backend
    engine.graphs = DecodeGraphs(engine.device, graphs)
    return run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", help="a model folder (its config.json); default: the embedded base's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--sizes", default="", help="comma-separated counts of distinct LoRAs (default: --rows)")
    ap.add_argument("--shapes", default="all,q,v", help="LoRA targets: all, q,v (comma-separated)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--graphs-only", action="store_true", help="only the graphed, Triton configuration (and base)")
    ap.add_argument("--cpu-time", action="store_true", help="time steps in process CPU time (CPU only)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.cpu_time and args.device != "cpu":
        ap.error("--cpu-time measures a CPU step; a device's queued work is not this process's CPU time")
    if args.quick:
        args.rows, args.steps, args.repeats = 4, 3, 1
    folder = args.base_model
    if folder is None:
        from hub import basemodel
        folder = str(basemodel.prepared_dir(basemodel.DEFAULT_BASE_MODEL))
    dtype = getattr(torch, args.dtype)
    model, config = random_base(folder, args.device, dtype)
    engine = Engine(model)
    shapes = ["q,v" if s in ("q", "v") else s for s in args.shapes.split(",")]
    shapes = list(dict.fromkeys(shapes))
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.rows]
    plans: dict[str, list[RowPlan]] = {"base": [RowPlan()] * args.rows}
    for shape in shapes:
        for n in sizes:
            for i, adapter in enumerate(lora_adapters(config, n, SHAPES[shape], seed=len(plans))):
                engine.load(f"{shape}-{n}-{i}", adapter)
            plans[f"{n} distinct LoRAs ({shape})"] = [RowPlan((AdapterUse(f"{shape}-{n}-{i % n}"),))
                                                       for i in range(args.rows)]
    cuda = args.device.startswith("cuda")
    fast = "triton" if cuda else "auto"
    settings = [("graphs", "auto" if cuda else "emulate", fast)]
    if not args.graphs_only:
        settings += [("graphs", "auto" if cuda else "emulate", "reference"), ("eager", "off", fast),
                     ("eager", "off", "reference")]
    results: dict[tuple[str, str], list[float]] = {}
    for i, (setting, graphs, chosen) in enumerate(settings):
        os.environ["HUB_KERNELS"] = chosen
        settings[i] = (f"{setting}, {kernels.backend_name(engine.device)} kernels", graphs, chosen)
    for _ in range(args.repeats):
        for name, plan in plans.items():
            for setting, graphs, chosen in settings:
                times = with_settings(engine, graphs, chosen, lambda: step_times(engine, plan, 4, args.steps, args.cpu_time))
                results.setdefault((name, setting), []).append(statistics.median(times))
    print(f"decode_step: {args.rows} rows, {config.model_type} with the shapes of {folder} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, random), {args.dtype} on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; median step of "
          f"{args.steps} ({'CPU time' if args.cpu_time else 'wall-clock'}), median of {args.repeats} repeats")
    rows = []
    for (name, setting), medians in results.items():
        step = statistics.median(medians)
        base = statistics.median(results[("base", setting)])
        rows.append([name, setting, f"{step * 1000:.2f} ms", f"{args.rows / step:.0f}", f"{base / step:.2f}x"])
    print(table(["configuration", "engine", "step", "tokens/s", "vs base (same engine)"], rows))


if __name__ == "__main__":
    main()
