"""Graphed decode steps (runtime/graphs.py) give the eager step's logits, through joins, leaves and adapter loads.

On a CPU the graphs run emulated: the same static buffers, masks and in-place cache writes as a CUDA graph, the
replay running the step again. With HUB_TEST_DEVICE=cuda the same tests also capture real CUDA graphs.
Every comparison is against the same engine's eager steps (HUB_CUDA_GRAPHS off), on a copy of the same model.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import pytest
import torch
from helpers import tiny_llama

from hub.artifact import read_adapter
from runtime import kvcache
from runtime.engine import Engine
from runtime.generate import Batch, Row, SamplingParams
from runtime.graphs import CAPTURE_AFTER, DecodeGraphs
from runtime.plan import AdapterUse, RowPlan
from runtime.techniques.slots import CHUNK, SlotBuffer, bucket, store_of

DEVICE = os.environ.get("HUB_TEST_DEVICE", "cpu")
MODES = ["emulate"] + (["auto"] if DEVICE == "cuda" else [])
TOLERANCE = 1e-5  # fp32: the graphed step attends over masked room columns too, summed in another order


def plan(*keys: str, mode: str = "stack") -> RowPlan:
    return RowPlan(tuple(AdapterUse(k) for k in keys), mode)


def engine_pair(technique_adapters, mode: str, keys=("lora", "ia3", "bitfit", "bottleneck", "prompt_tuning")
                ) -> tuple[Engine, Engine]:
    """(graphed, eager) engines over copies of one model, serving the same adapters."""
    model = tiny_llama().to(DEVICE)
    # no end-of-sequence token: every row ends at its length, so a test's schedule sets the live rows per step
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    pair = []
    for graphs in (mode, "off"):
        engine = Engine(copy.deepcopy(model))
        engine.graphs = DecodeGraphs(engine.device, graphs)
        for key in keys:
            engine.load(key, read_adapter(technique_adapters[key]))
        pair.append(engine)
    return pair[0], pair[1]


def decode_logits(engine: Engine, plans: list[RowPlan], steps: int,
                  between: Callable[[int], None] = lambda step: None) -> list[torch.Tensor]:
    """Each step's last logits: a prefill of fixed prompts, then greedy decode steps with the KV cache
    (`between(step)` runs before each)."""
    prompts = [[5, 9, 17, 33], [7, 100, 3], [44, 12, 90, 61, 70], [15, 16], [101, 6, 55]][:len(plans)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    logits, cache = engine.forward(ids, mask, plans, last_only=True)
    soft = engine.prompt_lengths(plans)  # the prefill put each row's soft prompt left of its tokens
    mask = torch.zeros(len(plans), width + max(soft), dtype=torch.long, device=DEVICE)
    for row, p in enumerate(prompts):
        mask[row, mask.shape[1] - len(p) - soft[row]:] = 1
    seen = [logits[:, -1]]
    for step in range(steps):
        between(step)
        mask = torch.cat([mask, mask.new_ones(len(plans), 1)], dim=1)
        logits, cache = engine.forward(seen[-1].argmax(-1, keepdim=True), mask, plans, cache=cache, last_only=True)
        seen.append(logits[:, -1])
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_graphed_steps_give_the_eager_logits_for_every_technique(technique_adapters, mode):
    graphed, eager = engine_pair(technique_adapters, mode)
    plans = [plan("lora"), plan("ia3", "bitfit"), plan(), plan("bottleneck"), plan("prompt_tuning", "lora")]
    steps = 8
    for step, (g, e) in enumerate(zip(decode_logits(graphed, plans, steps), decode_logits(eager, plans, steps))):
        torch.testing.assert_close(g, e, atol=TOLERANCE, rtol=0, msg=f"step {step}")
    # the first decode step moves the prefill's cache into buffers of its own, CAPTURE_AFTER more run eagerly,
    # then one capture and a replay per step
    assert graphed.graphs.captures == 1
    assert graphed.graphs.replays == steps - 1 - CAPTURE_AFTER
    assert eager.graphs.replays == 0


@pytest.mark.parametrize("mode", MODES)
def test_joins_leaves_and_loads_recapture_and_keep_every_row_exact(technique_adapters, mode):
    """Continuous batching: rows join and leave at different steps (new compositions, cache rows moved in
    place) and an adapter is loaded mid-stream (graphs dropped); greedy tokens and their logprobs equal the
    eager engine's."""
    graphed, eager = engine_pair(technique_adapters, mode)
    outputs = []
    for engine in (graphed, eager):
        batch = Batch(engine, max_rows=8)
        arrivals = {0: [("a", plan("lora"), 12), ("b", plan(), 20)], 5: [("c", plan("ia3"), 9)],
                    9: [("d", plan("bitfit", "lora"), 14), ("e", plan("bottleneck"), 6)]}
        rows = []
        for step in range(40):
            for name, p, tokens in arrivals.get(step, []):
                row = Row(name, [3 + len(name), 40, 41, 42][:2 + step % 3], p,
                          SamplingParams(max_new_tokens=tokens, logprobs=0))
                batch.add(row)
                rows.append(row)
            if step == 20:
                engine.load("lora2", read_adapter(technique_adapters["lora"]))
            batch.step()
        assert all(r.finish_reason == "length" for r in rows)
        outputs.append([(r.output_ids, [lp.logprob for lp in r.logprobs]) for r in rows])
    for (g_ids, g_lp), (e_ids, e_lp) in zip(*outputs):
        assert g_ids == e_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(e_lp), atol=TOLERANCE, rtol=0)
    assert graphed.graphs.captures >= 3 and graphed.graphs.replays > 0  # several compositions were graphed


