"""runtime/cpu_threads.py: a thread under `serial()` runs torch's CPU ops on itself alone and keeps no OpenMP team
(whose idle threads would make libgomp stop spinning for the decode loop's parallel ops), without touching the
thread counts of any other thread."""
from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch

from runtime.cpu_threads import serial


def _new_threads_of_a_live_worker(context: AbstractContextManager) -> tuple[int, list[int]]:
    """OS threads a worker thread leaves behind it while it lives, after ops that go parallel unless kept
    serial; and the torch thread counts it saw inside and after `context`."""
    a, b = torch.randn(512, 512), torch.randn(1 << 22)
    seen: list[int] = []
    done, finish = threading.Event(), threading.Event()

    def work() -> None:
        with context:
            a @ a  # MKL's threads
            b.clone().sum()  # ATen's OpenMP regions
            torch.cat([b, b])
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
        done.set()
        finish.wait()

    before = len(os.listdir("/proc/self/task"))
    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert done.wait(60)
        return len(os.listdir("/proc/self/task")) - before - 1, seen
    finally:
        finish.set()
        worker.join()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_thread_under_serial_runs_torch_on_itself_and_keeps_no_openmp_team():
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one thread here: nothing to keep apart")
    kept, seen = _new_threads_of_a_live_worker(serial())
    assert kept == 0 and seen == [1, threads]  # one inside, the process's count again after
    assert torch.get_num_threads() == threads  # other threads' counts are untouched
    with serial(), serial():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads  # nested uses restore the outer count
    # the control: the same worker without serial() leaves its team's threads behind while it lives
    kept, seen = _new_threads_of_a_live_worker(nullcontext())
    assert kept >= 1 and seen == [threads, threads]
