"""Row isolation: a row's output depends only on its own adapters, whatever another row's adapter holds.

An adapter whose values are NaN, or finite but so large (1e30, 3e38) that activations overflow to inf, shares
batches with base rows and rows of healthy adapters, over every technique and every LoRA kernel path.
Each healthy row must come out bit-for-bit as in the same batch with that adapter healthy, and a row
whose own logits are not finite ends with an error, never with made-up tokens.
The poisoned values are written into the engine's prepared tensors (Engine.prepare, then install), so
these tests do not depend on the finiteness checks artifacts get at push, pull and load.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import threading
from typing import Any, Iterator

import grpc
import pytest
import torch
from helpers import save_peft_adapter, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from server_support import frozen, wait_until

from hub.artifact import read_adapter
from runtime.engine import Engine
from runtime.generate import Batch, NonFiniteLogits, SamplingParams, Row, score
from runtime.plan import AdapterUse, RowPlan
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb
from runtime.sampling import next_tokens
from runtime.techniques.slots import Slot

pytestmark = pytest.mark.slow  # many batches checked row by row against each row alone

ROWS = [[5, 9, 17, 33, 4, 81, 12], [7, 7, 100, 3], [44, 12, 90, 61, 70, 8, 19], [15, 16], [101, 6, 55]]
# finite but overflowing: 1e30 overflows a row's activations past its own x @ A, 3e38 already there
POISONS = {"nan": float("nan"), "huge": 1e30, "max": 3e38}


def plan(*keys: str, mode: str = "stack") -> RowPlan:
    return RowPlan(tuple(AdapterUse(k) for k in keys), mode)


def tensors_of(payload: Any) -> Iterator[torch.Tensor]:
    """Every tensor a technique's prepared payload holds (tensors, tuples, dataclasses such as LoraSite; a Slot's
    tensors (LoRA's A and B and its lora_bias, IA3's and BitFit's vectors, a bottleneck block's projections) are
    its slot in the site's slot buffer)."""
    if isinstance(payload, Slot):
        yield from (part[payload.slot] for part in payload.buffer.parts)
    if isinstance(payload, torch.Tensor):
        yield payload
    elif isinstance(payload, (tuple, list)):
        for item in payload:
            yield from tensors_of(item)
    elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        for f in dataclasses.fields(payload):
            yield from tensors_of(getattr(payload, f.name))


@pytest.fixture(scope="module")
def folders(technique_adapters, tmp_path_factory) -> dict[str, Any]:
    """The per-technique adapters, plus a LoRA of another rank on the same modules (a second rank bucket)."""
    lora8 = save_peft_adapter(tiny_llama(), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              tmp_path_factory.mktemp("iso") / "lora8", seed=7)
    return {**technique_adapters, "lora8": lora8}


class Poisonable:
    """An engine serving healthy adapters ("lora", "lora8", and `technique` as "good"), plus `technique`'s
    adapter as "bad", whose values `poison` overwrites in place (and re-installs, so no compiled copy stays)."""

    def __init__(self, folders: dict[str, Any], technique: str):
        self.engine = Engine(tiny_llama())
        for key, folder in {"lora": folders["lora"], "lora8": folders["lora8"], "good": folders[technique]}.items():
            self.engine.load(key, read_adapter(folder))
        self.bad = self.engine.prepare("bad", read_adapter(folders[technique]))
        self.engine.install(self.bad)

    def poison(self, value: float) -> None:
        targets = [*tensors_of(list(self.bad.sites.values())), *tensors_of(self.bad.prompt)]
        assert targets
        for t in targets:
            t.fill_(value)
        self.engine.install(self.bad)

    def logits(self, plans: list[RowPlan]) -> list[torch.Tensor]:
        """Each row's logits over its own (left-padded) tokens, from one forward."""
        rows = ROWS[:len(plans)]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out, _ = self.engine.forward(ids, mask, plans)
        return [out[i, width - len(r):] for i, r in enumerate(rows)]