def test_a_load_drops_the_graphs_and_a_cache_without_room_runs_eagerly(technique_adapters):
    graphed, _ = engine_pair(technique_adapters, "emulate", keys=("lora",))
    decode_logits(graphed, [plan("lora"), plan()], CAPTURE_AFTER + 3)
    assert graphed.graphs.captures == 1 and len(graphed.graphs._graphs) == 1
    graphed.load("ia3", read_adapter(technique_adapters["ia3"]))
    assert not graphed.graphs._graphs  # a slot a graph reads may now hold another adapter
    # a cache whose buffers are full has no geometry: the step runs eagerly (and moves them)
    _, cache = graphed.forward(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), [plan()])
    graphed.forward(torch.tensor([[7]]), torch.ones(1, 3, dtype=torch.long), [plan()], cache=cache)
    assert kvcache.geometry(cache) is not None
    for layer in cache.layers:
        for span in (layer._keys_span, layer._values_span):
            span.end = span.tensor.shape[-2]
    assert kvcache.geometry(cache) is None


@pytest.mark.parametrize("mode", MODES)
def test_a_slot_buffer_growing_mid_stream_retires_the_graph_that_read_it(technique_adapters, mode):
    """Adapters prepared (not installed) while a graph replays grow the LoRA buffers: the graph keeps the old
    tensors alive (a replay on its way reads valid memory), is not replayed after the growth, and the steps
    after it equal the eager engine's."""
    graphed, eager = engine_pair(technique_adapters, mode, keys=("lora",))
    plans, steps, prepared = [plan("lora"), plan()], 10, []
    grow_at = 2 + CAPTURE_AFTER + 1  # after the capture and one replay
    seen: dict[str, Any] = {}

    def grow(step: int) -> None:
        if step != grow_at:
            return
        graph = next(iter(graphed.graphs._graphs.values()))
        seen["before"] = (SlotBuffer.growths, [p.data_ptr() for p in graph.holds[1]])
        prepared.extend(graphed.prepare(f"spare{i}", read_adapter(technique_adapters["lora"])) for i in range(CHUNK))
        seen["replays"] = graphed.graphs.replays

    got = decode_logits(graphed, plans, steps, grow)
    for step, (g, e) in enumerate(zip(got, decode_logits(eager, plans, steps))):
        torch.testing.assert_close(g, e, atol=TOLERANCE, rtol=0, msg=f"step {step}")
    growths, held = seen["before"]
    assert SlotBuffer.growths > growths  # the spare adapters grew the buffers the graph read
    graph = next(iter(graphed.graphs._graphs.values()))
    assert [p.data_ptr() for p in graph.holds[1]] == held  # still alive, not reused
    # after the growth: CAPTURE_AFTER eager steps, then a new capture and its replays
    assert graphed.graphs.captures == 2
    assert graphed.graphs.replays == seen["replays"] + (steps - grow_at - CAPTURE_AFTER)


