"""Registry at scale: push, tag, resolve, `hub show` and `hub list --limit 20` at 10 / 1,000 / 10,000 versions,
and the rate of a bulk `hub push` of many folders.

Set-up: one random LoRA (r=8 on q_proj,v_proj of a tiny random Llama, saved in PEFT's format); one registry per
size (the refs/ layout) in a temp folder, holding it and filled to the size with versions of its manifest under
new names. Then ROUNDS rounds, each visiting every size in turn (so load on the machine hits all sizes alike):
`Registry(root).resolve(ref)` in a new Python process (the call itself, and the whole process: every `hub`
command and every server start is a new process), one `Registry.push` of a new version and one `Registry.tag`
(in this process), and `hub show REF` and `hub list --limit 20` as whole processes, beside `python -c pass` (the floor any
process pays on the machine at that moment). Each figure is the median
of its rounds; the last row is the largest size's median over the smallest's. Last, one `hub push` of BULK
copies of the adapter folder (`--name 'bulk/{dir}'`) into the smallest and into the largest registry:
folders per second, the process's start and imports included.

    .venv/bin/python bench/registry_scale.py
    .venv/bin/python bench/registry_scale.py --sizes 10 1000 --rounds 3 --bulk 100
"""
from __future__ import annotations

import argparse
import json
import shutil
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


def grow(root: Path, template: dict, start: int, count: int) -> None:
    """Add `count` versions (copies of `template` under new names) as the refs/ files a push writes (without
    its fsyncs and checks: pushing 10,000 one by one would take minutes and is not what is measured)."""
    folder = root / "refs" / "fill"
    for i in range(start, start + count):
        versions = folder / f"a{i:06d}" / "versions"
        versions.mkdir(parents=True)
        manifest = {**template, "name": f"fill/a{i:06d}"}
        (versions / f"{template['version']}.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def timed(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, cwd=cwd)
    return done.stdout  # cwd is not the checkout's folder: `hub` comes from the venv


def measure(root: Path, folder: Path, n: int) -> dict[str, float]:
    """One round at one registry: push and tag a new version, resolve in a new process, hub show, hub list."""
    from hub.registry import Registry

    registry = Registry(root)
    resolve_begin = time.perf_counter()
    call = float(run("-c", _RESOLVE, str(root), "template@1.0.0", cwd=root))
    return {
        "resolve": call, "resolve process": time.perf_counter() - resolve_begin,
        "push": timed(lambda: registry.push(folder, f"pushed/p{n:06d}", "1.0.0")),
        "tag": timed(lambda: registry.tag(f"pushed/p{n:06d}@1.0.0", "stable")),
        "show": timed(lambda: run("-m", "hub", "show", "template@1.0.0", "--registry", str(root), cwd=root)),
        "list": timed(lambda: run("-m", "hub", "list", "--limit", "20", "--registry", str(root), cwd=root)),
        "python": timed(lambda: run("-c", "pass", cwd=root)),
    }


def bulk_rate(root: Path, folder: Path, scratch: Path, count: int) -> float:
    """Folders per second of one `hub push` of `count` folders (a whole process, imports included)."""
    folders = scratch / f"bulk-{root.name}"
    for i in range(count):
        shutil.copytree(folder, folders / f"b{i:05d}")
    seconds = timed(lambda: run("-m", "hub", "push", *sorted(map(str, folders.iterdir())), "--name", "bulk/{dir}",
                                "--version", "1.0.0", "--registry", str(root), cwd=root))
    return count / seconds


COLUMNS = [("push", "push"), ("tag", "tag"), ("resolve", "resolve (call, new process)"),
           ("resolve process", "resolve (whole process)"), ("show", "hub show"), ("list", "hub list --limit 20"),
           ("python", "python -c pass")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=7, help="measurements of each kind per size (median)")
    ap.add_argument("--bulk", type=int, default=1000, help="folders in the bulk push (0: skip it)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from hub.registry import Registry

    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="registry-scale-") as tmp:
        scratch = Path(tmp) / "scratch"
        base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        config, shapes = lora_template(base, scratch / "template", targets=["q_proj", "v_proj"])
        config["base_model_name_or_path"] = None  # no base to check: the registry is what is measured
        folder = write_random_lora(scratch / "lora", config, shapes, seed=1)
        roots = {size: Path(tmp) / f"registry-{size}" for size in sizes}
        for size, root in roots.items():
            template = Registry(root).push(folder, "template", "1.0.0").to_dict()
            grow(root, template, 1, size - 1)
        samples: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
        for n in range(args.rounds):  # round-robin over the sizes: load on the machine hits every size alike
            for size in sizes:
                samples[size].append(measure(roots[size], folder, n))
        rows = []
        for size in sizes:
            assert sum(1 for _ in Registry(roots[size]).index().manifests()) == size + args.rounds
            rows.append([f"{size:,}"] + [f"{median(s[key] for s in samples[size]) * 1000:.1f} ms"
                                             for key, _ in COLUMNS])
        first, last = sizes[0], sizes[-1]
        rows.append([f"ratio {last:,} / {first:,}"] + [
            f"{median(s[key] for s in samples[last]) / median(s[key] for s in samples[first]):.2f}x"
            for key, _ in COLUMNS])
        print(table(["versions"] + [title for _, title in COLUMNS], rows))
        if args.bulk:
            rates = {size: bulk_rate(roots[size], folder, scratch, args.bulk) for size in (first, last)}
            print(f"\nbulk hub push of {args.bulk:,} folders (one process, imports included): "
                  + ", ".join(f"{rate:.1f} folders/s into {size:,} versions" for size, rate in rates.items()))


if __name__ == "__main__":
    main()
