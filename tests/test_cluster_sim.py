"""The scale-out simulation of bench/cluster_bench.py, without Ray: the facts its predictions rest on, which do not
depend on timing (hits under affinity and random routing, work conserved, throughput growing with replicas)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cluster_bench  # noqa: E402

COSTS = dict(step_fixed=0.004, step_per_row=0.002, cold_load=0.02, routing_overhead=0.003)
SETUP = cluster_bench.Setup(adapters=40, budget_adapters=4, max_new_tokens=4)


def run(replicas: int, workload: str, routing: str) -> dict:
    return cluster_bench.simulate(replicas, workload, routing, COSTS, SETUP, requests_per_replica=100)


def test_affinity_keeps_the_hit_ratio_that_random_routing_loses():
    affinity, random_ = run(8, "zipf", "affinity"), run(8, "zipf", "random")
    assert affinity["hit_ratio"] > random_["hit_ratio"]
    # round-robin over 40 adapters: no replica's 4 slots ever hold the next one, unless 8 x 4 slots with
    # affinity hold nearly all of them
    assert run(1, "round-robin", "affinity")["hit_ratio"] == 0


def test_throughput_grows_with_replicas_each_on_its_own_cores():
    one, four = run(1, "zipf", "affinity"), run(4, "zipf", "affinity")
    assert four["tokens_per_s"] > 2 * one["tokens_per_s"]
    assert one["ttft_p50"] > 0 and one["ttft_p99"] >= one["ttft_p50"]


def test_zipf_draws_are_skewed_and_repeatable():
    refs = cluster_bench.zipf_refs(SETUP, 400, seed=1)
    assert refs == cluster_bench.zipf_refs(SETUP, 400, seed=1)
    assert refs.count("a000") > refs.count("a039") and refs.count("a000") > 400 / SETUP.adapters