@pytest.mark.parametrize("mode", MODES)
def test_a_graph_outlives_joins_and_leaves_of_rows_alike(technique_adapters, tmp_path, mode):
    """Rows that leave and are replaced by rows of other adapters with the same structure (one LoRA of one rank
    at the same sites) keep the graph: the new index values are copied into the tensors it reads, with no new
    capture, and every row's tokens and logprobs equal the eager engine's."""
    from helpers import save_peft_adapter
    from peft import LoraConfig

    others = [save_peft_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                tmp_path / f"lora{i}", seed=10 + i) for i in range(3)]
    graphed, eager = engine_pair(technique_adapters, mode, keys=("lora",))
    outputs = []
    for engine in (graphed, eager):
        for i, folder in enumerate(others):
            engine.load(f"other{i}", read_adapter(folder))
        batch, rows = Batch(engine, max_rows=2), []
        # two rows at a time, each its own LoRA; a row ends every few steps and another, of another LoRA, takes
        # its place (short prompts: the cache's buffers keep their room and addresses)
        queue = [("a", "lora", 9), ("b", "other0", 16), ("c", "other1", 8), ("d", "other2", 12), ("e", "lora", 6)]
        for step in range(60):
            while queue and len(batch) < 2:
                name, key, tokens = queue.pop(0)
                row = Row(name, [5, 6 + len(rows)], plan(key), SamplingParams(max_new_tokens=tokens, logprobs=0))
                batch.add(row)
                rows.append(row)
            if not len(batch):
                break
            batch.step()
        assert all(r.finish_reason == "length" for r in rows) and len(rows) == 5
        outputs.append([(r.output_ids, [lp.logprob for lp in r.logprobs]) for r in rows])
    for (g_ids, g_lp), (e_ids, e_lp) in zip(*outputs):
        assert g_ids == e_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(e_lp), atol=TOLERANCE, rtol=0)
    assert graphed.graphs.reuses >= 2  # replaced rows replayed through an existing graph
    assert graphed.graphs.captures < graphed.graphs.reuses + 2


def test_modes_are_checked():
    with pytest.raises(ValueError, match="HUB_CUDA_GRAPHS"):
        DecodeGraphs(torch.device("cpu"), "always")
    assert not DecodeGraphs(torch.device("cpu"), "auto").enabled  # a CPU step is not launch-bound


# -- buckets: a step of R rows runs the graph of a bucket B >= R, rows R..B-1 padding ------------------------------

Schedule = dict[int, list[tuple[str, RowPlan, int]]]  # step -> rows arriving then: (id, plan, max_new_tokens)


