"""Generation: greedy identity alone vs batched, continuous batching join/leave, sampling, stops, score."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import LLAMA_TARGETS, save_bitfit_adapter, save_peft_adapter, tiny_llama
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig

from hub.artifact import read_adapter
from runtime.engine import Engine
from runtime.generate import Batch, SamplingParams, Row, score, visible_text
from runtime.kvcache import HEADROOM
from runtime.plan import AdapterUse, PlanError, RowPlan
from runtime.textstream import TextStream

pytestmark = pytest.mark.slow  # generation with tiny models, compared with PEFT and with each row alone

PROMPTS = [[5, 9, 17, 33, 4, 81, 12], [7, 7, 100, 3], [44, 12, 90, 61, 70, 8, 19, 27, 3], [15, 16], [101, 6, 55]]


@pytest.fixture(scope="module")
def base():
    # eos/pad ids outside the random tokens most likely to win, so sequences run their full length
    return tiny_llama(eos_token_id=127)


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {
        "lora": save_peft_adapter(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS), root / "l"),
        "lora16": save_peft_adapter(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]), root / "m", seed=3),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), root / "i"),
        "prompt": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), root / "p"),
    }


def make_engine(base, folders, tokenizer=None) -> Engine:
    eng = Engine(copy.deepcopy(base), tokenizer)
    for key, folder in folders.items():
        eng.load(key, read_adapter(folder))
    return eng


@pytest.fixture(scope="module")
def engine(base, folders):
    return make_engine(base, folders)


PLANS = [RowPlan((AdapterUse("lora"),)), RowPlan(), RowPlan((AdapterUse("prompt"),)),
         RowPlan((AdapterUse("ia3"), AdapterUse("lora16", 0.5))), RowPlan((AdapterUse("lora16"),))]


def run(engine, seqs, joins=None, leaves=None, max_rows=32, prefill_ahead=0) -> dict[str, list[int]]:
    """Step a batch to completion; `joins`/`leaves` map a step number to sequences to add / ids to remove."""
    batch = Batch(engine, max_rows=max_rows, prefill_ahead=prefill_ahead)
    for s in seqs:
        batch.add(s)
    step = 0
    while len(batch):
        for s in (joins or {}).get(step, []):
            batch.add(s)
        for seq_id in (leaves or {}).get(step, []):
            batch.remove(seq_id)
        batch.step()
        step += 1
        assert step < 200
    return {s.id: s.output_ids for s in seqs + [s for v in (joins or {}).values() for s in v]}


def seq(i: int, n: int = 12, **sampling) -> Row:
    return Row(str(i), PROMPTS[i], PLANS[i], SamplingParams(max_new_tokens=n, **sampling))


def test_greedy_output_is_identical_alone_or_batched(engine):
    alone = {str(i): run(engine, [seq(i)])[str(i)] for i in range(5)}
    together = run(engine, [seq(i) for i in range(5)])
    assert together == alone
    assert all(len(v) == 12 for v in alone.values())


def test_greedy_matches_peft_generate_for_a_lora_row(engine, base, folders):
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folders["lora"]).eval()
    ids = torch.tensor([PROMPTS[0]])
    out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        min_new_tokens=12, pad_token_id=0)
    assert run(engine, [seq(0)])["0"] == out[0, ids.shape[1]:].tolist()


def test_long_generations_past_the_cache_headroom_match_peft_and_alone(engine, base, folders):
    """Past runtime/kvcache.py's HEADROOM the cache buffers are reallocated mid-flight (and a join then
    merges into grown buffers): greedy tokens still equal PEFT's generate and each row's own run."""
    n = HEADROOM + 16
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folders["lora"]).eval()
    ids = torch.tensor([PROMPTS[0]])
    out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                        min_new_tokens=n, pad_token_id=0)
    alone = {str(i): run(engine, [seq(i, n)])[str(i)] for i in range(3)}
    assert alone["0"] == out[0, ids.shape[1]:].tolist()
    assert run(engine, [seq(0, n), seq(1, n)], joins={HEADROOM + 2: [seq(2, n)]}) == alone


def test_rows_join_mid_flight_and_leave_at_once(engine):
    alone = {str(i): run(engine, [seq(i)])[str(i)] for i in range(5)}
    first = [seq(0), seq(1)]
    got = run(engine, first, joins={3: [seq(2), seq(3)], 5: [seq(4)]}, leaves={7: ["1"]})
    assert got["0"] == alone["0"] and got["2"] == alone["2"] and got["3"] == alone["3"] and got["4"] == alone["4"]
    assert got["1"] == alone["1"][:7]  # stepped 7 times (one token each), then left
    assert first[1].finish_reason == "cancelled" and first[0].finish_reason == "length"


def test_a_row_leaving_from_the_front_moves_the_others_up_in_the_cache(engine):
    """The first row finishes first: the rows behind it move up inside the cache's buffers (made by
    Engine.forward, so inference tensors: Batch changes them under inference mode, whatever the caller's)."""
    assert not torch.is_inference_mode_enabled()
    alone = {str(i): run(engine, [seq(i)])[str(i)] for i in (1, 2, 3)}
    short = seq(0, 3)
    got = run(engine, [short, seq(1), seq(2), seq(3)])
    assert len(got["0"]) == 3 and all(got[k] == alone[k] for k in alone)


