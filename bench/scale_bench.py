"""Scale: time to first token and throughput while cycling through 1,000 registered adapters, 50 fitting.

Set-up: ADAPTERS random LoRAs (r=8 on q_proj,v_proj: small files) are pushed into a fresh
registry in a temp folder (the bench times the pushes: the registry must take a thousand
versions reasonably fast). A real `hub serve` subprocess on a free localhost port serves the
default base from that registry with --adapter-memory set so that FIT adapters fit the device
tier (the host tier keeps its default, 4x that). CONCURRENCY gRPC clients (one channel each)
then stream REQUESTS requests of NEW_TOKENS greedy tokens each, in three phases on the same
server:
- "base": no adapter (the base model alone: the reference for the other phases);
- "zipf": adapters drawn from a Zipf(s) popularity over all ADAPTERS (a realistic mix: hot
  adapters stay resident, the tail is loaded from host memory or disk);
- "zipf, again": the same requests once more, right after: with every adapter they name resident (when they
  fit the budget), what serving them costs without their loads, so "zipf" less this phase is the loads' cost;
- "round-robin": every request a different adapter, in a shuffled order (the worst case: no
  adapter is ever reused, every request loads one).
Then a second server, whose budget holds only TIGHT adapters (fewer than the CONCURRENCY clients),
runs round-robin again ("round-robin, TIGHT fit"): requests wait for the adapters of running ones to
free device memory instead of failing, and the table counts those waits.
TTFT is measured at the client (request sent -> first streamed token). Cache hits, loads and
evictions are the server's own Prometheus counters (per phase: the difference across it), and
ListAdapters shows the tiers at the end.

    .venv/bin/python bench/scale_bench.py
    .venv/bin/python bench/scale_bench.py --quick
"""
from __future__ import annotations

import argparse
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import (ROOT, add_options, build_config, jsonable, lora_template, median, percentile, script_parser,
                    setup_logging, table, write_random_lora)

from hub import basemodel  # noqa: E402  (common puts the repo on sys.path)

PHASES = ("base", "zipf", "zipf, again", "round-robin")
_LISTENING = re.compile(r"listening on (\S+?)(?:, HTTP API on (http://\S+?/v1))?(?:, metrics on http://([^/\s]+)/metrics)?$")


@dataclass
class ScaleConfig:
    base_model: str = basemodel.DEFAULT_BASE_MODEL
    adapters: int = 1000
    fit: int = 50
    tight: int = 4  # adapters the second server's budget holds (fewer than the concurrent clients)
    requests: int = 128
    concurrency: int = 16
    new_tokens: int = 8
    prompt_tokens: int = 16
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    zipf_s: float = 1.0
    seed: int = 0
    server_threads: int = 0  # torch threads in the server (OMP_NUM_THREADS); 0: torch's default
    startup_timeout: float = 300.0
    workdir: Path | None = field(default=None, repr=False)

    def describe(self, adapter_bytes: int | None = None) -> str:
        size = f" ({adapter_bytes / 2**20:.2f} MiB each on the device)" if adapter_bytes else ""
        return (f"{self.adapters} LoRA adapters r={self.rank} on {','.join(self.targets)}{size}, "
                f"device budget = {self.fit} of them, then {self.tight} (host tier: the default 4x); "
                f"{self.base_model}, fp32 CPU; "
                f"{self.concurrency} concurrent streaming clients, {self.requests} requests per phase, "
                f"{self.prompt_tokens}-token prompts, {self.new_tokens} new tokens each (greedy)")


QUICK = dict(adapters=60, fit=10, tight=2, requests=24, concurrency=4, new_tokens=4, prompt_tokens=8)


# -- registry --------------------------------------------------------------------------------------