TECHNIQUES = ["lora", "ia3", "bitfit", "prompt_tuning", "bottleneck"]
# Batch layouts (row plans) around the "bad" adapter. For LoRA they reach every kernel: "bad" alone
# at its modules (one adapter, rows selected, weighted or not), with a second adapter of its rank (one bucket, gathered rows;
# every row in order: the batched matmul over all rows and the shared q/v projection), with another rank
# (two buckets), stacked or averaged with another adapter in one row, and in two rows apart.
LAYOUTS = {
    "beside base rows": [plan(), plan("bad"), plan()],
    "first, then base": [plan("bad"), plan(), plan()],
    "weighted, beside base rows": [plan(), RowPlan((AdapterUse("bad", 0.5),)), plan()],
    "beside its healthy twin": [plan(), plan("bad"), plan("good")],
    "every row its own adapter": [plan("bad"), plan("good")],
    "beside another rank": [plan("lora8"), plan("bad"), plan()],
    "stacked in one row": [plan("good", "bad"), plan("good"), plan(), plan("lora8")],
    "averaged in one row": [plan("bad", "good", mode="average"), plan("good"), plan("lora")],
    "among others": [plan("bad"), plan(), plan("good"), plan("lora8"), plan()],
    "twice, apart": [plan("bad"), plan(), plan("bad"), plan()],
}


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_healthy_rows_never_see_a_broken_adapter_in_their_batch(folders, technique, poison):
    served = Poisonable(folders, technique)
    layouts = {name: layout for name, layout in LAYOUTS.items()  # soft prompts apply with weight 1 only
               if not (technique == "prompt_tuning" and name in ("weighted, beside base rows", "averaged in one row"))}
    before = {name: served.logits(plans) for name, plans in layouts.items()}
    served.poison(POISONS[poison])
    for name, plans in layouts.items():
        after = served.logits(plans)
        broken = 0
        for row, p in enumerate(plans):
            if any(u.key == "bad" for u in p.adapters):
                broken += not torch.isfinite(after[row]).all()
                continue
            assert torch.equal(after[row], before[name][row]), (name, row)
        assert broken or poison != "nan", name  # NaN values always reach their own rows' logits


def test_a_row_alone_equals_its_row_beside_a_broken_adapter(folders):
    """The same rows without the broken row's company (a separate forward): equal up to float rounding (the
    matmuls' blocking may depend on the row count)."""
    served = Poisonable(folders, "lora")
    served.poison(float("nan"))
    together = served.logits([plan(), plan("bad"), plan()])
    for row, p in [(0, plan()), (2, plan())]:
        alone, _ = served.engine.forward(torch.tensor([ROWS[row]]), torch.ones(1, len(ROWS[row]), dtype=torch.long),
                                         [p])
        assert (together[row] - alone[0]).abs().max() <= 1e-6


# -- generation: the broken row ends with an error, the others go on -----------------------------------------

def generate(engine: Engine, seqs: list[Row]) -> dict[str, Row]:
    batch = Batch(engine)
    for s in seqs:
        batch.add(s)
    while any(s.finish_reason is None for s in seqs):
        batch.step()
    return {s.id: s for s in seqs}


def seqs(*plans: RowPlan, **sampling: Any) -> list[Row]:
    return [Row(str(i), ROWS[i], p, SamplingParams(max_new_tokens=6, **sampling)) for i, p in enumerate(plans)]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=3)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_row_with_non_finite_logits_fails_alone(folders, poison, sampling):
    served = Poisonable(folders, "lora")
    alone = [generate(served.engine, [s])[s.id] for s in seqs(plan(), plan("good"), **sampling)]
    served.poison(POISONS[poison])
    done = generate(served.engine, seqs(plan(), plan("good"), plan("bad"), **sampling))
    for s in alone:
        assert (done[s.id].output_ids, done[s.id].finish_reason) == (s.output_ids, s.finish_reason)
    bad = done["2"]
    assert bad.finish_reason == "error" and isinstance(bad.error, NonFiniteLogits)
    assert str(bad.error) == "adapter bad produced non-finite logits at output token 1" and bad.output_ids == []


def test_scoring_with_non_finite_logits_is_an_error_not_nan(folders):
    served = Poisonable(folders, "lora")
    served.poison(float("nan"))
    with pytest.raises(NonFiniteLogits, match="adapter bad produced non-finite logits scoring token 2"):
        score(served.engine, ROWS[0], plan("bad"))
    assert all(math.isfinite(x) for x in score(served.engine, ROWS[0], plan("good")))


