"""Write the figures of docs/benchmarks.md from bench/results/results.json (what `make bench` last wrote).

The page's prose is edited by hand; the part between the two markers below is this script's, so the
figures the docs show are always the latest results with their set-up, never copied by hand.
tests/test_docs.py fails when the page and results.json disagree.

    python bench/report.py            # rewrite docs/benchmarks.md
    python bench/report.py --check    # exit 1 if it is out of date
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "results.json"
PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- begin results: written by bench/report.py from bench/results/results.json; do not edit -->"
END = "<!-- end results -->"
# (results.json key, heading, how it was run); the order of `make bench`
PARTS = (
    ("engine", "Engine: mixed batch vs PEFT vs the base model", "bench/engine_bench.py"),
    ("e2e", "End to end over gRPC", "bench/e2e_bench.py"),
    ("e2e-bf16", "End to end, base in bfloat16", "bench/e2e_bench.py --dtype bfloat16"),
    ("e2e-peft-onednn", "End to end, PEFT's base linears on oneDNN too", "bench/e2e_bench.py --peft-linears onednn"),
    ("sweep", "Throughput against distinct adapters in a batch", "bench/sweep.py"),
    ("scale", "Scale: 1,000 registered adapters, 50 fitting the adapter memory", "bench/scale_bench.py"),
)
PLOT = "![throughput against distinct adapters](../bench/results/throughput.png)"


def machine_line(machine: dict[str, Any]) -> str:
    """The machine every part ran on, as run.py recorded it."""
    device = machine.get("cuda") or f"{machine.get('cpus')} CPUs ({machine.get('torch_threads')} torch threads)"
    return (f"Machine: {device}, {machine.get('platform')}, Python {machine.get('python')}, "
            f"torch {machine.get('torch')}.")


def table_text(data: dict[str, Any]) -> str:
    """The part's table as printed, without the per-repeat progress lines the scripts print as they go."""
    if data.get("table"):
        return str(data["table"]).rstrip()
    lines = str(data.get("output", data.get("skipped", ""))).splitlines()
    return "\n".join(line for line in lines if not line.startswith("e2e: ")).strip()


def part_section(key: str, heading: str, command: str, data: dict[str, Any]) -> list[str]:
    """One part: heading, set-up (date, configuration, load) and its table."""
    args = " ".join(data.get("args") or [])
    ran = f"`{command}`" if not args or args in command else f"`{command}` ({args})"
    setup = f"Run {data.get('generated_at', '?')}, part `{key}` of `make bench`: {ran}"
    if data.get("description"):
        setup += f"; {data['description']}"
    load = data.get("load_average")
    if load:
        setup += f"; load average {load[0]:.1f} before, {load[1]:.1f} after"
    setup += "."
    if data.get("quick"):
        setup += " A `--quick` smoke run: small sizes, not figures."
    out = [f"### {heading}", "", setup, "", "```", table_text(data), "```", ""]
    if key == "sweep":
        out += [PLOT, ""]
    return out


def render(results: dict[str, Any]) -> str:
    """The generated block, markers included."""
    out = [BEGIN, "", "## Latest results", "", machine_line(results.get("machine", {})), ""]
    for key, heading, command in PARTS:
        if results.get(key):
            out += part_section(key, heading, command, results[key])
    return "\n".join(out + [END])


def updated(page: str, results: dict[str, Any]) -> str:
    """The page with its generated block replaced (appended when the page has none yet)."""
    block = render(results)
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return page.rstrip("\n") + "\n\n" + block + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    args = ap.parse_args()
    page = PAGE.read_text()
    new = updated(page, json.loads(RESULTS.read_text()))
    if args.check:
        if new != page:
            sys.exit(f"error: {PAGE.relative_to(ROOT)} is out of date: run python bench/report.py")
        return
    PAGE.write_text(new)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