def push_adapters(config: ScaleConfig, registry_root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Write and push config.adapters random LoRAs; returns push timings and the adapter's device bytes."""
    from hub.registry import Registry

    base, _ = basemodel.load(config.base_model)
    scratch = Path(tempfile.mkdtemp(prefix="scale-src-", dir=registry_root.parent))
    peft_config, shapes = lora_template(base, scratch / "template", targets=config.targets, r=config.rank)
    del base
    registry = Registry(registry_root)
    seconds: list[float] = []
    started = time.perf_counter()
    for i in range(config.adapters):
        folder = write_random_lora(scratch / "next", peft_config, shapes, config.seed + i)
        t0 = time.perf_counter()
        registry.push(folder, adapter_name(i), "1.0.0", base_model=config.base_model)
        seconds.append(time.perf_counter() - t0)
        shutil.rmtree(folder)
        if (i + 1) % 100 == 0:
            log(f"scale: pushed {i + 1}/{config.adapters} ({sum(seconds[-100:]):.1f} s for the last 100)")
    shutil.rmtree(scratch)
    total = time.perf_counter() - started
    tenth = max(1, len(seconds) // 10)
    elements = sum(_numel(s) for s in shapes.values())
    return {"count": config.adapters, "total_s": total, "push_s_total": sum(seconds),
            "pushes_per_s": config.adapters / sum(seconds), "first_tenth_s_per_push": median(seconds[:tenth]),
            "last_tenth_s_per_push": median(seconds[-tenth:]), "adapter_bytes": elements * 4}


def adapter_name(i: int) -> str:
    return f"scale{i:04d}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- server ----------------------------------------------------------------------------------------

class Server:
    """A `hub serve` subprocess; its address, HTTP API URL (with --http-port) and metrics port come from its
    'listening on' line."""

    def __init__(self, args: list[str], log_path: Path, timeout: float, threads: int = 0):
        self.log_path = log_path
        self._log = log_path.open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        self.proc = subprocess.Popen([sys.executable, "-m", "hub", "serve", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.PIPE, text=True)
        self._ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.address, self.metrics, self.http = self._ready.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"hub serve did not start within {timeout:.0f} s:\n{self.log_tail()}") from None
        if self.address is None:
            self.stop()
            raise RuntimeError(f"hub serve exited before listening:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            m = _LISTENING.search(line.strip())
            if m:
                self._ready.put((m.group(1), m.group(3), m.group(2)))
        self._ready.put((None, None, None))

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system, all threads): its work, which other jobs on a
        shared machine slow down far less than its wall time (with one torch thread no CPU time is spinning)."""
        stats = self.stats()
        return stats["user_s"] + stats["system_s"]

    def stats(self) -> dict[str, float]:
        """The server's counters from /proc: user and system CPU seconds, minor page faults (a page touched for
        the first time since it was mapped: the kernel zeroes it, system time the process pays) and context
        switches, for the whole process and for its busiest thread so far (the decode loop, once it has run)."""
        tick = os.sysconf("SC_CLK_TCK")
        stat = lambda path: Path(path).read_text().rsplit(")", 1)[1].split()  # noqa: E731
        fields = stat(f"/proc/{self.proc.pid}/stat")
        threads = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                f = stat(task / "stat")
                status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
            except OSError:  # the thread ended
                continue
            switches = int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])
            threads[task.name] = ((int(f[11]) + int(f[12])) / tick, int(f[12]) / tick, int(f[7]), switches)
        return {"user_s": int(fields[11]) / tick, "system_s": int(fields[12]) / tick, "minflt": int(fields[7]),
                "majflt": int(fields[9]), "threads": threads}

    def scrape(self) -> dict[str, float]:
        """The server's Prometheus samples, keyed `name{label=value,...}`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# -- clients ---------------------------------------------------------------------------------------

def request_refs(config: ScaleConfig, phase: str) -> list[str | None]:
    """The adapter each request of a phase names (None: no adapter), drawn with a fixed seed."""
    rng = random.Random(f"{config.seed}-{phase}")
    order = list(range(config.adapters))
    rng.shuffle(order)  # popularity rank -> adapter: the hot ones are not simply the first pushed
    if phase == "base":
        return [None] * config.requests
    if phase == "zipf":
        weights = [1 / (rank + 1) ** config.zipf_s for rank in range(config.adapters)]
        picks = rng.choices(order, weights=weights, k=config.requests)
    else:
        picks = [order[i % config.adapters] for i in range(config.requests)]
    return [f"{adapter_name(i)}@1.0.0" for i in picks]


def run_clients(address: str, refs: list[str | None], config: ScaleConfig, vocab: int) -> dict[str, Any]:
    """Stream every request through `concurrency` client threads; per-request TTFT, tokens and errors."""
    import grpc

    from runtime.client import RuntimeClient

    jobs: queue.Queue = queue.Queue()
    for i, ref in enumerate(refs):
        prompt = random.Random(f"prompt-{i}").choices(range(min(100, vocab // 2), vocab), k=config.prompt_tokens)
        jobs.put((ref, prompt))
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker() -> None:
        with RuntimeClient(address, timeout=600) as client:
            while True:
                try:
                    ref, prompt = jobs.get_nowait()
                except queue.Empty:
                    return
                record: dict[str, Any] = {"ref": ref, "tokens": 0, "ttft": None, "error": None}
                start = time.perf_counter()
                try:
                    for chunk in client.generate_stream(token_ids=prompt, adapters=[ref] if ref else [],
                                                        max_new_tokens=config.new_tokens, temperature=0.0):
                        if chunk.token_ids and record["ttft"] is None:
                            record["ttft"] = time.perf_counter() - start
                        record["tokens"] += len(chunk.token_ids)
                except grpc.RpcError as e:
                    record["error"] = f"{e.code().name}: {e.details()}"
                record["latency"] = time.perf_counter() - start
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=worker) for _ in range(config.concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in records if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in records)
    errors = [r["error"] for r in records if r["error"]]
    return {"requests": len(records), "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "distinct_adapters": len({r for r in refs if r})}


_COUNTERS = {
    "device_hits": "adapterhub_adapter_cache_hits_total{tier=device}",
    "host_hits": "adapterhub_adapter_cache_hits_total{tier=host}",
    "disk_loads": "adapterhub_adapter_cache_misses_total",
    "device_evictions": "adapterhub_adapter_evictions_total{tier=device}",
    "host_evictions": "adapterhub_adapter_evictions_total{tier=host}",
    "load_seconds_sum": "adapterhub_adapter_load_seconds_sum{source=disk}",
    "load_seconds_host_sum": "adapterhub_adapter_load_seconds_sum{source=host}",
    "waits": "adapterhub_adapter_memory_waits_total",
    "steps": "adapterhub_step_rows_count",
    "prefills": "adapterhub_prefills_total",
}


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The adapter-cache counters a phase added, and the device hit ratio they give."""
    d = {name: after.get(key, 0.0) - before.get(key, 0.0) for name, key in _COUNTERS.items()}
    uses = d["device_hits"] + d["host_hits"] + d["disk_loads"]
    d["device_hit_ratio"] = d["device_hits"] / uses if uses else float("nan")
    disk_s, host_s = d.pop("load_seconds_sum"), d.pop("load_seconds_host_sum")
    d["mean_disk_load_s"] = disk_s / d["disk_loads"] if d["disk_loads"] else float("nan")
    d["mean_host_load_s"] = host_s / d["host_hits"] if d["host_hits"] else float("nan")
    return d


def server_delta(before: dict[str, Any], after: dict[str, Any], tokens: int) -> dict[str, float]:
    """What a phase cost the server per token generated: CPU (user, system, and the busiest thread's: the decode
    loop, the rest being request handlers' loads and gRPC), minor page faults and context switches."""
    per = 1 / max(1, tokens)
    cpu = {tid: [a - b for a, b in zip(s, before["threads"].get(tid, (0.0, 0.0, 0, 0)))]
           for tid, s in after["threads"].items()}
    busiest = max(cpu.values())
    d = {name: (after[name] - before[name]) * per for name in ("user_s", "system_s", "minflt", "majflt")}
    return {"cpu_ms_per_token": 1000 * (d["user_s"] + d["system_s"]), "user_ms_per_token": 1000 * d["user_s"],
            "system_ms_per_token": 1000 * d["system_s"], "busiest_thread_ms_per_token": 1000 * busiest[0] * per,
            "busiest_thread_system_ms_per_token": 1000 * busiest[1] * per, "busiest_thread_minflt_per_token": busiest[2] * per,
            "minflt_per_token": d["minflt"], "majflt_per_token": d["majflt"],
            "switches_per_token": sum(t[3] for t in cpu.values()) * per,
            "busiest_thread_switches_per_token": busiest[3] * per}


# -- the bench -------------------------------------------------------------------------------------

def run_scale(config: ScaleConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Push, serve, drive the three phases; returns {"config", "push", "phases", "tiers_at_end", "table"}."""
    owned = config.workdir is None  # a temp registry of ~2 GB: removed at the end
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_scale(config, workdir, log)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_scale(config: ScaleConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoConfig

    from runtime.client import RuntimeClient
    from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

    registry_root = workdir / "registry"
    log(f"scale: {config.describe()}")
    push = push_adapters(config, registry_root, log)
    log(f"scale: pushed {push['count']} adapters in {push['total_s']:.1f} s "
        f"({push['pushes_per_s']:.1f} pushes/s of registry time)")
    def serve(fit: int, name: str) -> Server:
        budget = fit * push["adapter_bytes"] + push["adapter_bytes"] // 2
        return Server(["--base-model", config.base_model, "--port", "0", "--registry", str(registry_root),
                       "--adapter-memory", str(budget), "--max-batch-size", str(config.concurrency),
                       "--max-queue", str(max(128, config.requests)), "--metrics-port", "0", "--grace", "10"],
                      workdir / f"{name}.log", config.startup_timeout, config.server_threads)

    def run_phase(server: Server, phase: str, refs: str) -> None:
        before, stats = server.scrape(), server.stats()
        phases[phase] = run_clients(server.address, request_refs(config, refs), config, vocab)
        phases[phase]["cache"] = cache_delta(before, server.scrape())
        phases[phase]["server"] = server_delta(stats, server.stats(), phases[phase]["tokens"])
        phases[phase]["server_cpu_ms_per_token"] = phases[phase]["server"]["cpu_ms_per_token"]
        log(f"scale: phase {phase} done in {phases[phase]['wall_s']:.1f} s")

    def warm_up(client) -> None:
        client.generate(token_ids=[min(100, vocab // 2)] * config.prompt_tokens, max_new_tokens=2)

    budget = config.fit * push["adapter_bytes"] + push["adapter_bytes"] // 2
    server = serve(config.fit, "server")
    vocab = AutoConfig.from_pretrained(basemodel.resolve(config.base_model)).vocab_size
    phases: dict[str, Any] = {}
    try:
        with RuntimeClient(server.address, timeout=600) as client:
            warm_up(client)
            for phase in PHASES:
                run_phase(server, phase, phase.removesuffix(", again"))
            listing = client.list_all_adapters()
        tiers: dict[str, int] = {}
        for a in listing.adapters:
            tier = pb.Tier.Name(a.tier).removeprefix("TIER_").lower()
            tiers[tier] = tiers.get(tier, 0) + 1
        tiers_info = {"adapters_by_tier": tiers, "device_used_bytes": listing.device_used_bytes,
                      "device_budget_bytes": listing.device_budget_bytes}
    finally:
        code = server.stop()
    tight = serve(config.tight, "server-tight")  # a budget smaller than the clients: requests wait for room
    try:
        with RuntimeClient(tight.address, timeout=600) as client:
            warm_up(client)
        run_phase(tight, f"round-robin, {config.tight} fit", "round-robin")
    finally:
        tight_code = tight.stop()
    code = code or tight_code
    result = {"config": jsonable(asdict(config)), "description": config.describe(push["adapter_bytes"]),
              "push": push, "device_budget_bytes": budget, "phases": phases, "tiers_at_end": tiers_info,
              "server_exit_code": code}
    result["table"] = render(result)
    log(result["table"])
    return result


def render(result: dict[str, Any]) -> str:
    push, phases = result["push"], result["phases"]
    base_rate = phases["base"]["tokens_per_s"]
    base_cpu = phases["base"]["server_cpu_ms_per_token"]
    rows = []
    for name, p in phases.items():
        c = p["cache"]
        label = f"zipf s={result['config']['zipf_s']}" if name == "zipf" else name
        rows.append([label, str(p["requests"]), str(p["distinct_adapters"]), str(p["errors"]),
                     f"{p['ttft_p50_s'] * 1000:.0f}", f"{p['ttft_p95_s'] * 1000:.0f}", f"{p['tokens_per_s']:.1f}",
                     f"{p['tokens_per_s'] / base_rate:.2f}x",
                     "-" if name == "base" else f"{c['device_hit_ratio']:.2f}",
                     f"{c['host_hits']:.0f}", f"{c['disk_loads']:.0f}",
                     f"{c['device_evictions']:.0f}/{c['host_evictions']:.0f}", f"{c['waits']:.0f}",
                     f"{p['server_cpu_ms_per_token']:.1f}", f"{base_cpu / p['server_cpu_ms_per_token']:.2f}x"])
    head = ["phase", "requests", "adapters", "errors", "TTFT p50 ms", "TTFT p95 ms", "tok/s", "vs base",
            "device hit ratio", "host hits", "disk loads", "evictions dev/host", "waits for room",
            "server CPU ms/token", "base CPU / CPU"]
    tiers = result["tiers_at_end"]
    server = [[name, *(f"{p['server'][k]:.{digits}f}" for k, digits in SERVER_COLUMNS.values()),
               f"{p['cache']['steps']:.0f}", f"{p['cache']['prefills']:.0f}"] for name, p in phases.items()]
    return "\n".join([
        "scale: cycling through many registered adapters with few fitting the adapter memory budget",
        result["description"],
        f"push: {push['count']} adapters in {push['push_s_total']:.1f} s of registry time "
        f"({push['pushes_per_s']:.1f}/s; median push {push['first_tenth_s_per_push'] * 1000:.0f} ms in the first "
        f"tenth, {push['last_tenth_s_per_push'] * 1000:.0f} ms in the last)",
        table(head, rows),
        "the server per token generated (busiest thread: the decode loop), and its batch steps and prefill forwards:",
        table(["phase", *SERVER_COLUMNS, "steps", "prefills"], server),
        f"at the end of round-robin: adapters by tier {tiers['adapters_by_tier']}, device "
        f"{tiers['device_used_bytes']} of {tiers['device_budget_bytes']} bytes; the last row is a second server "
        f"whose budget holds {result['config']['tight']} adapters for {result['config']['concurrency']} clients "
        f"(vs base: the first server's base phase)",
    ])


SERVER_COLUMNS = {"CPU ms": ("cpu_ms_per_token", 1), "user ms": ("user_ms_per_token", 1),
                  "system ms": ("system_ms_per_token", 1), "busiest thread ms": ("busiest_thread_ms_per_token", 1),
                  "its system ms": ("busiest_thread_system_ms_per_token", 1),
                  "its minor faults": ("busiest_thread_minflt_per_token", 0),
                  "its context switches": ("busiest_thread_switches_per_token", 1),
                  "minor faults": ("minflt_per_token", 0), "context switches": ("switches_per_token", 1)}


OPTIONS = ("adapters", "fit", "tight", "requests", "concurrency", "new_tokens", "prompt_tokens", "zipf_s",
           "server_threads")


def add_arguments(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    add_options(ap, ScaleConfig(), OPTIONS, prefix, {"fit": "adapters the device budget holds",
                                                     "tight": "adapters the second server's budget holds",
                                                     "server_threads": "torch threads in the server (1: its CPU time "
                                                                       "is its work, a measure that holds on a busy "
                                                                       "machine); 0: torch's default"})


def config_from(args: argparse.Namespace, base_model: str, quick: bool = False, prefix: str = "") -> ScaleConfig:
    return build_config(ScaleConfig, args, OPTIONS, base_model, prefix, QUICK if quick else None)


def main() -> None:
    args = script_parser(__doc__, add_arguments).parse_args()
    setup_logging()
    run_scale(config_from(args, args.base_model, args.quick))


if __name__ == "__main__":
    main()