def run_schedule(engine: Engine, schedule: Schedule, max_rows: int, steps: int = 80
                 ) -> tuple[list[tuple[list[int], list[float]]], list[tuple[int, bool]]]:
    """Greedy continuous batching of the scheduled rows: each row's tokens and logprobs, and per decode step its
    live rows and whether a graph ran it."""
    batch, rows, seen = Batch(engine, max_rows=max_rows), [], []
    decode = engine.graphs.decode

    def watched(ops, ids, *args):
        logits = decode(ops, ids, *args)
        seen.append((ids.shape[0], logits is not None))
        return logits

    engine.graphs.decode = watched  # type: ignore[method-assign]
    for step in range(steps):
        for name, p, tokens in schedule.get(step, []):
            row = Row(name, [3 + len(rows) % 7, 40 + step % 5, 41][:2 + len(rows) % 2], p,
                      SamplingParams(max_new_tokens=tokens, logprobs=0))
            batch.add(row)
            rows.append(row)
        if not len(batch) and step > max(schedule):
            break
        batch.step()
    assert all(r.finish_reason == "length" for r in rows)
    return [(r.output_ids, [lp.logprob for lp in r.logprobs]) for r in rows], seen


def assert_same(graphed: list[tuple[list[int], list[float]]], eager: list[tuple[list[int], list[float]]]) -> None:
    for (g_ids, g_lp), (e_ids, e_lp) in zip(graphed, eager, strict=True):
        assert g_ids == e_ids
        torch.testing.assert_close(torch.tensor(g_lp), torch.tensor(e_lp), atol=TOLERANCE, rtol=0)


def mixed_plans() -> list[RowPlan]:
    """Every technique, stacked, weighted and averaged: each op kind's index spaces (IA3's computed factors, a
    bottleneck's average rows) are padded."""
    return [plan("lora"), plan("ia3", "bitfit"), plan(), plan("bottleneck"), plan("prompt_tuning", "lora"),
            RowPlan((AdapterUse("ia3", 0.5), AdapterUse("lora"))), plan("bottleneck", "bottleneck2", mode="average"),
            plan("ia3", "ia3_2", mode="average"), plan("bitfit", "bottleneck")]


def load_seconds(technique_adapters, *engines: Engine) -> None:
    """A second bottleneck and IA3 adapter (the same files under other keys), for averages of two."""
    for engine in engines:
        engine.load("bottleneck2", read_adapter(technique_adapters["bottleneck"]))
        engine.load("ia3_2", read_adapter(technique_adapters["ia3"]))


@pytest.mark.parametrize("mode", MODES)
def test_rows_joining_and_leaving_within_and_across_buckets_give_the_eager_outputs(technique_adapters, mode):
    """Rows of every technique join and leave so that the live rows move within buckets and across them (1 up to
    9, bucket 16, and down again): every row's tokens and logprobs equal the eager engine's, and graphs ran steps
    of row counts that are no bucket size."""
    graphed, eager = engine_pair(technique_adapters, mode)
    load_seconds(technique_adapters, graphed, eager)
    plans = mixed_plans()
    schedule: Schedule = {0: [("a", plans[0], 34)], 6: [("b", plans[1], 24), ("c", plans[2], 18)],
                          10: [("d", plans[3], 20), ("e", plans[4], 16)],
                          16: [(f"f{i}", plans[5 + i % 4], 9 + 3 * i) for i in range(5)]}
    got, seen = run_schedule(graphed, schedule, max_rows=12)
    want, _ = run_schedule(eager, schedule, max_rows=12)
    assert_same(got, want)
    graphed_rows = {rows for rows, graphed_step in seen if graphed_step}
    assert {3, 5, 10} <= graphed_rows, seen  # buckets 4, 8 and 16, each with padding rows


@pytest.mark.parametrize("mode", MODES)
def test_a_graph_captured_at_r_rows_replays_at_fewer_rows_of_its_bucket(technique_adapters, mode):
    """Eight rows of one LoRA: the step is captured at 8 rows; one row leaves (7), then two more (5): the same
    graph replays with the new rows' index values, padding rows in the leavers' places, and no new capture."""
    graphed, eager = engine_pair(technique_adapters, mode, keys=("lora",))
    lengths = [30, 30, 30, 30, 30, 10, 13, 13]
    schedule: Schedule = {0: [(f"r{i}", plan("lora"), n) for i, n in enumerate(lengths)]}
    got, seen = run_schedule(graphed, schedule, max_rows=8)
    want, _ = run_schedule(eager, schedule, max_rows=8)
    assert_same(got, want)
    first = seen.index((8, True))  # the capture
    assert (7, True) in seen[first:] and (5, True) in seen[first:]
    assert graphed.graphs.captures == 1 and graphed.graphs.reuses >= 2  # 7 and 5 rows: new index values copied in
    assert not any(rows == 5 and not graphed_step for rows, graphed_step in seen)  # no eager step to re-steady


