"""`hub serve --replicas`: adapter affinity on a real local Ray Serve cluster, then a simulation for 1-64 replicas.

Measured (one run, a local Ray cluster on this machine): a random small Llama (the default base's tokenizer),
200 random LoRAs (all 7 projections), a Zipf(s) workload over them from concurrent streaming clients, and three
set-ups with the same per-replica device budget: 1 replica; 2 replicas routed by adapter affinity; 2 replicas
routed at random (by load, no affinity). Each reports the device hit ratio (adapter uses served from the device,
from the replicas' own counters, after a warm-up) and the time to first token. On 2 shared cores throughput
cannot grow with replicas, so what is compared is what routing changes: hits, and the TTFT that misses cost.

Calibrated there: the decode step time at 1 and at several rows (-> per-step and per-row cost), the cold load
time (LoadAdapter's load_seconds), and the routing overhead (GetInfo through the cluster minus GetInfo on an
in-process server). The simulation (`simulate`) then predicts throughput and TTFT for 1-64 replicas; its
assumptions are in its docstring and printed with the table.

    .venv/bin/python bench/cluster_bench.py            # ~5 min on 2 shared cores
    .venv/bin/python bench/cluster_bench.py --quick    # a smoke run (not figures)
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from common import ROOT, random_loras, setup_logging, table, write_json  # noqa: F401 (ROOT: puts the repo on sys.path)


@dataclass
class Setup:
    adapters: int = 200
    zipf_s: float = 1.1
    budget_adapters: int = 16  # device budget per replica, in adapters
    clients: int = 4
    warmup: int = 60
    requests: int = 240
    max_new_tokens: int = 8
    hidden: int = 256
    layers: int = 4
    seed: int = 0


def zipf_refs(setup: Setup, count: int, seed: int) -> list[str]:
    """Adapter names drawn Zipf(s) over `adapters` ranks (rank 1 the hottest), a fixed sequence per seed."""
    weights = [1.0 / (k ** setup.zipf_s) for k in range(1, setup.adapters + 1)]
    return [f"a{i:03d}" for i in random.Random(seed).choices(range(setup.adapters), weights=weights, k=count)]


def build(setup: Setup, work: Path) -> tuple[Path, Path, int]:
    """A random small Llama with the default base's tokenizer, and a registry of `adapters` random LoRAs;
    returns (base folder, registry root, bytes of one LoRA on the device)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hub import basemodel
    from hub.registry import Registry

    torch.manual_seed(setup.seed)
    tokenizer = AutoTokenizer.from_pretrained(basemodel.resolve(basemodel.DEFAULT_BASE_MODEL))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=setup.hidden, intermediate_size=setup.hidden * 3,
                         num_hidden_layers=setup.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    registry = Registry(work / "registry")
    folders = random_loras(model, work / "loras", setup.adapters,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    for i, folder in enumerate(folders):
        registry.push(folder, f"a{i:03d}", "1.0.0", base_model=str(base))
    size = sum(p.stat().st_size for p in (folders[0]).glob("*.safetensors"))
    return base, registry.root, size


def run_workload(address: str, refs: list[str], setup: Setup) -> list[dict]:
    """Each ref as one streamed Generate from `clients` threads; per request: TTFT, the replica and its
    counters (from the stream's first chunk and trailing metadata)."""
    from runtime.client import RuntimeClient

    out: list[dict] = []
    lock = threading.Lock()
    queue = list(enumerate(refs))

    def client() -> None:
        with RuntimeClient(address, timeout=300) as c:
            while True:
                with lock:
                    if not queue:
                        return
                    index, ref = queue.pop(0)
                started = time.perf_counter()
                call = c.stub.GenerateStream(c.generate_request("Tell me about the weather", adapters=[ref],
                                                                max_new_tokens=setup.max_new_tokens), timeout=300)
                ttft, tokens = None, 0
                for chunk in call:
                    if chunk.token_ids and ttft is None:
                        ttft = time.perf_counter() - started
                    tokens += len(chunk.token_ids)
                total = time.perf_counter() - started
                meta = dict(call.trailing_metadata())
                with lock:
                    out.append(dict(index=index, ref=ref, ttft=ttft, total=total, tokens=tokens,
                                    replica=meta.get("x-replica-id"), hits=int(meta.get("x-replica-device-hits", 0)),
                                    misses=int(meta.get("x-replica-device-misses", 0))))

    threads = [threading.Thread(target=client) for _ in range(setup.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out, key=lambda r: r["index"])


def hit_ratio(records: list[dict], warmup: int) -> float:
    """Device hits / uses after the warm-up, from each replica's counters (they count every request it served)."""
    def last_by_replica(rows: list[dict]) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}
        for r in rows:  # counters only grow: keep each replica's largest
            h, m = seen.get(r["replica"], (0, 0))
            seen[r["replica"]] = (max(h, r["hits"]), max(m, r["misses"]))
        return seen

    before, after = last_by_replica(records[:warmup]), last_by_replica(records)
    hits = sum(h - before.get(k, (0, 0))[0] for k, (h, _) in after.items())
    misses = sum(m - before.get(k, (0, 0))[1] for k, (_, m) in after.items())
    return hits / max(1, hits + misses)


def measure(setup: Setup, base: Path, registry: Path, lora_bytes: int) -> dict:
    """The three routed set-ups on one local Ray cluster (fresh replicas for each), then the calibration."""
    import ray

    from runtime.cluster import Cluster, ClusterConfig
    from runtime.server import ServerConfig

    budget = int(setup.budget_adapters * lora_bytes * 1.1)
    server = ServerConfig(base_model=str(base), port=0, registry=registry, adapter_memory=budget,
                          host_adapter_memory=0, max_batch_size=16, grace_seconds=2)
    refs = zipf_refs(setup, setup.warmup + setup.requests, setup.seed + 1)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results: dict = {}
    try:
        for name, replicas, random_routing in (("1 replica", 1, False), ("2 replicas, affinity", 2, False),
                                               ("2 replicas, random", 2, True)):
            cluster = Cluster(ClusterConfig(server, replicas=replicas, replica_cpus=0.5,
                                            random_routing=random_routing)).start()
            try:
                records = run_workload(cluster.address, refs, setup)
                measured = records[setup.warmup:]
                results[name] = dict(hit_ratio=hit_ratio(records, setup.warmup),
                                     ttft_p50=statistics.median(r["ttft"] for r in measured),
                                     ttft_p90=statistics.quantiles([r["ttft"] for r in measured], n=10)[-1],
                                     replicas_used=len({r["replica"] for r in measured}))
                if replicas == 1:
                    results["calibration"] = calibrate(cluster, server, setup, records)
            finally:
                cluster.stop(grace=0)
    finally:
        ray.shutdown()
    return results


def calibrate(cluster, server_config, setup: Setup, records: list[dict]) -> dict:
    """Costs for the simulation, on the 1-replica cluster: decode step time at 1 row and at `clients` rows,
    the cold load time, and the routing overhead against an in-process server."""
    from runtime.client import RuntimeClient
    from runtime.server import RuntimeServer

    def step_seconds(concurrent: int) -> float:
        times: list[float] = []

        def one() -> None:
            with RuntimeClient(cluster.address, timeout=300) as c:
                stamps = []
                for chunk in c.generate_stream("Tell me about the weather", max_new_tokens=32):
                    if chunk.token_ids:
                        stamps.append(time.perf_counter())
                times.extend(b - a for a, b in zip(stamps[1:], stamps[2:]))

        threads = [threading.Thread(target=one) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statistics.median(times)

    one_row, many_rows = step_seconds(1), step_seconds(setup.clients)
    with RuntimeClient(cluster.address, timeout=300) as c:
        used = {r["ref"] for r in records}
        cold = [c.load_adapter(f"a{i:03d}").load_seconds for i in range(setup.adapters - 1, 0, -1)
                if f"a{i:03d}" not in used][:8]
        via_cluster = _median_call(lambda: c.info())
    local = RuntimeServer(server_config).start()
    try:
        with RuntimeClient(local.address, timeout=60) as direct:
            direct_call = _median_call(lambda: direct.info())
    finally:
        local.stop(grace=0)
    per_row = max(0.0, (many_rows - one_row) / max(1, setup.clients - 1))
    return dict(step_1_row=one_row, step_per_row=per_row, step_fixed=max(0.0, one_row - per_row),
                cold_load=statistics.median(cold) if cold else 0.0, routing_overhead=max(0.0, via_cluster - direct_call),
                direct_call=direct_call, cluster_call=via_cluster)


def _median_call(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- the simulation -----------------------------------------------------------------------------------------------
def simulate(replicas: int, workload: str, routing: str, costs: dict, setup: Setup, *, clients_per_replica: int = 8,
             requests_per_replica: int = 400, seed: int = 0) -> dict:
    """Predicted tokens/s, TTFT and hit ratio of `replicas` replicas, each on its own cores. Assumptions:
    - each replica runs one continuous batch: a step costs step_fixed + step_per_row x rows (measured), every
      row gains one token per step; a request joins at the next step and leaves after max_new_tokens tokens;
    - a cold load stops that replica's batch for cold_load seconds (the pool loads on the engine's thread);
      each replica holds `budget_adapters` adapters, evicted least recently used;
    - every request pays routing_overhead once before it reaches a replica, and routing is instant otherwise;
    - a closed loop of clients_per_replica x replicas clients, each sending its next request when one ends;
    - workload zipf: adapters drawn Zipf(s) over `adapters`; round-robin: adapters in turn (every one equally,
      none hot: a cache's worst case once adapters > budget x replicas);
    - routing affinity: to a replica holding the adapter with the fewest rows (Serve's power of two among them),
      spilling to the least loaded replica past max_batch rows of that adapter in flight; random: any replica
      at random; no limit on a replica's queue.
    """
    rng = random.Random(seed)
    weights = [1.0 / (k ** setup.zipf_s) for k in range(1, setup.adapters + 1)]
    next_rr = [0]

    def draw() -> int:
        if workload == "zipf":
            return rng.choices(range(setup.adapters), weights=weights)[0]
        next_rr[0] += 1
        return next_rr[0] % setup.adapters

    caches = [OrderedDict() for _ in range(replicas)]
    rows: list[list[dict]] = [[] for _ in range(replicas)]  # requests in each replica's batch
    busy_until = [0.0] * replicas  # time each replica's current step (or load) ends
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, replica)
    seq = [0]
    total = replicas * requests_per_replica
    done: list[dict] = []
    hits = uses = 0
    spill_after = 16

    def push(t: float, kind: str, replica: int) -> None:
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, replica))

    def route(adapter: int) -> int:
        if routing == "random":
            return rng.randrange(replicas)
        holders = [i for i in range(replicas) if adapter in caches[i]
                   and sum(r["adapter"] == adapter for r in rows[i]) < spill_after]
        pool = holders or range(replicas)
        return min(pool, key=lambda i: (len(rows[i]), rng.random()))

    def arrive(now: float) -> None:
        nonlocal hits, uses
        adapter = draw()
        replica = route(adapter)
        cache = caches[replica]
        uses += 1
        load = 0.0
        if adapter in cache:
            hits += 1
            cache.move_to_end(adapter)
        else:
            load = costs["cold_load"]
            cache[adapter] = True
            if len(cache) > setup.budget_adapters:
                cache.popitem(last=False)
        rows[replica].append(dict(adapter=adapter, start=now, tokens=0, load=load))
        if busy_until[replica] <= now:
            push(now + costs["routing_overhead"], "step", replica)
            busy_until[replica] = float("inf")

    now = 0.0
    for _ in range(replicas * clients_per_replica):
        arrive(now)
    issued = replicas * clients_per_replica
    while events and len(done) < total:
        now, _, _, replica = heapq.heappop(events)
        batch = rows[replica]
        if not batch:
            busy_until[replica] = now
            continue
        loads = sum(r.pop("load", 0.0) for r in batch if "load" in r)
        step = loads + costs["step_fixed"] + costs["step_per_row"] * len(batch)
        end = now + step
        finished = []
        for r in batch:
            r["tokens"] += 1
            if r["tokens"] == 1:
                r["ttft"] = end - r["start"] + costs["routing_overhead"]
            if r["tokens"] >= setup.max_new_tokens:
                finished.append(r)
        for r in finished:
            batch.remove(r)
            done.append(r)
        for _ in finished:
            if issued < total:
                issued += 1
                arrive(end)
        push(end, "step", replica)
    span = now or 1.0
    ttfts = sorted(r["ttft"] for r in done)
    return dict(replicas=replicas, workload=workload, routing=routing, hit_ratio=hits / max(1, uses),
                tokens_per_s=sum(r["tokens"] for r in done) / span, ttft_p50=ttfts[len(ttfts) // 2],
                ttft_p99=ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))])