def test_a_join_wider_than_the_cache_pads_the_running_rows_in_place(engine):
    """The longest row leaves (its padding columns dropped from the others), then a prompt wider than the rest
    of the cache joins: the running rows gain zero columns on the left inside the same buffers, and every
    row still generates what it generates alone."""
    def make(name: str, prompt: list[int], n: int, plan: RowPlan) -> Row:
        return Row(name, prompt, plan, SamplingParams(max_new_tokens=n))

    specs = [("long", list(range(20, 30)), 3, PLANS[0]), ("a", [5, 9, 17, 33], 12, PLANS[1]),
             ("b", [7, 7, 100, 3], 12, PLANS[3]), ("wide", list(range(40, 51)), 6, PLANS[4])]
    alone = {name: run(engine, [make(name, *rest)])[name] for name, *rest in specs}
    batch = Batch(engine)
    seqs = {name: make(name, *rest) for name, *rest in specs}
    for name in ("long", "a", "b"):
        batch.add(seqs[name])
    for _ in range(5):
        batch.step()
    assert len(batch._rows) == 2 and batch._mask.shape[1] == 8  # "long" left; the 6 columns only it used dropped
    buffer = batch._cache.layers[0].keys.untyped_storage().data_ptr()
    batch.add(seqs["wide"])
    batch.step()
    assert batch._mask.shape[1] == 11 and batch._cache.layers[0].keys.untyped_storage().data_ptr() == buffer
    while len(batch):
        batch.step()
    assert {name: seq.output_ids for name, seq in seqs.items()} == alone


def test_many_joins_and_leaves_keep_every_row_its_output(engine):
    """One join per step and rows leaving from the middle: every row still generates what it generates alone."""
    alone = {str(i): run(engine, [seq(i)])[str(i)] for i in range(5)}
    batch = Batch(engine)
    seqs = [Row(f"{j}-{i}", PROMPTS[i], PLANS[i], SamplingParams(max_new_tokens=12))
            for j in range(2) for i in range(5)]
    for step in range(40):
        if step < len(seqs):
            batch.add(seqs[step])
        if step == 6:
            batch.remove("0-2")
        batch.step()
        if not len(batch):
            break
    for s in seqs:
        assert s.output_ids == (alone[s.id[2:]][:len(s.output_ids)] if s.id == "0-2" else alone[s.id[2:]]), s.id
    assert seqs[2].finish_reason == "cancelled"