def poison(graphed: Engine, eager_outputs: list[tuple[list[int], list[float]]], monkeypatch) -> None:
    """Padding rows feed a token whose embedding is NaN (one no live row feeds: not in the prompts, which are
    below 50, nor in the eager outputs), so whatever they compute and write is NaN; unused slots hold NaN and
    inf."""
    fed = {token for ids, _ in eager_outputs for token in ids} | set(range(50))
    token = next(t for t in range(127, 0, -1) if t not in fed)
    monkeypatch.setattr("runtime.graphs.PAD_TOKEN", token)
    with torch.no_grad():
        graphed.model.get_input_embeddings().weight[token] = float("nan")
    for buffer in store_of(graphed.model).buffers.values():
        for part in buffer.parts:
            for slot in buffer.free:
                part[slot] = float("nan") if slot % 2 else float("inf")


def test_padding_rows_never_change_a_live_row(technique_adapters, monkeypatch):
    """Poisoned padding rows and slots (`poison`), rows of every technique joining and leaving through buckets:
    every row's outputs are the eager engine's exactly."""
    graphed, eager = engine_pair(technique_adapters, "emulate")
    load_seconds(technique_adapters, graphed, eager)
    plans = mixed_plans()
    schedule: Schedule = {0: [("a", plans[0], 26), ("b", plans[1], 5), ("c", plans[3], 5)],
                          3: [("d", plans[5], 22)], 12: [("e", plans[6], 14), ("f", plans[7], 14)],
                          20: [("g", plans[8], 10), ("h", plans[2], 12), ("i", plans[1], 9)],
                          30: [("j", plans[4], 8), ("k", plans[0], 8)]}
    want, _ = run_schedule(eager, schedule, max_rows=8)
    poison(graphed, want, monkeypatch)
    got, seen = run_schedule(graphed, schedule, max_rows=8)
    assert_same(got, want)
    assert any(graphed_step and rows not in (1, 2, 4, 8) for rows, graphed_step in seen)


def test_a_row_joining_where_padding_rows_wrote_reads_none_of_it(technique_adapters, monkeypatch):
    """Three IA3 rows run in bucket 4, a poisoned padding row (`poison`) writing into buffer row 3; they leave one
    by one while others join, until the cache's first columns (where the padding row wrote) are no live row's and
    are dropped; then a fourth row joins into buffer row 3 and is graphed: it reads nothing the padding row wrote
    (a graphed step attends the dropped columns too, masked), and no padded use touches a live row (IA3
    multiplies)."""
    graphed, eager = engine_pair(technique_adapters, "emulate", keys=("ia3",))
    schedule: Schedule = {0: [("a", plan("ia3"), 8), ("b", plan("ia3"), 16), ("c", plan("ia3"), 20)],
                          14: [("e", plan("ia3"), 30)], 17: [("f", plan("ia3"), 30)],
                          23: [("g", plan("ia3"), 12), ("h", plan("ia3"), 12)]}
    want, _ = run_schedule(eager, schedule, max_rows=4)
    poison(graphed, want, monkeypatch)
    got, seen = run_schedule(graphed, schedule, max_rows=4)
    assert_same(got, want)
    assert (3, True) in seen and (4, True) in seen[seen.index((3, True)):]


