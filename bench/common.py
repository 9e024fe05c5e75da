"""Shared helpers of the bench scripts: interleaved timing, percentiles, random LoRA folders, table printing.

Timing on a shared 2-core machine is noisy, so every comparison runs its configurations
interleaved (A B C A B C ...) and reports medians: a burst of load from elsewhere then hits
all of them, not one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as `python bench/x.py`
    sys.path.insert(0, str(ROOT))


def setup_logging() -> None:
    """Keep the printed tables readable: no download/progress bars or library warnings, here and in the
    subprocesses (hub serve, the other bench scripts) that inherit the environment."""
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def interleaved(configs: dict[str, Callable[[], dict[str, float] | None]],
                repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per repeat for each configuration and phase, run A B C A B C ... (warm-up is the caller's).

    A configuration returns its own phase timings ({"prefill": s, "decode": s}) or None, in which
    case the whole call is timed as phase "total"."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            phases = fn() or {"total": time.perf_counter() - start}
            for phase, seconds in phases.items():
                times[name].setdefault(phase, []).append(seconds)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns padded to their widest cell (what the scripts print)."""
    columns = list(zip(headers, *rows))
    widths = [max(len(str(c)) for c in col) for col in columns]
    numeric = [all(re.match(r"^[-+]?[\d.]", str(c)) or c == "-" for c in col[1:]) for col in columns]
    line = lambda cells: "  ".join(str(c).rjust(w) if right else str(c).ljust(w)  # noqa: E731
                                   for c, w, right in zip(cells, widths, numeric))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def lora_template(base: torch.nn.Module, folder: Path, *, targets: Iterable[str], r: int = 8,
                  alpha: int = 16) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """Save one LoRA with PEFT itself and return (its adapter_config.json, {tensor key: shape}).

    Writing a thousand adapters through `get_peft_model(...).save_pretrained` would cost minutes;
    PEFT's format is one config plus one safetensors file, so `write_random_lora` copies the
    config and key layout PEFT wrote here and only draws new tensors."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    peft_model = get_peft_model(copy.deepcopy(base).cpu().float(),
                                LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return config, shapes


def write_random_lora(folder: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int,
                      scale: float = 0.02) -> Path:
    """A LoRA folder in PEFT's format with PEFT's config and keys, random A and B (PEFT inits B to
    zero, which would make every adapter the base model)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: scale * torch.randn(shape, generator=gen) for key, shape in sorted(shapes.items())}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def random_loras(base: torch.nn.Module, out: Path, count: int, *, targets: Iterable[str], r: int = 8,
                 seed: int = 0) -> list[Path]:
    """`count` random LoRA folders under `out` (lora0000, lora0001, ...)."""
    config, shapes = lora_template(base, out / "template", targets=targets, r=r)
    return [write_random_lora(out / f"lora{i:04d}", config, shapes, seed + i) for i in range(count)]


def jsonable(d: dict) -> dict:
    """A dataclass's asdict() with paths and tuples made JSON types."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def add_options(ap, defaults: object, names: tuple[str, ...], prefix: str, helps: dict[str, str]) -> None:
    """`--{prefix}{name}` options for a config dataclass's fields (prefix lets run.py hold several benches)."""
    for name in names:
        default = getattr(defaults, name)
        kind = type(default) if not isinstance(default, tuple) else str
        value = ",".join(map(str, default)) if isinstance(default, tuple) else default
        ap.add_argument(f"--{prefix}{name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{name}", type=kind,
                        default=value, help=helps.get(name))


def build_config(cls, args, names: tuple[str, ...], base_model: str, prefix: str = "",
                 overrides: dict | None = None):
    """A config dataclass from `add_options` options (comma lists back to tuples), then `overrides`
    (a --quick run's sizes)."""
    config = cls(base_model=base_model)
    for name in names:
        value = getattr(args, f"{prefix.replace('-', '_')}{name}")
        current = getattr(config, name)
        if isinstance(current, tuple):
            value = tuple(type(current[0])(v) for v in str(value).split(","))
        setattr(config, name, value)
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    return config


def script_parser(doc: str, add_arguments: Callable) -> argparse.ArgumentParser:
    """The command line of one bench script run alone: --base-model, its options, --quick."""
    from hub import basemodel

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL, help="embedded name or a local model folder")
    add_arguments(ap)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run, not figures)")
    return ap


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously: a timer must not stop before it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall_times(fn: Callable[[], object], repeats: int, device: str | torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, the device's queued work included."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times