def check_rows_across_joins_leaves_and_slot_reuse(eng: Engine, plans: dict[str, RowPlan], late, site: str) -> None:
    """Rows "a".."f" under `plans` ("f" uses "late", loaded mid-batch once "spare" is unloaded, into its freed
    slot at `site`): a row's tokens do not depend on its neighbours as rows join, leave and are cancelled ("b"),
    and no slot buffer is reallocated while the batch changes."""
    from runtime.techniques.slots import store_of

    rows = {k: Row(k, PROMPTS[i % len(PROMPTS)], plan, SamplingParams(max_new_tokens=10))
            for i, (k, plan) in enumerate(plans.items())}
    store = store_of(eng.model)
    buffers = {k: tuple(p.data_ptr() for p in b.parts) for k, b in store.buffers.items()}
    spare_slot = eng._residents["spare"].sites[site].slot
    batch = Batch(eng)
    added: dict[str, Row] = {}

    def add(key: str) -> None:
        added[key] = copy.deepcopy(rows[key])
        batch.add(added[key])

    for step in range(40):
        if step < 4:
            add("abcd"[step])
        if step == 2:
            add("e")
        if step == 4:
            batch.remove("b")  # cancelled mid-generation
            eng.unload("spare")
            eng.load("late", late)
            assert eng._residents["late"].sites[site].slot == spare_slot
            add("f")
        batch.step()
        if not len(batch):
            break
    assert {k: tuple(p.data_ptr() for p in b.parts) for k, b in store.buffers.items()} == buffers
    assert added["b"].finish_reason == "cancelled"
    for key in "acdef":
        assert added[key].output_ids == run(eng, [copy.deepcopy(rows[key])])[key], key


def test_lora_rows_keep_their_outputs_across_joins_leaves_and_slot_reuse(base, folders, tmp_path):
    """LoRA rows read their adapters in place from slot buffers through per-batch index tensors (stacked,
    weighted, averaged, mixed ranks)."""
    eng = make_engine(base, {k: folders[k] for k in ("lora", "lora16")})
    targets = LoraConfig(r=4, target_modules=LLAMA_TARGETS)
    for key, seed in (("lora2", 5), ("spare", 9)):
        eng.load(key, read_adapter(save_peft_adapter(base, targets, tmp_path / key, seed=seed)))
    late = read_adapter(save_peft_adapter(base, targets, tmp_path / "late", seed=11))
    plans = {"a": RowPlan((AdapterUse("lora"),)), "b": RowPlan((AdapterUse("lora2"),)),
             "c": RowPlan((AdapterUse("lora16"),)), "d": RowPlan((AdapterUse("lora"), AdapterUse("lora16", 0.5))),
             "e": RowPlan((AdapterUse("lora"), AdapterUse("lora2", 3.0)), "average"), "f": RowPlan((AdapterUse("late"),))}
    check_rows_across_joins_leaves_and_slot_reuse(eng, plans, late, "model.layers.0.self_attn.q_proj")


def test_ia3_and_bitfit_rows_keep_their_outputs_across_joins_leaves_and_slot_reuse(base, folders, tmp_path):
    """IA3 and BitFit rows read their vectors in place from slot buffers through per-batch index tensors: IA3
    stacked with weight 1 (straight from its slot) and weighted or averaged (factors made from the slots), BitFit
    weighted, both beside and over a LoRA."""
    eng = make_engine(base, {k: folders[k] for k in ("lora", "ia3")})
    eng.load("ia3_b", read_adapter(save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                                     feedforward_modules=["down_proj"]),
                                                     tmp_path / "ia3_b", seed=4)))
    gen = torch.Generator().manual_seed(2)
    sites = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    for key in ("bitfit", "spare", "late"):
        folder = save_bitfit_adapter(tmp_path / key, {s: 0.5 * torch.randn(32 if "k_proj" in s else 64, generator=gen)
                                                      for s in sites})
        if key != "late":
            eng.load(key, read_adapter(folder))
    late = read_adapter(folder)
    plans = {"a": RowPlan((AdapterUse("ia3"),)), "b": RowPlan((AdapterUse("bitfit", 2.0),)),
             "c": RowPlan((AdapterUse("ia3", 0.5), AdapterUse("ia3_b"), AdapterUse("bitfit"))),
             "d": RowPlan((AdapterUse("ia3"), AdapterUse("ia3_b", 3.0)), "average"),
             "e": RowPlan((AdapterUse("lora"), AdapterUse("ia3"), AdapterUse("bitfit", -1.0))),
             "f": RowPlan((AdapterUse("late"), AdapterUse("ia3_b")))}
    check_rows_across_joins_leaves_and_slot_reuse(eng, plans, late, sites[1])