def test_index_spaces_of_their_own_are_padded_without_touching_live_entries(technique_adapters, monkeypatch):
    """Three counts that are no bucket size in each op's own index space: three rows stacking a bottleneck block
    (a stack step's entries, not covering the touched rows), three averaging two blocks (the average rows and
    their entries) and three weighting IA3 (computed factors and their terms), poisoned padding (`poison`):
    padded entries land on padding entries only, and every row gives the eager engine's outputs."""
    graphed, eager = engine_pair(technique_adapters, "emulate", keys=("ia3", "bottleneck", "lora"))
    load_seconds(technique_adapters, graphed, eager)
    kinds = [plan("bottleneck"), plan("bottleneck", "bottleneck2", mode="average"),
             RowPlan((AdapterUse("ia3", 0.5),)), plan("lora", "bottleneck")]
    schedule: Schedule = {0: [(f"r{i}", kinds[i % 4] if i < 9 else kinds[3], 12 + 2 * (i % 3)) for i in range(10)]}
    want, _ = run_schedule(eager, schedule, max_rows=10)
    poison(graphed, want, monkeypatch)
    got, seen = run_schedule(graphed, schedule, max_rows=10)
    assert_same(got, want)
    assert (10, True) in seen  # the bucket of 16


def test_batches_alternating_through_one_graph_each_get_their_own_index_values(technique_adapters, tmp_path):
    """Two batches of one structure (rows swapping two LoRAs) alternate step by step through one graph: the graph
    reads index tensors of its own, so copying one batch's values in never overwrites the other's, and each step
    gives the eager engine's logits."""
    from helpers import save_peft_adapter
    from peft import LoraConfig

    other = save_peft_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              tmp_path / "other", seed=11)
    graphed, eager = engine_pair(technique_adapters, "emulate", keys=("lora",))
    for engine in (graphed, eager):
        engine.load("other", read_adapter(other))
    swaps = [[plan("lora"), plan("other"), plan()], [plan("other"), plan("lora"), plan()]]
    def alternate(engine: Engine) -> list[torch.Tensor]:
        ids = torch.tensor([[5, 9], [7, 3], [4, 4]])
        logits, cache = engine.forward(ids, torch.ones_like(ids), swaps[0], last_only=True)
        seen, mask = [], torch.ones_like(ids)
        for step in range(10):
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            logits, cache = engine.forward(logits[:, -1].argmax(-1, keepdim=True), mask, swaps[step % 2],
                                           cache=cache, last_only=True)
            seen.append(logits[:, -1])
        return seen

    for step, (g, e) in enumerate(zip(alternate(graphed), alternate(eager))):
        torch.testing.assert_close(g, e, atol=TOLERANCE, rtol=0, msg=f"step {step}")
    assert graphed.graphs.captures == 1 and graphed.graphs.reuses >= 4


def test_more_rows_than_the_largest_bucket_run_eagerly(technique_adapters):
    """With buckets up to 4 rows, eight rows (a bucket's size, room for them in the cache) run eagerly and
    correctly; once rows leave to 4 and fewer, graphs."""
    graphed, eager = engine_pair(technique_adapters, "emulate", keys=("lora", "ia3"))
    graphed.graphs = DecodeGraphs(graphed.device, "emulate", largest=4)
    schedule: Schedule = {0: [(f"r{i}", plan("lora") if i % 2 else plan("ia3"), 8 if i < 4 else 20)
                              for i in range(8)]}
    got, seen = run_schedule(graphed, schedule, max_rows=8)
    want, _ = run_schedule(eager, schedule, max_rows=8)
    assert_same(got, want)
    assert not any(graphed_step for rows, graphed_step in seen if rows > 4)
    assert any(graphed_step for rows, graphed_step in seen if rows == 4)
    with pytest.raises(ValueError, match="bucket size"):
        DecodeGraphs(torch.device("cpu"), "emulate", largest=5)


def test_buckets_are_vllms_capture_sizes():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25, 129)] == [0, 1, 2, 4, 4, 8, 8, 16, 16, 24,
                                                                                  24, 32, 136]
