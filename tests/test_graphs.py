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
from runtime.techniques.slots import CHUNK, SlotBuffer

DEVICE = os.environ.get("HUB_TEST_DEVICE", "cpu")
MODES = ["emulate"] + (["auto"] if DEVICE == "cuda" else [])
TOLERANCE = 1e-5  # fp32: the graphed step attends over masked room columns too, summed in another order


def plan(*keys: str, mode: str = "stack") -> RowPlan:
    return RowPlan(tuple(AdapterUse(k) for k in keys), mode)


def engine_pair(technique_adapters, mode: str, keys=("lora", "ia3", "bitfit", "bottleneck", "prompt_tuning")
                ) -> tuple[Engine, Engine]:
    """(graphed, eager) engines over copies of one model, serving the same adapters."""
    model = tiny_llama().to(DEVICE)
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
