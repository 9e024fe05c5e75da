"""Registry at scale: push and resolve cost at 10 / 1,000 / 10,000 versions.

Set-up: one random LoRA (r=8 on q_proj,v_proj of a tiny random Llama, saved in PEFT's format) in a
fresh registry in a temp folder. At each size the registry is first filled up to it by adding
versions of that manifest under new names through the index API (`IndexFile.update()` +
`Index.add`, one write per batch: pushing 10,000 one by one would take minutes and is not what is
measured), then PUSHES versions are pushed one at a time with `Registry.push` (the median is
reported), and `Registry(root).resolve(ref)` runs in a new Python process RESOLVES times (every
`hub` command and every server start is a new process): the median of the resolve call itself and
of the whole process (interpreter start and imports included).

    .venv/bin/python bench/registry_scale.py
    .venv/bin/python bench/registry_scale.py --sizes 10 1000
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import lora_template, median, table, write_random_lora

_RESOLVE = """
import sys, time
start = time.perf_counter()
from hub.registry import Registry
imported = time.perf_counter()
Registry(sys.argv[1]).resolve(sys.argv[2])
print(time.perf_counter() - imported)
"""


def grow(root: Path, template: dict, count: int) -> None:
    """Add `count` versions (copies of `template` under new names) in one index write."""
    from hub.index import IndexFile
    from hub.manifest import Manifest

    index_file = IndexFile(root)
    with index_file.update() as index:
        start = len(index.data["adapters"])
        for i in range(start, start + count):
            index.add(Manifest.from_dict({**template, "name": f"bulk/a{i:06d}"}))


def resolve_in_new_process(root: Path, ref: str) -> tuple[float, float]:
    """(seconds in resolve, seconds of the whole process)."""
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RESOLVE, str(root), ref], capture_output=True, text=True,
                          check=True, cwd=root)  # not the checkout's folder: `hub` comes from PYTHONPATH or the venv
    return float(done.stdout.strip()), time.perf_counter() - begin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--resolves", type=int, default=3)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from hub.registry import Registry

    rows = []
    with tempfile.TemporaryDirectory(prefix="registry-scale-") as tmp:
        scratch, root = Path(tmp) / "scratch", Path(tmp) / "registry"
        base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        config, shapes = lora_template(base, scratch / "template", targets=["q_proj", "v_proj"])
        config["base_model_name_or_path"] = None  # no base to check: the registry is what is measured
        folder = write_random_lora(scratch / "lora", config, shapes, seed=1)
        registry = Registry(root)
        template = registry.push(folder, "template", "1.0.0").to_dict()
        pushed = 1
        for size in sorted(args.sizes):
            have = len(Registry(root).index().data["adapters"])
            if size - args.pushes > have:
                grow(root, template, size - args.pushes - have)
            seconds = []
            for _ in range(args.pushes):
                begin = time.perf_counter()
                registry.push(folder, f"pushed/p{pushed:06d}", "1.0.0")
                seconds.append(time.perf_counter() - begin)
                pushed += 1
            versions = sum(len(e["versions"]) for e in Registry(root).index().data["adapters"].values())
            timings = [resolve_in_new_process(root, "template@1.0.0") for _ in range(args.resolves)]
            rows.append([f"{versions:,}", f"{median(seconds) * 1000:.0f} ms",
                         f"{median(t[0] for t in timings) * 1000:.0f} ms",
                         f"{median(t[1] for t in timings) * 1000:.0f} ms"])
            print(f"registry_scale: {versions} versions done", file=sys.stderr, flush=True)
    print(table(["versions", "push (median)", "resolve in a new process", "whole process"], rows))


if __name__ == "__main__":
    main()
