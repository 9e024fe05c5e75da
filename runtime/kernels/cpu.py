"""The fused CPU backend: `csrc/cpu_ops.cpp`, built at first use with the machine's C++ compiler.

The build runs once per source, torch and Python version (the name of the build carries their hash) into a
per-user cache (`$HUB_KERNELS_DIR`, else `$XDG_CACHE_HOME/adapterhub/kernels`, else `~/.cache/...`), under a
file lock, so concurrent processes (a server and its tests, several workers) build it once and the rest
load it. No `-march=native`: the hot loops carry AVX-512/AVX2/generic clones chosen at load, so a cached
binary may move between x86-64 machines. A cached build is imported directly (the build tools cost seconds
to start), and an Engine asks for its backend when it is made, so no request waits for a build or a load.
Without a compiler (or ninja) or if the build fails, `load()` warns once per process and returns None, and
the seam takes the reference ops.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

SOURCE = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
CFLAGS = ["-O3", "-fopenmp"]  # -fopenmp: ATen's parallel_for is an OpenMP region compiled into the caller
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def cache_root() -> Path:
    """Where built kernels are kept (one folder per build)."""
    if os.environ.get("HUB_KERNELS_DIR"):
        return Path(os.environ["HUB_KERNELS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapterhub" / "kernels"


def build_name() -> str:
    """A name that changes with everything the binary depends on, so a stale build is never loaded."""
    key = b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                      platform.machine().encode(), " ".join(CFLAGS + LDFLAGS).encode()])
    return "hub_cpu_ops_" + hashlib.sha256(key).hexdigest()[:16]


def _build() -> ModuleType:
    name = build_name()
    folder = cache_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the build's own notices; a failure is reported once, below
        built = folder / f"{name}.so"
        if built.exists():  # the name carries the source's hash: a file of that name is that source's build
            return _import(name, built)
        from torch.utils import cpp_extension  # imports setuptools and runs ninja: only when building

        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                  build_directory=str(folder), verbose=False)


def _import(name: str, path: Path) -> ModuleType:
    """Import a built extension module from its file (what cpp_extension.load does after its build step)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> ModuleType | None:
    """The built module (ops with the reference's signatures), or None after one warning if it cannot be
    built here. Tried once per process."""
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # any build failure means: run the reference
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                warnings.warn(f"kernels: the fused CPU kernels could not be built ({reason}); "
                              "using the reference ops", RuntimeWarning, stacklevel=3)
                _state["module"] = None
        return _state["module"]
