"""Puts a stand-in kernel backend (bench/stand_in.py) under a whole server, for the floor of a benchmark: with
this folder on PYTHONPATH and HUB_BENCH_STAND_IN=read (or calls), every process started so (a `hub serve`
that a bench script starts inherits both) runs its LoRA ops on the stand-in on a CPU. The outputs are wrong by
design (no delta is added): only throughput means anything. For example, the e2e floor:

    HUB_BENCH_STAND_IN=read PYTHONPATH=bench/floor .venv/bin/python bench/e2e_bench.py --no-peft --cold 0
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_MODE = os.environ.get("HUB_BENCH_STAND_IN")
if _MODE:
    if _MODE not in ("read", "calls"):
        raise SystemExit(f"HUB_BENCH_STAND_IN must be read or calls, got {_MODE!r}")
    _BENCH = Path(__file__).resolve().parents[1]
    for _path in (str(_BENCH.parent), str(_BENCH)):  # the repository (runtime/) and bench/ (stand_in.py)
        if _path not in sys.path:
            sys.path.append(_path)
    import torch
    from stand_in import StandIn

    from runtime import kernels

    _chosen = kernels.backend
    _stand_in = StandIn(read=_MODE == "read")

    def _backend(device):  # type: ignore[no-untyped-def]
        return _stand_in if torch.device(device).type == "cpu" else _chosen(device)

    kernels.backend = _backend
    print(f"sitecustomize: LoRA ops on {_stand_in.__name__} (HUB_BENCH_STAND_IN={_MODE})", file=sys.stderr)
