"""`make bench`: every benchmark in one run, their tables, bench/results/results.{json,md} and the plot.

Parts (in this order; --only picks some, the others keep their last results in results.json):
- engine: bench/engine_bench.py (engine vs PEFT mixed batch vs PEFT one at a time vs the base;
  other mixes; bytes per adapter), run as a subprocess, its tables kept as printed and parsed;
- e2e:    bench/e2e_bench.py (gRPC server: mixed adapters vs no adapters vs PEFT), likewise;
- e2e-bf16: the same with the base in bfloat16 (server and PEFT);
- e2e-peft-onednn: the same, with PEFT's base linears on the server's fp32 CPU kernels (runtime/cpu_linear.py);
- sweep:  bench/sweep.py (throughput against distinct adapters per batch -> throughput.png);
- scale:  bench/scale_bench.py (1,000 registered adapters, 50 fit: TTFT, tokens/s, cache).

    .venv/bin/python bench/run.py                    # everything (~35 min on 2 cores)
    .venv/bin/python bench/run.py --only sweep --only scale
    .venv/bin/python bench/run.py --quick            # a smoke run: small sizes everywhere
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import scale_bench
import sweep
from common import ROOT, write_json

from hub import basemodel  # noqa: E402  (common puts the repo on sys.path)

PARTS = ("engine", "e2e", "e2e-bf16", "e2e-peft-onednn", "sweep", "scale")
E2E_ARGS = {"e2e": [], "e2e-bf16": ["--dtype", "bfloat16"], "e2e-peft-onednn": ["--peft-linears", "onednn"]}
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ENGINE_QUICK = ["--repeats", "1", "--rows", "4", "--tokens", "16", "--kv-context", "32"]
_ROW = re.compile(r"^\s{2,}(?P<name>\S.*?)\s{2,}(?P<rest>\S.*)$")


def parse_tables(text: str) -> list[dict[str, Any]]:
    """Sections of a script's printed report: a title line, then indented `name  figures` rows.

    Each row keeps its text and the figures found in it (ms, ratio `1.23x`, MiB, tok/s)."""
    sections: list[dict[str, Any]] = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and sections:
            rest = m.group("rest")
            row: dict[str, Any] = {"text": rest}
            for key, pattern in (("ms", r"([\d.]+)\s*ms\b"), ("ratio", r"([\d.]+)x\b"), ("MiB", r"([\d.]+)\s*MiB\b"),
                                 ("tokens_per_s", r"([\d.]+)\s*tok(?:ens)?/s\b")):
                found = re.search(pattern, rest)
                if found:
                    row[key] = float(found.group(1))
            sections[-1]["rows"][m.group("name").strip()] = row
        elif line.strip() and not line.startswith(" "):
            sections.append({"title": line.strip(), "rows": {}})
    return [s for s in sections if s["rows"]]


def run_script(script: Path, args: list[str]) -> dict[str, Any]:
    """Run another bench script, echoing its stdout as it comes; its output, parsed tables and exit code."""
    if not script.is_file():
        print(f"{script.name}: not present, skipped")
        return {"script": script.name, "skipped": "not present"}
    command = [sys.executable, str(script), *args]
    print("$ " + " ".join(Path(c).name if i < 2 else c for i, c in enumerate(command)), flush=True)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    output = "".join(lines)
    return {"script": script.name, "args": args, "exit_code": code, "output": output, "tables": parse_tables(output)}


def accepts(script: Path, flag: str) -> bool:
    """Whether a script's --help lists `flag` (the other benches' options are theirs to choose)."""
    if not script.is_file():
        return False
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True)
    return flag in out.stdout


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def markdown(results: dict[str, Any]) -> str:
    """results.md: each part's table exactly as printed, and the plot."""
    out = ["# Benchmark results", "", f"Written by `make bench` (bench/run.py). Machine: "
           f"{results.get('machine', {}).get('cpus')} CPUs, torch {results.get('machine', {}).get('torch')}, "
           f"{results.get('machine', {}).get('platform')}.", ""]
    titles = {"engine": "Engine: mixed batch vs PEFT vs the base model (bench/engine_bench.py)",
              "e2e": "End to end: gRPC server (bench/e2e_bench.py)",
              "e2e-bf16": "End to end, base in bfloat16 (bench/e2e_bench.py --dtype bfloat16)",
              "e2e-peft-onednn": "End to end, PEFT's base on oneDNN too (bench/e2e_bench.py --peft-linears onednn)",
              "sweep": "Throughput against distinct adapters per batch (bench/sweep.py)",
              "scale": "Scale: 1,000 registered adapters, 50 fitting the adapter memory (bench/scale_bench.py)"}
    for part in PARTS:
        data = results.get(part)
        if not data:
            continue
        load = data.get("load_average")
        out += [f"## {titles[part]}", "", f"Run {data.get('generated_at', '?')}"
                + (" (--quick: smoke sizes, not figures)" if data.get("quick") else "")
                + (f"; load average {load[0]:.1f} before, {load[1]:.1f} after" if load else "") + ".", ""]
        text = data.get("table") or data.get("output") or data.get("skipped", "")
        out += ["```", text.rstrip(), "```", ""]
        if part == "sweep":
            out += ["![throughput against distinct adapters](throughput.png)", ""]
    return "\n".join(out)


def run(parts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    path = out / "results.json"
    results: dict[str, Any] = {}
    stamp = lambda: dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
    for part in parts:
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        print(f"\n===== {part} =====", flush=True)
        if part == "engine":
            data = run_script(BENCH / "engine_bench.py", ENGINE_QUICK if args.quick else [])
        elif part in E2E_ARGS:
            script = BENCH / "e2e_bench.py"
            data = run_script(script, (["--quick"] if args.quick and accepts(script, "--quick") else [])
                              + E2E_ARGS[part])
        elif part == "sweep":
            data = sweep.run_sweep(sweep.config_from(args, args.base_model, args.quick, prefix="sweep-"))
            sweep.plot_throughput(data, out / "throughput.png")
        else:
            data = scale_bench.run_scale(scale_bench.config_from(args, args.base_model, args.quick, prefix="scale-"))
        # the 1-minute load average around the part: on a shared machine, figures taken under load are not figures
        data.update(generated_at=stamp(), quick=args.quick, seconds=time.perf_counter() - started,
                    load_average=[load_before, os.getloadavg()[0]])
        results = json.loads(path.read_text()) if path.is_file() else {}  # read now: another run may have written
        results.update({part: data, "machine": machine()})
        write_json(path, results)  # after each part: a later failure keeps what finished
        (out / "results.md").write_text(markdown(results))
        print(f"===== {part}: {data['seconds']:.0f} s =====", flush=True)
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=PARTS, help="run this part (repeatable); default: all")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run, not figures)")
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL,
                    help="for the sweep and scale parts (engine_bench and e2e_bench use the default base)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where results.json, results.md, throughput.png go")
    sweep.add_arguments(ap, prefix="sweep-")
    scale_bench.add_arguments(ap, prefix="scale-")
    return ap


def main() -> None:
    args = parser().parse_args()
    common.setup_logging()
    run(args.only or list(PARTS), args)
    written = [args.out / name for name in ("results.json", "results.md", "throughput.png")]
    print("\nresults: " + ", ".join(str(p) for p in written if p.is_file()))


if __name__ == "__main__":
    main()