def test_sampling_is_safe_for_any_temperature_and_any_logits():
    """Tiny temperatures pick the best token (1e-45 is a float32 subnormal, 5e-324 is 0 in float32), extreme
    parameters draw some token, and rows with NaN or inf logits get none, without failing the others."""
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.9], [float("nan"), 1.0, 0.0, 0.0], [0.0, float("inf"), 0.0, 0.0],
                           [1.0, 2.0, 0.0, 4.0], [1.0, 2.0, 0.0, 4.0]])
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, top_p=0.5, seed=1), SamplingParams(temperature=5e-324, top_k=2),
              SamplingParams(temperature=float("inf"), top_k=10**6, top_p=1e-45)]
    gens = [torch.Generator().manual_seed(0) for _ in params]
    *tokens, extreme = next_tokens(logits, params, gens)
    assert tokens == [1, None, None, 3] and extreme in range(4)
    greedy = [SamplingParams() for _ in params]
    assert next_tokens(logits, greedy, gens) == [1, None, None, 3, 3]


def test_a_failed_prefill_ends_only_the_joining_rows(folders):
    """Rows that join in a prefill that raises (here a soft prompt of the wrong width) end with its error;
    the rows already running go on with the tokens they get alone."""
    served = Poisonable(folders, "prompt_tuning")
    alone = generate(served.engine, seqs(plan()))["0"]
    served.bad.prompt = served.bad.prompt[:, :-1].contiguous()
    served.engine.install(served.bad)
    running, joining = seqs(plan(), plan("bad"))
    batch = Batch(served.engine)
    batch.add(running)
    batch.step()
    batch.add(joining)
    while running.finish_reason is None:
        batch.step()
    assert (running.output_ids, running.finish_reason) == (alone.output_ids, alone.finish_reason)
    assert joining.finish_reason == "error" and joining.output_ids == [] and "size" in str(joining.error)


def test_a_failed_decode_ends_the_running_rows_and_the_joining_ones_still_join(folders):
    """A decode forward that raises (an adapter replaced by a broken one mid-generation) ends the rows of
    that forward, which share one cache; a row joining in the same step is prefilled and runs on."""
    served = Poisonable(folders, "lora")
    alone = generate(served.engine, seqs(plan(), plan(), plan("good")))["2"]
    first, second, late = seqs(plan("bad"), plan(), plan("good"))
    batch = Batch(served.engine)
    batch.add(first)
    batch.add(second)
    batch.step()
    site = next(iter(served.bad.sites.values()))
    site.slot = site.buffer.capacity + 1  # a slot its buffer does not have: the kernels refuse it
    served.engine.install(served.bad)
    batch.add(late)
    while late.finish_reason is None:
        batch.step()
    for s in (first, second):
        assert s.finish_reason == "error" and len(s.output_ids) == 1 and "out of range" in str(s.error)
    assert (late.output_ids, late.finish_reason) == (alone.output_ids, alone.finish_reason)


# -- through the real server --------------------------------------------------------------------------------

PROMPT = "Hello"


HUGE = 3e38  # finite (so any finiteness check passes it) but overflowing to inf in the activations of its rows


@pytest.fixture
def huge(registry, served_base, served_adapters, tmp_path) -> dict[str, str]:
    """Per technique, an adapter of it with every weight HUGE, pushed as `huge-<technique>@1.0.0`."""
    refs = {}
    for technique in ("lora0", "ia3", "bitfit", "prompt_tuning", "bottleneck"):
        folder = tmp_path / technique
        shutil.copytree(served_adapters[technique], folder)
        weights = folder / "adapter_model.safetensors"
        save_file({k: torch.full_like(t, HUGE) for k, t in load_file(weights).items()}, str(weights))
        refs[technique] = f"huge-{technique.replace('_', '-')}"
        registry.push(folder, refs[technique], "1.0.0", base_model=str(served_base))
    return refs