def test_bottleneck_and_lora_bias_rows_keep_their_outputs_across_joins_leaves_and_slot_reuse(tmp_path):
    """Bottleneck blocks and LoRA's lora_bias read in place from slot buffers through per-batch index tensors:
    single blocks, a weighted stack, averages (with a parallel block), a block stacked over a lora_bias LoRA."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hub.adapterhub_import import import_adapterhub

    fixtures = Path(__file__).parent / "fixtures" / "bottleneck"
    base = AutoModelForCausalLM.from_pretrained(fixtures / "base", dtype=torch.float32)
    eng = Engine(copy.deepcopy(base))
    folders = {}
    for name in ("houlsby", "pfeiffer", "parallel", "seq_gelu_new", "seq_tanh"):
        import_adapterhub(fixtures / "adapters" / name, tmp_path / name)
        folders[name] = tmp_path / name
    for key, name in (("houlsby", "houlsby"), ("pfeiffer", "pfeiffer"), ("parallel", "parallel"),
                      ("gelu", "seq_gelu_new"), ("spare", "seq_tanh")):
        eng.load(key, read_adapter(folders[name]))
    eng.load("biased", read_adapter(save_peft_adapter(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                                                       lora_bias=True), tmp_path / "lb", seed=6)))
    late = read_adapter(folders["houlsby"])  # the size of "spare"'s blocks: it takes their freed slots
    plans = {"a": RowPlan((AdapterUse("houlsby"),)), "b": RowPlan((AdapterUse("pfeiffer"),)),
             "c": RowPlan((AdapterUse("biased"), AdapterUse("pfeiffer"), AdapterUse("houlsby", 0.5))),
             "d": RowPlan((AdapterUse("pfeiffer"), AdapterUse("gelu", 3.0)), "average"),
             "e": RowPlan((AdapterUse("pfeiffer"), AdapterUse("parallel")), "average"),
             "f": RowPlan((AdapterUse("late"), AdapterUse("parallel")))}
    check_rows_across_joins_leaves_and_slot_reuse(eng, plans, late, "model.layers.0.mlp.down_proj")


def sliding_model(arch: str):
    """A tiny model with sliding-window layers (window 6): Mistral (every layer), Qwen2 and Gemma 2 (alternating
    with full-attention ones)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=6, eos_token_id=127, pad_token_id=0)
    torch.manual_seed(0)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**shape)).eval()
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=16)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=True,
                                        layer_types=["sliding_attention", "full_attention"])).eval()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_models_batch_continuously(arch):
    """Sliding-window layers (Mistral: every layer; Qwen2 here and Gemma 2: alternating with full ones): rows
    join and leave past the window and each generates what it generates alone, which is what transformers'
    own generate() gives."""
    model = sliding_model(arch)
    sliding = Engine(copy.deepcopy(model))
    prompts = [PROMPTS[2], PROMPTS[3], PROMPTS[0], PROMPTS[1], list(range(30, 45))]
    seqs = [Row(str(i), p, RowPlan(), SamplingParams(max_new_tokens=10 + i)) for i, p in enumerate(prompts)]
    alone = {s.id: run(sliding, [Row(s.id, s.prompt_ids, s.plan, s.sampling)])[s.id] for s in seqs}
    ids = torch.tensor([prompts[4]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                         min_new_tokens=14, pad_token_id=0)
    assert alone["4"] == out[0, ids.shape[1]:].tolist()
    got = run(sliding, seqs[:2], joins={3: seqs[2:4], 9: seqs[4:]}, leaves={7: ["1"]})
    assert got["1"] == alone["1"][:7]
    assert {k: v for k, v in got.items() if k != "1"} == {k: v for k, v in alone.items() if k != "1"}


@pytest.mark.parametrize("arch,seed,ahead", [("llama", 0, 0), ("llama", 1, 0), ("mistral", 2, 0), ("gemma2", 3, 0),
                                             ("llama", 0, 5), ("llama", 4, 5), ("gemma2", 3, 5)])
def test_random_joins_leaves_and_cancels_give_each_row_what_it_gets_alone(engine, arch, seed, ahead):
    """A seeded random schedule over a 3-row batch: prompts of 1-12 tokens join at random steps (more than fit,
    so they also wait for rows), run 1-80 new tokens (past the cache's HEADROOM), and some are cancelled
    mid-way. Every row gets what it gets alone (a cancelled one: a prefix of it). On the Llama, rows mix every
    technique; the sliding-window models run past their window of 6. With `ahead`, rows are also prefilled
    ahead of room (Batch.prefill_ahead) and wait, some cancelled while they wait."""
    rng = random.Random(seed)
    eng, plans = (engine, PLANS) if arch == "llama" else (Engine(sliding_model(arch)), [RowPlan()])
    seqs = [Row(str(i), [rng.randrange(1, 120) for _ in range(rng.randint(1, 12))], rng.choice(plans),
                     SamplingParams(max_new_tokens=rng.randint(1, 80))) for i in range(12)]
    alone = {s.id: run(eng, [Row(s.id, s.prompt_ids, s.plan, s.sampling)])[s.id] for s in seqs}
    batch, waiting, cancelled = Batch(eng, max_rows=3, prefill_ahead=ahead), list(seqs), set()
    for _ in range(5000):
        if not (waiting or len(batch)):
            break
        while waiting and rng.random() < 0.3:
            batch.add(waiting.pop(0))
        running = [s for s in seqs if s.output_ids and s.finish_reason is None]
        if running and rng.random() < 0.05:
            victim = rng.choice(running)
            batch.remove(victim.id)
            cancelled.add(victim.id)
        batch.step()
    assert not waiting and not len(batch)
    for s in seqs:
        if s.id in cancelled:
            assert s.finish_reason == "cancelled" and s.output_ids == alone[s.id][:len(s.output_ids)], s.id
        else:
            assert s.output_ids == alone[s.id], s.id
    assert cancelled and len(cancelled) < len(seqs)


def test_rows_wait_for_room_when_the_batch_is_full(engine):
    alone = {str(i): run(engine, [seq(i, 5)])[str(i)] for i in range(5)}
    assert run(engine, [seq(i, 5) for i in range(5)], max_rows=2) == alone


def test_rows_prefilled_ahead_join_as_rows_leave_with_one_prefill_per_group(engine, monkeypatch):
    """Grouped joins (Batch.prefill_ahead, what evaluation uses): with room for 2 rows, 7 sequences are prefilled
    4 and then 3 at a time, not one prefill per leaver's replacement; the ones without room wait and join in the
    step a row leaves (decode steps leave fewer places empty: none while a replacement prefills); one whose first token
    ends it, and one cancelled while it waits, never join. Every row gets what it gets when rows join one
    prefill at a time as they find room."""
    lengths = [3, 5, 1, 4, 6, 3, 4]

    def seqs() -> list[Row]:
        return [Row(str(i), PROMPTS[i % 5], PLANS[i % 5], SamplingParams(max_new_tokens=n))
                for i, n in enumerate(lengths)]

    forwards: list[tuple[str, int]] = []
    forward = engine.forward

    def counted(input_ids, attention_mask, plans, cache=None, **kwargs):
        forwards.append(("prefill" if cache is None else "decode", len(plans)))
        return forward(input_ids, attention_mask, plans, cache=cache, **kwargs)

    monkeypatch.setattr(engine, "forward", counted)
    single = run(engine, seqs(), max_rows=2)
    single_forwards, forwards[:] = list(forwards), []
    grouped = run(engine, seqs(), max_rows=2, prefill_ahead=4)
    assert grouped == single
    assert [n for kind, n in forwards if kind == "prefill"] == [4, 3]
    assert len([f for f in single_forwards if f[0] == "prefill"]) > 2
    decodes = [n for kind, n in forwards if kind == "decode"]
    idle = sum(2 - n for n in decodes)  # places a decode step left empty
    assert idle < sum(2 - n for kind, n in single_forwards if kind == "decode")
    assert len(decodes) < len([f for f in single_forwards if f[0] == "decode"])
    assert len(grouped["2"]) == 1 and sum(decodes) == sum(len(v) - 1 for v in grouped.values())

    cancelled = run(engine, seqs(), max_rows=2, prefill_ahead=4, leaves={1: ["3"]})
    assert cancelled["3"] == single["3"][:1]  # its first token came with its prefill, then it was cancelled
    assert {k: v for k, v in cancelled.items() if k != "3"} == {k: v for k, v in single.items() if k != "3"}


def test_next_tokens_gives_each_row_what_it_gets_alone():
    """Greedy rows take one argmax over the batch and sampled rows one copy to the CPU: every row still gets
    the token its own logits and generator give (argmax; a seeded draw as from that row alone)."""
    from runtime.sampling import generator_for, next_tokens

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams(),
              SamplingParams(temperature=1.3, top_k=5, seed=2), SamplingParams(temperature=0.9, top_p=0.5, seed=4)]
    together = next_tokens(logits, params, [generator_for(p) for p in params])
    alone = [next_tokens(logits[i:i + 1], [p], [generator_for(p)])[0] for i, p in enumerate(params)]
    assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[2] == int(logits[2].argmax())
    assert next_tokens(logits[:1], [params[0]], [generator_for(params[0])]) == [int(logits[0].argmax())]


