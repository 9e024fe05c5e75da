"""Registry at scale: push, tag, resolve, `hub show` and `hub list --limit 20` at 10 / 1,000 / 10,000 versions,
and the rate of a bulk `hub push` of many folders.

Set-up: one random LoRA (r=8 on q_proj,v_proj of a tiny random Llama, saved in PEFT's format) in a fresh
registry (the refs/ layout) in a temp folder. At each size the registry is first filled up to it with
versions of that manifest under new names, written as the refs/ files a push writes but without a push's
fsyncs and checks (pushing 10,000 one by one would take minutes and is not what is measured). Then, at that
size: PUSHES versions pushed one at a time with `Registry.push` (median), as many `Registry.tag` calls
(median), `Registry(root).resolve(ref)` in a new Python process RESOLVES times (median of the call itself
and of the whole process: every `hub` command and every server start is a new process), and `hub show REF`
and `hub list --limit 20` as whole processes (median wall time). Last, `hub push` of BULK copies of the
adapter folder in one call (`--name 'bulk/{dir}'`) into the largest registry: folders per second.

    .venv/bin/python bench/registry_scale.py
    .venv/bin/python bench/registry_scale.py --sizes 10 1000 --bulk 100
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
    """Add `count` versions (copies of `template` under new names) as the refs/ files a push writes."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--resolves", type=int, default=3)
    ap.add_argument("--bulk", type=int, default=1000, help="folders in the bulk push (0: skip it)")
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
        versions, pushed = 1, 0
        for size in sorted(args.sizes):
            if size - args.pushes > versions:
                grow(root, template, versions, size - args.pushes - versions)
                versions = size - args.pushes
            push, tag = [], []
            for _ in range(args.pushes):
                pushed += 1
                push.append(timed(lambda: registry.push(folder, f"pushed/p{pushed:06d}", "1.0.0")))
                tag.append(timed(lambda: registry.tag(f"pushed/p{pushed:06d}@1.0.0", "stable")))
            versions += args.pushes
            assert sum(1 for _ in Registry(root).index().manifests()) == versions
            resolves = []
            for _ in range(args.resolves):
                begin = time.perf_counter()
                call = float(run("-c", _RESOLVE, str(root), "template@1.0.0", cwd=root))
                resolves.append((call, time.perf_counter() - begin))
            show = [timed(lambda: run("-m", "hub", "show", "pushed/p000001@stable", "--registry", str(root), cwd=root))
                    for _ in range(args.resolves)]
            listed = [timed(lambda: run("-m", "hub", "list", "--limit", "20", "--registry", str(root), cwd=root))
                      for _ in range(args.resolves)]
            rows.append([f"{versions:,}", f"{median(push) * 1000:.1f} ms", f"{median(tag) * 1000:.1f} ms",
                         f"{median(r[0] for r in resolves) * 1000:.1f} ms",
                         f"{median(r[1] for r in resolves) * 1000:.0f} ms",
                         f"{median(show) * 1000:.0f} ms", f"{median(listed) * 1000:.0f} ms"])
            print(f"registry_scale: {versions} versions done", file=sys.stderr, flush=True)
        print(table(["versions", "push", "tag", "resolve (call, new process)", "resolve (whole process)",
                     "hub show", "hub list --limit 20"], rows))
        if args.bulk:
            folders = scratch / "bulk"
            for i in range(args.bulk):
                shutil.copytree(folder, folders / f"b{i:05d}")
            seconds = timed(lambda: run("-m", "hub", "push", *sorted(map(str, folders.iterdir())), "--name",
                                        "bulk/{dir}", "--version", "1.0.0", "--registry", str(root), cwd=root))
            print(f"\nbulk hub push of {args.bulk:,} folders into {versions:,} versions: {seconds:.1f} s, "
                  f"{args.bulk / seconds:.0f} folders/s (one process, imports included)")


if __name__ == "__main__":
    main()