def together(server, client, requests: dict[str, dict]) -> dict[str, Any]:
    """Each request's reply (or its RpcError), all queued while the scheduler is held, so they join one step."""
    results: dict[str, Any] = {}

    def call(name: str, kwargs: dict) -> None:
        try:
            results[name] = client.generate(PROMPT, **kwargs)
        except grpc.RpcError as e:
            results[name] = e

    threads = [threading.Thread(target=call, args=item) for item in requests.items()]
    with frozen(server):
        for t in threads:
            t.start()
        wait_until(lambda: server.scheduler.queue_depths() == (0, len(requests)), "every request queued")
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("technique", ["lora0", "ia3", "bitfit", "prompt_tuning", "bottleneck", "merge"])
def test_a_broken_adapter_fails_its_request_alone_through_the_server(start_server, huge, technique):
    """Requests beside one whose adapter overflows, all in one step: theirs are the tokens they get alone."""
    server, client = start_server()
    poisoned = dict(adapters=[huge[technique]]) if technique != "merge" else dict(
        adapters=[huge["lora0"], "lora1"], mode="merge", merge=pb.MergeOptions(method="cat"))
    for ref in {huge.get(technique, huge["lora0"]), "lora0", "lora1"}:
        client.load_adapter(ref)  # resident before the scheduler is held (a load runs on its thread)
    greedy = dict(max_new_tokens=8)
    requests = {"base": greedy, "lora0": dict(greedy, adapters=["lora0"]), "ia3": dict(greedy, adapters=["ia3"]),
                "poisoned": dict(greedy, **poisoned)}
    if technique == "merge":  # built and resident before the scheduler is held
        with pytest.raises(grpc.RpcError):
            client.generate(PROMPT, max_new_tokens=1, **poisoned)
    alone = {name: list(client.generate(PROMPT, **kwargs).token_ids)
             for name, kwargs in requests.items() if name != "poisoned"}
    results = together(server, client, requests)
    for name, tokens in alone.items():
        assert list(results[name].token_ids) == tokens, name
    poisoned = results["poisoned"]
    if isinstance(poisoned, grpc.RpcError) or technique in ("lora0", "merge"):  # a LoRA at HUGE always overflows
        assert poisoned.code() == grpc.StatusCode.DATA_LOSS
        assert poisoned.details().endswith("produced non-finite logits at output token 1"), poisoned.details()
    assert list(client.generate(PROMPT, **greedy).token_ids) == alone["base"]  # and the server goes on


def test_score_of_a_broken_adapter_is_data_loss(start_server, huge):
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.score(PROMPT, adapters=[huge["lora0"]])
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert caught.value.details() == "adapter huge-lora0@1.0.0 produced non-finite logits scoring token 2"
    assert all(math.isfinite(x) for x in client.score(PROMPT, adapters=["lora0"]).logprobs)


def test_a_tiny_temperature_is_greedy_and_harms_no_one(start_server):
    server, client = start_server()
    client.load_adapter("lora0")
    greedy = dict(max_new_tokens=8)
    requests = {"base": greedy, "lora0": dict(greedy, adapters=["lora0"]),
                "tiny": dict(greedy, temperature=1e-45, seed=1)}
    alone = {name: list(client.generate(PROMPT, **dict(kwargs, temperature=0.0)).token_ids)
             for name, kwargs in requests.items()}
    results = together(server, client, requests)
    for name, tokens in alone.items():
        assert not isinstance(results[name], grpc.RpcError), results[name]
        assert list(results[name].token_ids) == tokens, name


def test_streams_mid_answer_outlive_a_broken_request_and_a_tiny_temperature(start_server, huge):
    """The attack as reported: requests that used to fail the whole step join streams that are mid-answer;
    the streams go on to the tokens they get alone."""
    server, client = start_server()
    client.load_adapter(huge["lora0"])
    long = dict(max_new_tokens=400)
    alone = [list(client.generate(PROMPT, **long).token_ids),
             list(client.generate(PROMPT, adapters=["lora0"], **long).token_ids)]
    streams = [client.generate_stream(PROMPT, **long), client.generate_stream(PROMPT, adapters=["lora0"], **long)]
    got = [list(next(s).token_ids) for s in streams]  # both running
    results: dict[str, Any] = {}

    def call(name: str, **kwargs: Any) -> None:
        try:
            results[name] = client.generate(PROMPT, max_new_tokens=4, **kwargs)
        except grpc.RpcError as e:
            results[name] = e

    threads = [threading.Thread(target=call, args=("broken",), kwargs=dict(adapters=[huge["lora0"]])),
               threading.Thread(target=call, args=("tiny",), kwargs=dict(temperature=1e-45, seed=2))]
    with frozen(server):
        for t in threads:
            t.start()
        wait_until(lambda: server.scheduler.queue_depths() == (2, 2), "both joining while both streams run")
    for t in threads:
        t.join()
    assert results["broken"].code() == grpc.StatusCode.DATA_LOSS
    assert list(results["tiny"].token_ids) == alone[0][:4]
    for stream, tokens, expected in zip(streams, got, alone):
        tokens += [t for chunk in stream for t in chunk.token_ids]
        assert tokens == expected