def test_greedy_rows_take_the_first_best_token_and_none_from_any_non_finite_logit():
    """The greedy pick is the first of tied best tokens (argmax's, as `generate` picks), and a row with NaN, inf
    or -inf anywhere, not only at its best token, gets no token."""
    from runtime.sampling import generator_for, next_tokens

    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [0.0, 2.0, -inf, 1.0], [nan, 2.0, 0.0, 1.0],
                           [0.0, 2.0, inf, 1.0], [-3.0, -1.0, -1.0, -2.0]])
    params = [SamplingParams() for _ in range(len(logits))]
    assert next_tokens(logits, params, [generator_for(p) for p in params]) == [1, None, None, None, 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    a = run(engine, [seq(0, **params)])["0"]
    b = run(engine, [seq(0, **params), seq(1, **params), seq(3, temperature=1.5, seed=9)])["0"]
    c = run(engine, [seq(0, temperature=0.9, top_p=0.9, top_k=50, seed=4321)])["0"]
    assert a == b and a != c


def test_top_k_one_is_greedy(engine):
    assert run(engine, [seq(3, temperature=2.0, top_k=1, seed=5)]) == run(engine, [seq(3)])


def test_eos_finishes_a_sequence_without_reporting_it(engine, base, folders):
    greedy = run(engine, [seq(1)])["1"]
    eng = make_engine(base, folders)
    eng.model.generation_config.eos_token_id = greedy[3]  # this engine's eos: the 4th greedy token
    s = Row("e", PROMPTS[1], PLANS[1], SamplingParams(max_new_tokens=12))
    run(eng, [s])
    assert s.output_ids == greedy[:3] and s.finish_reason == "stop" and not s.stop_string


class _CharTokenizer:
    """Token t decodes to chr(65 + t % 26): enough for stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + t % 26) for t in ids)


def test_stop_string_ends_the_sequence_and_is_cut_from_the_text(base, engine, folders):
    eng = make_engine(base, folders, tokenizer=_CharTokenizer())
    greedy = run(engine, [seq(0)])["0"]
    stop = _CharTokenizer().decode(greedy[4:6])
    s = Row("s", PROMPTS[0], PLANS[0], SamplingParams(max_new_tokens=12, stop=(stop,)))
    run(eng, [s])
    assert s.finish_reason == "stop" and s.stop_string and s.output_ids == greedy[:6]
    assert visible_text(_CharTokenizer(), s) == _CharTokenizer().decode(greedy[:6]).split(stop)[0]


def test_stop_strings_are_watched_without_decoding_the_whole_output_every_step(base, engine, folders):
    """A sequence with stop strings is checked a few tokens at a time (runtime/textstream.py), not by decoding
    its whole output at every step on the decode loop's thread; it still ends where the text shows the stop."""
    n = 60
    greedy = run(engine, [seq(0, n)])["0"]
    tokenizer = _CharTokenizer()
    spans: list[int] = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kwargs: spans.append(len(ids)) or decode(ids, **kwargs)
    eng = make_engine(base, folders, tokenizer=tokenizer)
    never = Row("never", PROMPTS[0], PLANS[0], SamplingParams(max_new_tokens=n, stop=("\x00\x00\x00",)))
    stop = decode(greedy[50:52])
    late = Row("late", PROMPTS[0], PLANS[0], SamplingParams(max_new_tokens=n, stop=(stop,)))
    run(eng, [never, late])
    assert never.finish_reason == "length" and never.output_ids == greedy
    first = decode(greedy).find(stop)
    assert late.finish_reason == "stop" and decode(late.output_ids).find(stop) == first
    assert len(late.output_ids) == first + len(stop)  # one character per token: ends on the stop's last token
    assert max(spans) <= 4


def test_the_batch_returns_the_text_it_decoded_for_stop_strings(base, engine, folders):
    """A row with stop strings is decoded once, by the batch, into the row's own TextStream; `step` returns the
    text each token settled, so a server streams that instead of decoding every token again. A row without
    stop strings is not decoded (None)."""
    tokenizer = _CharTokenizer()
    eng = make_engine(base, folders, tokenizer=tokenizer)
    greedy = run(engine, [seq(0)])["0"]
    stop = tokenizer.decode(greedy[4:6])
    text = TextStream(tokenizer, (stop,))
    watched = Row("w", PROMPTS[0], PLANS[0], SamplingParams(max_new_tokens=12, stop=(stop,)), text=text)
    plain = Row("p", PROMPTS[1], PLANS[1], SamplingParams(max_new_tokens=3))
    batch = Batch(eng)
    batch.add(watched)
    batch.add(plain)
    pieces: dict[str, list] = {"w": [], "p": []}
    while len(batch):
        for row, tokens, piece in batch.step():
            pieces[row.id].append(piece)
    assert watched.text is text and text.stopped and watched.finish_reason == "stop"
    assert "".join(pieces["w"]) + text.finish() == text.text == visible_text(tokenizer, watched)
    assert pieces["p"] and set(pieces["p"]) == {None} and plain.text is None


def test_score_equals_the_forward_logprobs(engine, base, folders):
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folders["lora"]).eval()
    tokens = PROMPTS[2]
    with torch.no_grad():
        lp = torch.log_softmax(peft(torch.tensor([tokens])).logits[0, :-1], -1)
    want = [float(lp[i, t]) for i, t in enumerate(tokens[1:])]
    got = score(engine, tokens, PLANS[0])
    assert len(got) == len(tokens) - 1 and max(abs(a - b) for a, b in zip(got, want)) <= 1e-5


