"""Load cost: CPU time per adapter load through the pool, in one process, with no batch running.

Set-up: ADAPTERS random LoRAs (r=8 on q_proj,v_proj, as bench/scale_bench.py) pushed into a temp registry,
loaded in a shuffled order through `AdapterPool.load` on the default base with one torch thread:
- "growing": the first 52 loads into a fresh engine, from disk (every slot buffer grows from empty);
- "disk": the rest from disk, each evicting one (buffers grown, host tier off: every load reads, hashes,
  checks and prepares its file);
- "host": a second pool whose device holds 50 and whose host tier holds the others: every load comes from
  host memory and evicts one (what the pool's bookkeeping and the slot copies cost).
CPU time (time.process_time: every thread of the process, the sha256 thread included), not wall time, so
other jobs on the machine change the figures less. Run it from a checkout of other code to compare.

    .venv/bin/python bench/load_cost.py
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import lora_template, setup_logging, write_random_lora

from hub import basemodel  # noqa: E402  (common puts the repo on sys.path)

GROWING = 52


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL)
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    from hub.registry import Registry
    from runtime.engine import Engine
    from runtime.pool import AdapterPool

    model, tokenizer = basemodel.load(args.base_model)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        config, shapes = lora_template(model, work / "template", targets=("q_proj", "v_proj"))
        registry = Registry(work / "registry")
        refs = []
        for i in range(args.adapters):
            folder = write_random_lora(work / "next", config, shapes, seed=i)
            refs.append(registry.push(folder, f"load{i:04d}", "1.0.0", base_model=args.base_model).ref)
            shutil.rmtree(folder)
        random.Random(0).shuffle(refs)
        engine = Engine(model, tokenizer)
        size = engine.weights_bytes(registry.read_deferred(registry.resolve(refs[0]))[0])

        def per_load(pool: AdapterPool, names: list[str]) -> float:
            started = time.process_time()
            for ref in names:
                pool.load(ref, pin=False)
            return (time.process_time() - started) / len(names) * 1e3

        cold = AdapterPool(engine, registry, device_budget=GROWING * size + size // 2, host_budget=0)
        growing = per_load(cold, refs[:GROWING])
        disk = per_load(cold, refs[GROWING:])
        warm = AdapterPool(engine, registry, device_budget=50 * size + size // 2, host_budget=args.adapters * size)
        per_load(warm, refs)  # the device holds 50, the host tier the rest
        host = per_load(warm, refs)
        print(f"ms CPU per load, {args.adapters} r=8 q,v LoRAs of {args.base_model} ({size / 2**20:.2f} MiB): "
              f"growing {growing:.2f}, disk {disk:.2f}, host {host:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
