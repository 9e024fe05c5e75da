"""Crash safety and concurrency with real processes: several `hub push` at once all land, and a push
killed with SIGKILL at any point leaves a valid index and no half-visible version."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import legacy_registry
from hub.registry import Registry
from hub.store import TMP_DIR

pytestmark = pytest.mark.slow  # registry writers in several processes


def hub_push(folder: Path, name: str, version: str, home: Path, pause: float | None = None,
             pause_at: str | None = None, resume: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "HUB_HOME": str(home)}
    if pause is not None:
        env["HUB_PUSH_PAUSE"] = str(pause)
    if pause_at is not None:
        env["HUB_PUSH_PAUSE_AT"] = pause_at
    if resume is not None:
        env["HUB_PUSH_RESUME"] = str(resume)
    return subprocess.Popen(
        [sys.executable, "-m", "hub", "push", str(folder), "--name", name, "--version", version],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_stage(proc: subprocess.Popen, point: str) -> None:
    """Block until the push announces `point` (`stage#n`: the n-th time it reaches that stage)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f"hub-pause: {point}" in line:
            return
    raise AssertionError(f"push ended (rc {proc.wait()}) before {point!r}: {''.join(lines)}")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_concurrent_pushes_from_many_processes_all_land(technique_adapters, hub_home):
    jobs = [
        ("lora", "team/lora", "1.0.0"), ("lora", "team/lora", "1.1.0"), ("ia3", "team/ia3", "1.0.0"),
        ("bitfit", "bitfit", "2.0.0"),
        ("prompt_tuning", "prompt", "1.0.0"), ("prompt_tuning", "prompt", "1.0.0"),  # same content twice: both succeed
    ]
    # A short pause at every stage keeps the pushes overlapping, so they really contend for the lock.
    procs = [hub_push(technique_adapters[t], name, version, hub_home, pause=0.2) for t, name, version in jobs]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    reg = Registry()
    assert sorted(m.ref for m in reg.list()) == sorted({f"{name}@{version}" for _, name, version in jobs})
    checked, problems = reg.verify()
    distinct = {(t, name, version) for t, name, version in jobs}
    assert problems == [] and checked == sum(len(list(technique_adapters[t].iterdir())) for t, _, _ in distinct)
    for t, name, version in jobs:
        assert reg.materialize(reg.resolve(f"{name}@{version}")).is_dir()


# (stage#n, visible afterwards): a lora artifact has 3 files, so 3 blob writes.
STAGES = [
    ("blob-written#1", False),
    ("blob-written#3", False),
    ("index-temp-written#1", False),
    ("index-committed#1", True),
]


def check_after_kill(home: Path, ref: str, visible: bool) -> None:
    reg = Registry()
    assert reg.verify()[1] == []  # the index loads (schema-valid) and every visible file is intact
    assert [m.ref for m in reg.list() if m.ref == ref] == ([ref] if visible else [])
    assert [m.ref for m in reg.list() if m.ref != ref] == ["kept@1.0.0"]
    reg.gc()
    assert not any((home / TMP_DIR).iterdir())  # the killed writer's temp files are collected
    assert len(list(reg.store.stored())) == 3 + (3 if visible else 0)


@pytest.mark.parametrize("point, visible", STAGES)
def test_push_killed_at_each_stage_leaves_a_valid_index(point, visible, technique_adapters, hub_home):
    Registry().push(technique_adapters["ia3"], "kept", "1.0.0")
    proc = hub_push(technique_adapters["lora"], "victim", "1.0.0", hub_home, pause=60, pause_at=point)
    wait_for_stage(proc, point)
    kill(proc)
    check_after_kill(hub_home, "victim@1.0.0", visible)
    # the lock died with the process: the same push now completes
    assert Registry().push(technique_adapters["lora"], "victim", "1.0.0").ref == "victim@1.0.0"
    assert Registry().verify()[1] == []


def test_push_killed_at_random_moments_leaves_a_valid_index(technique_adapters, hub_home):
    rng = random.Random(1234)
    Registry().push(technique_adapters["ia3"], "kept", "1.0.0")
    for attempt, technique in enumerate(["lora", "prompt_tuning", "bitfit"]):  # new blobs every time
        ref = f"victim@1.0.{attempt}"
        proc = hub_push(technique_adapters[technique], "victim", f"1.0.{attempt}", hub_home, pause=0.1)
        wait_for_stage(proc, "blob-written#1")
        time.sleep(rng.uniform(0.0, 0.5))  # up to five pauses of 0.1 s: from mid-blobs to after the commit
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reg = Registry()
        assert reg.verify()[1] == []
        committed = [m.ref for m in reg.list() if m.ref == ref]
        assert committed in ([], [ref])
        if committed:
            assert reg.materialize(reg.resolve(ref)).is_dir()
    Registry().gc()
    assert not any((hub_home / TMP_DIR).iterdir())


def test_gc_during_a_push_does_not_lose_its_blobs(technique_adapters, hub_home, tmp_path):
    """gc takes blobs no version refers to yet, i.e. those of a push in flight; the push puts them back
    under the lock before it commits, so the version it adds is whole."""
    resume = tmp_path / "resume"
    proc = hub_push(technique_adapters["lora"], "raced", "1.0.0", hub_home, pause=120,
                    pause_at="blob-written#3", resume=resume)
    wait_for_stage(proc, "blob-written#3")
    assert Registry().gc().blobs == 2  # the two blobs this push has written so far
    resume.touch()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reg = Registry()
    assert reg.verify() == (3, []) and reg.materialize(reg.resolve("raced@1.0.0")).is_dir()


def test_threads_reading_a_new_index_parse_it_once(technique_adapters, hub_home, monkeypatch):
    """A server's first burst of requests resolves refs from many threads at once: one of them parses the
    index (O(versions)), the others wait for it and share the result, and all resolve correctly, each
    lookup checking only the entry it uses."""
    import threading

    from hub import index as index_module

    registry = legacy_registry(hub_home)
    for n in range(3):
        registry.push(technique_adapters["lora"], f"burst-{n}", "1.0.0")
    fresh = Registry(hub_home)  # a new process's view: nothing read yet
    parses, checks = [], []
    missed: set[int] = set()  # threads that found no parsed index: all are in read() while one parses
    real_parse, real_check = index_module.IndexFile._parse, index_module.Index._check
    real_cached = index_module.IndexFile._cached

    def counting_cached(self):
        cached = real_cached(self)
        if cached is None:
            missed.add(threading.get_ident())
        return cached

    def counting_parse(self):
        parses.append(self.path)
        end = time.monotonic() + 60  # a hang guard, not a timing check
        while len(missed) < 16:  # the parse lasts until every thread has asked for the index
            assert time.monotonic() < end, f"only {len(missed)} of 16 threads overlapped the parse"
            time.sleep(0.001)
        return real_parse(self)

    def counting_check(self, names):
        checks.append(sorted(names))
        real_check(self, names)

    monkeypatch.setattr(index_module.IndexFile, "_cached", counting_cached)
    monkeypatch.setattr(index_module.IndexFile, "_parse", counting_parse)
    monkeypatch.setattr(index_module.Index, "_check", counting_check)
    go = threading.Barrier(16)
    got: list[str] = []

    def resolve(n: int) -> None:
        go.wait()
        got.append(fresh.resolve(f"burst-{n % 2}").ref)

    threads = [threading.Thread(target=resolve, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"burst-{n % 2}@1.0.0" for n in range(16))
    assert len(missed) == 16 and len(parses) == 1
    assert checks and all(names in (["burst-0"], ["burst-1"]) for names in checks)  # never burst-2