def render(result: dict) -> str:
    m = result["measured"]
    setup = result["setup"]
    lines = [f"Measured: Zipf(s={setup['zipf_s']}) over {setup['adapters']} LoRAs, device budget {setup['budget_adapters']}"
             f" adapters per replica, {setup['clients']} streaming clients, {setup['requests']} requests after "
             f"{setup['warmup']} of warm-up, {setup['max_new_tokens']} new tokens each.", ""]
    rows = [[name, f"{v['hit_ratio']:.2f}", f"{v['ttft_p50'] * 1000:.0f}", f"{v['ttft_p90'] * 1000:.0f}",
             str(v["replicas_used"])] for name, v in m.items() if name != "calibration"]
    lines.append(table(["set-up", "device hit ratio", "TTFT p50 ms", "TTFT p90 ms", "replicas used"], rows))
    single = m["1 replica"]["hit_ratio"]
    lines.append(f"\naffinity hit ratio / 1 replica's: {m['2 replicas, affinity']['hit_ratio'] / max(single, 1e-9):.2f};"
                 f" random / 1 replica's: {m['2 replicas, random']['hit_ratio'] / max(single, 1e-9):.2f}")
    c = m["calibration"]
    lines.append(f"\nCalibration: decode step {c['step_fixed'] * 1000:.1f} ms + {c['step_per_row'] * 1000:.2f} ms/row; "
                 f"cold load {c['cold_load'] * 1000:.1f} ms; routing overhead {c['routing_overhead'] * 1000:.1f} ms "
                 f"(GetInfo {c['cluster_call'] * 1000:.1f} ms via the cluster, {c['direct_call'] * 1000:.1f} ms direct)")
    lines.append("\nSimulated (each replica on its own cores; assumptions in bench/cluster_bench.py:simulate):\n")
    rows = [[str(s["replicas"]), s["workload"], s["routing"], f"{s['hit_ratio']:.2f}", f"{s['tokens_per_s']:.0f}",
             f"{s['ttft_p50'] * 1000:.0f}", f"{s['ttft_p99'] * 1000:.0f}"] for s in result["simulated"]]
    lines.append(table(["replicas", "workload", "routing", "hit ratio", "tokens/s", "TTFT p50 ms", "TTFT p99 ms"], rows))
    return "\n".join(lines)


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not figures")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    args = ap.parse_args()
    setup = Setup(adapters=40, budget_adapters=4, warmup=10, requests=30) if args.quick else Setup()
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        base, registry, lora_bytes = build(setup, Path(tmp))
        measured = measure(setup, base, registry, lora_bytes)
    costs = measured["calibration"]
    simulated = [simulate(n, w, r, costs, setup, requests_per_replica=50 if args.quick else 300)
                 for w in ("zipf", "round-robin") for r in ("affinity", "random") for n in (1, 2, 4, 8, 16, 32, 64)]
    result = dict(setup=asdict(setup), lora_bytes=lora_bytes, measured=measured, simulated=simulated,
                  machine=f"{sys.platform}, {__import__('os').cpu_count()} CPUs",
                  date=time.strftime("%Y-%m-%d", time.gmtime()))
    print(render(result))
    if not args.quick:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
    else:
        json.dumps(result)


if __name__ == "__main__":
    main()
