"""Torch's CPU threads, per calling thread: work done beside the decode loop stays on its own thread.

The scheduler's thread runs each batch step's ops over torch's threads (ATen's OpenMP regions, MKL's for
matmuls). An adapter load runs in its request's thread meanwhile. Were its copies to go parallel too:
- it would take a core from the step, whose parallel ops then wait for it;
- its thread would keep an OpenMP team for the rest of its life, and libgomp, once it manages more threads
  than there are cores, stops spinning between parallel regions: every parallel op of every later step then
  waits for a sleeping thread to wake, and a decode step makes hundreds of them (`bench/thread_share.py`
  measures it).

`serial()` sets the calling thread's own OpenMP and MKL thread counts to one while it lasts (not the
process's, as `torch.set_num_threads` does). Where torch links neither library (another platform's build),
it changes nothing.
"""
from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_OPENMP = re.compile(r"/lib(?:g|i)?omp[^/]*\.so[.0-9]*$")  # libgomp (torch's Linux wheels), libiomp5, libomp


@functools.cache
def _controls() -> tuple[Callable[[], int] | None, Callable[[int], None] | None, Callable[[int], int] | None]:
    """(omp_get_max_threads, omp_set_num_threads, MKL_Set_Num_Threads_Local) of the libraries torch loaded."""
    omp = _loaded_openmp()
    get = set_ = None
    if omp is not None and hasattr(omp, "omp_set_num_threads") and hasattr(omp, "omp_get_max_threads"):
        get, set_ = omp.omp_get_max_threads, omp.omp_set_num_threads
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
    mkl = None
    try:  # MKL is linked into libtorch_cpu; its C entry point (the lower-case name is Fortran's: a pointer)
        mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
        mkl.restype, mkl.argtypes = ctypes.c_int, [ctypes.c_int]
    except (OSError, AttributeError):
        pass
    return get, set_, mkl


def _loaded_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's, if several are), opened again by path: the same
    library, not a second copy."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if _OPENMP.search(line.rstrip())}
    except OSError:
        return None
    torch_lib = str(Path(torch.__file__).parent / "lib")
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_lib), p)):  # torch's own copy first
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@contextmanager
def serial() -> Iterator[None]:
    """Run the calling thread's torch CPU ops on that thread alone while this lasts (nested uses are fine)."""
    get, set_, mkl = _controls()
    torch.get_num_threads()  # ATen sets a thread's OpenMP count at its first parallel op: let it, before this
    before = get() if get is not None else 0
    if set_ is not None:
        set_(1)
    mkl_before = mkl(1) if mkl is not None else 0
    try:
        yield
    finally:
        if set_ is not None:
            set_(before)
        if mkl is not None:
            mkl(mkl_before)