def test_bad_requests_are_refused_at_add(engine):
    batch = Batch(engine)
    with pytest.raises(PlanError, match="'nope'"):
        batch.add(Row("x", [1, 2], RowPlan((AdapterUse("nope"),))))
    with pytest.raises(ValueError, match="empty prompt"):
        batch.add(Row("y", [], RowPlan()))
    with pytest.raises(ValueError, match="top_p"):
        batch.add(Row("z", [1], RowPlan(), SamplingParams(top_p=0)))
    with pytest.raises(ValueError, match="tokenizer"):
        batch.add(Row("s", [1], RowPlan(), SamplingParams(stop=("x",))))
    batch.add(Row("w", [1], RowPlan()))
    with pytest.raises(ValueError, match="already"):
        batch.add(Row("w", [2], RowPlan()))
    assert len(batch) == 1


def test_token_logprobs_are_the_distribution_each_token_was_chosen_from(engine):
    """A row that asks gets each output token's logprob as Score gives it and its top k, greedy and sampled,
    batched beside rows that do not ask (which get none)."""
    asking = [seq(0, 6, logprobs=3), seq(3, 6, logprobs=0, temperature=0.8, seed=1), seq(1, 6)]
    run(engine, asking)
    for row in asking[:2]:
        assert len(row.logprobs) == len(row.output_ids) == 6
        scored = score(engine, row.prompt_ids + row.output_ids, row.plan)[len(row.prompt_ids) - 1:]
        assert max(abs(lp.logprob - s) for lp, s in zip(row.logprobs, scored)) <= 1e-5
    greedy = asking[0].logprobs
    assert all(len(lp.top) == 3 and lp.top[0] == (t, pytest.approx(lp.logprob)) for lp, t
               in zip(greedy, asking[0].output_ids))  # greedy: the chosen token is the likeliest
    assert all(lp.top == () for lp in asking[1].logprobs) and asking[2].logprobs == []
    with pytest.raises(ValueError, match="logprobs"):
        Batch(engine).add(seq(0, 2, logprobs=21))
