"""Each row of a mixed batch equals its own single-adapter run through PEFT (or a plain formula)."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import LLAMA_TARGETS, save_bitfit_adapter, save_peft_adapter, tiny_llama
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig

from hub.artifact import read_adapter
from runtime.engine import Engine
from runtime.plan import AdapterUse, PlanError, RowPlan
from runtime.techniques.base import Stage
from runtime.techniques.bitfit import BiasOp

pytestmark = pytest.mark.slow  # every technique compared with PEFT in mixed batches

TOL = 1e-5


def plan(*keys: str, weights=None, mode: str = "stack") -> RowPlan:
    weights = weights or [1.0] * len(keys)
    return RowPlan(tuple(AdapterUse(k, w) for k, w in zip(keys, weights)), mode)


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def engine_rows(engine: Engine, rows: list[list[int]], plans: list[RowPlan]) -> list[torch.Tensor]:
    """Each row's logits over its own tokens, from one batched forward."""
    ids, mask = left_pad(rows)
    logits, _ = engine.forward(ids, mask, plans)
    return [logits[i, logits.shape[1] - len(r):] for i, r in enumerate(rows)]


def model_logits(model, tokens: list[int]) -> torch.Tensor:
    """A model's logits for one row alone (PEFT prompt tuning prepends virtual tokens: drop them)."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -len(tokens):]


def peft_model(base, folder):
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def merged_lora(base, parts: list[tuple[str, float]]):
    """A copy of `base` with W += sum_i w_i * scaling_i * B_i @ A_i merged by hand (the stacking reference),
    plus w_i * scaling_i * lora_bias_i on the output where the adapter has one."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for folder, weight in parts:
        peft = peft_model(base, folder)
        for name, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                with torch.no_grad():
                    modules[name].weight += weight * delta
                bias = module.lora_B["default"].bias
                if bias is not None:  # lora_bias: (B A x + b) * scaling
                    extra = (weight * module.scaling["default"] * bias).detach()
                    modules[name].register_forward_hook(lambda m, args, out, b=extra: out + b)
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    f = {
        "lora_all": save_peft_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), root / "a", 1),
        "lora_rs": save_peft_adapter(base, LoraConfig(r=8, lora_alpha=16, use_rslora=True,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]), root / "b", 2),
        "lora_pat": save_peft_adapter(base, LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
            rank_pattern={"q_proj": 6}, alpha_pattern={"down_proj": 3}, lora_bias=True), root / "c", 3),
        "lora_b": save_peft_adapter(base, LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
                                    root / "d", 4),
        "ia3": save_peft_adapter(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), root / "e", 5),
        "ia3_b": save_peft_adapter(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]), root / "f", 6),
        "ia3_q_in": save_peft_adapter(base, IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"]),
                                      root / "j", 10),
        "prompt5": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), root / "g", 7),
        "prompt3": save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), root / "h", 8),
    }
    gen = torch.Generator().manual_seed(9)
    f["bitfit"] = save_bitfit_adapter(root / "i", {
        "model.layers.0.self_attn.q_proj": torch.randn(64, generator=gen),  # Llama q_proj has no bias
        "model.layers.1.mlp.down_proj": torch.randn(64, generator=gen),
    })
    return f


@pytest.fixture(scope="module")
def engine(base, folders):
    eng = Engine(copy.deepcopy(base))
    for key, folder in folders.items():
        eng.load(key, read_adapter(folder))
    return eng


ROWS = [[5, 9, 17, 33, 4, 81, 12], [7, 7, 100, 3], [44, 12, 90, 61, 70, 8, 19, 27, 3], [15, 16], [101, 6, 55]]


def bitfit_reference(base, folder, tokens, weight: float = 1.0) -> torch.Tensor:
    """Plain formula: each listed module's output plus weight * its bias delta."""
    model = copy.deepcopy(base)
    for key, bias in read_adapter(folder).tensors.items():
        module = model.get_submodule(key.removesuffix(".bias"))
        module.register_forward_hook(lambda m, args, out, b=bias: out + weight * b)
    return model_logits(model, tokens)


@pytest.mark.parametrize("key", ["lora_all", "lora_rs", "lora_pat", "lora_b", "ia3", "prompt5", "prompt3"])
def test_each_row_of_mixed_batch_equals_its_peft_run(base, folders, engine, key):
    keys = [key, "lora_rs", None, "prompt3", "ia3"]
    plans = [plan(k) if k else RowPlan() for k in keys]
    got = engine_rows(engine, ROWS, plans)
    for k, tokens, logits in zip(keys, ROWS, got):
        ref = model_logits(peft_model(base, folders[k]) if k else base, tokens)
        assert (logits - ref).abs().max() <= TOL, (k, (logits - ref).abs().max())


def test_bitfit_rows_equal_the_formula(base, folders, engine):
    plans = [plan("bitfit"), RowPlan(), plan("bitfit", weights=[-0.5]), plan("lora_all")]
    got = engine_rows(engine, ROWS[:4], plans)
    assert (got[0] - bitfit_reference(base, folders["bitfit"], ROWS[0])).abs().max() <= TOL
    assert (got[1] - model_logits(base, ROWS[1])).abs().max() <= TOL
    assert (got[2] - bitfit_reference(base, folders["bitfit"], ROWS[2], -0.5)).abs().max() <= TOL


def test_no_adapter_row_is_exactly_the_base(base, engine):
    plans = [plan("lora_all"), RowPlan(), plan("ia3"), plan("bitfit"), plan("lora_pat", "lora_rs")]
    ids, mask = left_pad(ROWS)
    logits, _ = engine.forward(ids, mask, plans)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = base(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(logits[1], ref[1])
    assert not torch.allclose(logits[0], ref[0], atol=1e-3)  # and the adapters did act on the others


def test_weighted_lora_stack_equals_hand_merged_delta_sum(base, folders, engine):
    parts = [("lora_all", 0.7), ("lora_pat", -0.4), ("lora_b", 1.3)]
    plans = [plan(*[k for k, _ in parts], weights=[w for _, w in parts]), RowPlan(), plan("lora_rs")]
    got = engine_rows(engine, ROWS[:3], plans)
    ref = model_logits(merged_lora(base, [(folders[k], w) for k, w in parts]), ROWS[0])
    assert (got[0] - ref).abs().max() <= TOL


def test_average_mode_normalises_the_weights(base, folders, engine):
    plans = [plan("lora_all", "lora_b", weights=[1.0, 3.0], mode="average"), plan("ia3", "ia3_b", mode="average")]
    got = engine_rows(engine, ROWS[:2], plans)
    ref = model_logits(merged_lora(base, [(folders["lora_all"], 0.25), (folders["lora_b"], 0.75)]), ROWS[0])
    assert (got[0] - ref).abs().max() <= TOL
    # IA3 average: the mean of the two adapters' outputs, i.e. PEFT with the mean of the vectors
    assert (got[1] - model_logits(combined_ia3(base, folders, lambda a, b: (a + b) / 2), ROWS[1])).abs().max() <= TOL


def combined_ia3(base, folders, combine):
    """PEFT IA3 whose vectors are `combine` of ia3 and ia3_b (both target the same modules)."""
    a, b = peft_model(base, folders["ia3"]), peft_model(base, folders["ia3_b"])
    b_params = dict(b.named_parameters())
    with torch.no_grad():
        for name, p in a.named_parameters():
            if "ia3_l" in name:
                p.copy_(combine(p, b_params[name]))
    return a


def test_ia3_stack_multiplies(base, folders, engine):
    got = engine_rows(engine, ROWS[:2], [plan("ia3", "ia3_b"), plan("ia3", "ia3_b", weights=[1.0, 0.0])])
    assert (got[0] - model_logits(combined_ia3(base, folders, lambda a, b: a * b), ROWS[0])).abs().max() <= TOL
    assert (got[1] - model_logits(peft_model(base, folders["ia3"]), ROWS[1])).abs().max() <= TOL


def test_lora_plus_ia3_is_ia3_over_the_merged_lora(base, folders, engine):
    got = engine_rows(engine, ROWS[:2], [plan("lora_all", "ia3"), RowPlan()])
    ref = model_logits(PeftModel.from_pretrained(merged_lora(base, [(folders["lora_all"], 1.0)]), folders["ia3"]),
                       ROWS[0])
    assert (got[0] - ref).abs().max() <= TOL


def test_stacked_prompts_concatenate_in_order_and_combine_with_lora(base, folders, engine):
    plans = [plan("prompt5", "prompt3"), plan("lora_all", "prompt3"), plan("prompt3", "prompt5")]
    got = engine_rows(engine, ROWS[:3], plans)
    p5, p3 = (read_adapter(folders[k]).tensors["prompt_embeddings"] for k in ("prompt5", "prompt3"))
    for row, prompt in ((0, torch.cat([p5, p3])), (2, torch.cat([p3, p5]))):
        embeds = torch.cat([prompt, base.get_input_embeddings()(torch.tensor(ROWS[row]))])[None]
        with torch.no_grad():
            ref = base(inputs_embeds=embeds).logits[0, -len(ROWS[row]):]
        assert (got[row] - ref).abs().max() <= TOL
    ref = model_logits(PeftModel.from_pretrained(merged_lora(base, [(folders["lora_all"], 1.0)]), folders["prompt3"]),
                       ROWS[1])
    assert (got[1] - ref).abs().max() <= TOL


def test_fused_sibling_projections_never_reuse_a_different_input(base, folders, engine):
    # q and v share their A projections (same input tensor) unless something changes q's input first:
    # here IA3 scales q's input on row 0, so q's x is a new tensor and v must not reuse q's projection.
    plans = [plan("lora_all", "ia3_q_in"), plan("lora_rs"), RowPlan()]
    got = engine_rows(engine, ROWS[:3], plans)
    ref = model_logits(PeftModel.from_pretrained(merged_lora(base, [(folders["lora_all"], 1.0)]), folders["ia3_q_in"]),
                       ROWS[0])
    assert (got[0] - ref).abs().max() <= TOL
    assert (got[1] - model_logits(peft_model(base, folders["lora_rs"]), ROWS[1])).abs().max() <= TOL


@pytest.mark.parametrize("order", [[4, 3, 2, 1, 0], [1, 0, 3, 2, 4], [2, 4, 0]])
def test_a_row_gives_the_same_output_whatever_its_neighbours(base, folders, engine, order):
    """Rows reordered or dropped give each remaining row what the whole batch gives it: LoRA (every projection),
    IA3 on a feed-forward input (a PRE op that rewrites x for its rows only), BitFit, soft prompts, none."""
    keys = ["lora_all", "ia3", None, "prompt3", "bitfit"]
    plans = [plan(k) if k else RowPlan() for k in keys]
    whole = engine_rows(engine, ROWS, plans)
    moved = engine_rows(engine, [ROWS[i] for i in order], [plans[i] for i in order])
    for got, i in zip(moved, order):
        assert (got - whole[i]).abs().max() <= 1e-5, keys[i]
    ref = model_logits(peft_model(base, folders["ia3"]), ROWS[1])
    assert (whole[1] - ref).abs().max() <= TOL


def test_lora_rows_read_their_adapters_in_place_from_slots(base, folders):
    """Two rows with different all-projection LoRAs: the batch's LoRA ops hold only index tensors into the
    slot buffers the adapters were copied into at load (no per-batch copy of weights), sibling sites share
    equal index tensors, and every row still equals its PEFT run."""
    eng = Engine(copy.deepcopy(base))
    eng.load("x", read_adapter(folders["lora_all"]))
    eng.load("y", read_adapter(folders["lora_all"]))
    plans = [plan("x"), plan("y", weights=[0.5])]
    ops = eng.batch_ops(plans)
    q, v = (ops[f"model.layers.1.self_attn.{name}"][Stage.DELTA][0] for name in ("q_proj", "v_proj"))
    (buffer, (rows, slots, scale)), = q.classes
    x_site = eng._residents["x"].sites["model.layers.1.self_attn.q_proj"]
    assert buffer is x_site.buffer and buffer.parts[0][x_site.slot].data_ptr() != 0
    assert rows.tolist() in ([0, 1], [1, 0]) and sorted(scale.tolist()) == [0.5, 1.0]
    assert v.classes[0][1][0] is rows  # equal entries, one tensor
    got = engine_rows(eng, ROWS[:2], plans)
    assert (got[0] - model_logits(peft_model(base, folders["lora_all"]), ROWS[0])).abs().max() <= TOL
    half = model_logits(merged_lora(base, [(folders["lora_all"], 0.5)]), ROWS[1])
    assert (got[1] - half).abs().max() <= TOL


def test_lora_bias_is_read_in_place_from_a_vector_slot_whatever_the_neighbours(base, folders):
    """A LoRA's `lora_bias` lives in a vector slot from load on: the batch-wide LoRA op adds it from that buffer
    (no per-batch vector), weighted in a stack, and each row equals its reference alone or beside others."""
    eng = Engine(copy.deepcopy(base))
    for key in ("lora_pat", "lora_all"):
        eng.load(key, read_adapter(folders[key]))
    plans = [plan("lora_pat"), plan("lora_pat", "lora_all", weights=[0.5, 1.0]), RowPlan(), plan("lora_all")]
    q = "model.layers.0.self_attn.q_proj"
    bias = eng._residents["lora_pat"].sites[q].bias
    assert bias is not None and bias.buffer.parts[0].shape[1:] == (64,)
    op = eng.batch_ops(plans)[q][Stage.DELTA][0]
    assert op.biases == [bias.buffer]
    pointer = bias.buffer.parts[0].data_ptr()
    got = engine_rows(eng, ROWS[:4], plans)
    refs = [model_logits(peft_model(base, folders["lora_pat"]), ROWS[0]),
            model_logits(merged_lora(base, [(folders["lora_pat"], 0.5), (folders["lora_all"], 1.0)]), ROWS[1]),
            model_logits(base, ROWS[2]), model_logits(peft_model(base, folders["lora_all"]), ROWS[3])]
    for i, ref in enumerate(refs):
        assert (got[i] - ref).abs().max() <= TOL, i
    for i, p in enumerate(plans):  # each row alone, then in another order, gives what it gives here
        assert (got[i] - engine_rows(eng, ROWS[i:i + 1], [p])[0]).abs().max() <= 1e-5, i
    flipped = engine_rows(eng, ROWS[:4][::-1], plans[::-1])[::-1]
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, flipped))
    assert bias.buffer.parts[0].data_ptr() == pointer  # batch changes moved no bias


def test_ia3_and_bitfit_rows_read_their_vectors_in_place_from_slots(base, folders):
    """IA3 and BitFit vectors live in slot buffers from load on: a batch's ops index the very buffers the adapters
    were copied into, and every row, whatever its
    neighbours (IA3 stacked with weight 1 or weighted, averaged, over a LoRA; BitFit weighted), equals its
    reference."""
    eng = Engine(copy.deepcopy(base))
    for key in ("ia3", "ia3_b", "bitfit", "lora_all"):
        eng.load(key, read_adapter(folders[key]))
    plans = [plan("ia3"), plan("ia3", "ia3_b", weights=[1.0, 0.5]), RowPlan(),
             plan("ia3", "ia3_b", weights=[1.0, 3.0], mode="average"), plan("bitfit", weights=[2.0]),
             plan("lora_all", "ia3", "bitfit")]
    ops = eng.batch_ops(plans)
    down = "model.layers.1.mlp.down_proj"
    (scale,), (bias,) = ops[down][Stage.PRE], [op for op in ops[down][Stage.DELTA] if isinstance(op, BiasOp)]
    assert scale.buffer is eng._residents["ia3"].sites[down].buffer
    assert bias.buffers == [eng._residents["bitfit"].sites[down].buffer]
    assert len(ops["model.layers.0.self_attn.k_proj"][Stage.POST]) == 1
    rows = [*ROWS, [9, 8, 7, 6, 5]]
    got = engine_rows(eng, rows, plans)
    refs = [model_logits(peft_model(base, folders["ia3"]), rows[0]),
            model_logits(combined_ia3(base, folders, lambda a, b: a * (1 + 0.5 * (b - 1))), rows[1]),
            model_logits(base, rows[2]),
            model_logits(combined_ia3(base, folders, lambda a, b: 0.25 * a + 0.75 * b), rows[3]),
            bitfit_reference(base, folders["bitfit"], rows[4], 2.0)]
    for i, ref in enumerate(refs):
        assert (got[i] - ref).abs().max() <= TOL, i
    assert torch.equal(got[2], engine_rows(eng, rows[2:3], [RowPlan()])[0])
    for i, p in enumerate(plans):  # each row alone gives what it gives beside the others
        assert (got[i] - engine_rows(eng, rows[i:i + 1], [p])[0]).abs().max() <= 1e-5, i


def test_last_only_gives_the_last_logits_of_every_row(engine):
    """Generation asks for the last position only (the model then projects only it onto the vocabulary)."""
    plans = [plan("lora_all"), RowPlan(), plan("prompt3"), plan("ia3")]
    ids, mask = left_pad(ROWS[:4])
    full, _ = engine.forward(ids, mask, plans)
    last, _ = engine.forward(ids, mask, plans, last_only=True)
    assert last.shape == (4, 1, full.shape[-1])
    assert (last - full[:, -1:]).abs().max() <= 1e-5


def test_last_only_feeds_the_vocabulary_head_a_contiguous_input(engine):
    """The head's input must be contiguous: a strided (rows, 1, hidden) slice makes the projection a
    batched matmul over a per-row copy of the whole head (10-30x the time of a prefill's head)."""
    seen = []
    hook = engine.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        ids, mask = left_pad(ROWS[:3])
        engine.forward(ids, mask, [RowPlan()] * 3, last_only=True)
    finally:
        hook.remove()
    assert seen == [True]


def test_keep_last_gives_and_projects_only_the_last_positions(engine):
    """Scoring a completion asks for its last positions only: the vocabulary head sees just those rows."""
    plans = [plan("lora_all"), RowPlan(), plan("prompt5"), plan("ia3")]
    ids, mask = left_pad(ROWS[:4])
    full, _ = engine.forward(ids, mask, plans, use_cache=False)
    seen = []
    hook = engine.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        kept, _ = engine.forward(ids, mask, plans, use_cache=False, keep_last=3)
    finally:
        hook.remove()
    assert kept.shape == (4, 3, full.shape[-1]) and seen == [torch.Size([4, 3, 64])]
    assert (kept - full[:, -3:]).abs().max() <= 1e-5


def test_completion_nll_keeps_the_callers_order_and_scores_each_item_as_alone(engine):
    """Items are batched by soft-prompt length, then longest first, yet each result is its item's, in the given
    order, and equals that item scored alone."""
    from runtime.evaluate import Item, completion_nll

    keys = [None, "lora_all", "prompt5", "ia3", "prompt3", "lora_b"]
    items = [Item(plan(k) if k else RowPlan(), tuple(row[:1 + i % 2]), tuple(row[1 + i % 2:]))
             for i, (k, row) in enumerate((k, row) for row in ROWS for k in keys) if len(row) > 2]
    widths, head = [], []  # the rows' width at the first layer (soft prompts included), positions at the head
    hooks = [engine.model.get_decoder().layers[0].register_forward_pre_hook(
                 lambda m, a, k: widths.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True),
             engine.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head.append(a[0].shape[1]))]
    batches = []  # per forward: the rows' soft-prompt lengths and token counts
    forward = engine.forward
    engine.forward = lambda ids, mask, plans, **kw: batches.append(
        (engine.prompt_lengths(plans), mask.sum(1).tolist())) or forward(ids, mask, plans, **kw)
    try:
        together = completion_nll(engine, items, batch_size=4)
    finally:
        del engine.forward
        for hook in hooks:
            hook.remove()
    # rows of one soft-prompt length together, then longest first: a batch of one soft-prompt length is only as
    # wide as its widest row (soft prompt included), and the widths fall within each soft-prompt length
    soft = [[s + r for s, r in zip(lengths, real)] for lengths, real in batches]
    assert [s for lengths, _ in batches for s in lengths] == sorted((s for lengths, _ in batches for s in lengths),
                                                                  reverse=True)
    alike = [k for k, (lengths, _) in enumerate(batches) if len(set(lengths)) == 1]
    assert len(alike) >= len(batches) - 2 and all(widths[k] == max(soft[k]) for k in alike)
    assert max(head) == max(len(i.reply_ids) for i in items) + 1  # only the positions that predict replies
    assert sum(head) < sum(widths)
    alone = [completion_nll(engine, [item], batch_size=1)[0] for item in items]
    assert [n for _, n in together] == [len(i.reply_ids) for i in items]
    for (got, _), (want, _) in zip(together, alone):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want))


def test_replacing_or_unloading_a_key_is_never_served_stale(base, folders):
    """A batch's ops index the slots of the residents it was compiled with: replacing a key serves the new
    weights at once, and after an unload the plan is refused."""
    eng = Engine(copy.deepcopy(base))
    eng.load("x", read_adapter(folders["lora_all"]))
    plans = [plan("x"), RowPlan()]
    eng.batch_ops(plans)
    eng.load("x", read_adapter(folders["lora_b"]))  # same key, other weights
    got = engine_rows(eng, ROWS[:1], [plan("x")])[0]
    assert (got - model_logits(peft_model(base, folders["lora_b"]), ROWS[0])).abs().max() <= TOL
    eng.unload("x")
    with pytest.raises(PlanError, match="not loaded"):
        eng.batch_ops(plans)


def test_prepare_needs_no_lock_and_install_makes_it_live(base, folders):
    """`prepare` (the copies of a load) runs while a forward holds the engine; nothing is live until
    `install`, which then serves exactly what `load` would."""
    import threading

    eng = Engine(copy.deepcopy(base))
    before = engine_rows(eng, ROWS[:1], [RowPlan()])[0]
    prepared: list = []
    with eng._lock:  # a forward in flight holds this lock
        worker = threading.Thread(target=lambda: prepared.append(eng.prepare("x", read_adapter(folders["lora_all"]))))
        worker.start()
        worker.join(timeout=60)
        assert prepared and not worker.is_alive()
    assert eng.resident() == {}
    assert not any(type(m).__name__ == "AdaptedModule" for m in eng.model.modules())  # nothing wrapped yet
    with pytest.raises(PlanError, match="not loaded"):
        eng.check([plan("x")])
    assert eng.install(prepared[0]) == prepared[0].nbytes
    got = engine_rows(eng, ROWS[:1], [plan("x")])[0]
    assert (got - model_logits(peft_model(base, folders["lora_all"]), ROWS[0])).abs().max() <= TOL
    assert torch.equal(engine_rows(eng, ROWS[:1], [RowPlan()])[0], before)


@pytest.mark.parametrize("key", ["lora_all", "ia3", "bitfit"])
def test_slots_go_back_on_unload_on_replace_and_when_a_prepared_adapter_is_dropped(base, folders, key):
    """An adapter's slots (LoRA's A and B, IA3's and BitFit's vectors) are occupied from `prepare` on and given
    back when it is unloaded, replaced under its key, or prepared and then dropped without an install (a load
    that failed after its copies); what it occupies is what the budget counts (`weights_bytes`)."""
    from runtime.techniques.slots import store_of

    eng = Engine(copy.deepcopy(base))
    store = store_of(eng.model)
    size = eng.load("x", read_adapter(folders[key]))
    assert store.bytes()[0] == size == eng.weights_bytes(read_adapter(folders[key]))
    eng.load("x", read_adapter(folders[key]))  # replaced: the old copy's slots are free again
    assert store.bytes()[0] == size
    dropped = eng.prepare("y", read_adapter(folders[key]))
    assert store.bytes()[0] == 2 * size
    del dropped
    assert store.bytes()[0] == size
    eng.unload("x")
    assert store.bytes()[0] == 0


def test_concurrent_forwards_never_see_each_others_adapters(engine):
    import threading

    keys = ["lora_all", "ia3", "prompt5", None]
    want = {k: engine_rows(engine, ROWS[:1], [plan(k) if k else RowPlan()])[0] for k in keys}
    wrong: list[str] = []

    def worker(key):
        for _ in range(5):
            got = engine_rows(engine, ROWS[:1], [plan(key) if key else RowPlan()])[0]
            if not torch.equal(got, want[key]):
                wrong.append(str(key))

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_the_fused_cpu_kernels_serve_a_mixed_batch_as_peft_does(base, folders, engine, monkeypatch):
    """The suite runs the seam's reference (tests/conftest.py); a server on a CPU runs the fused kernels. With
    them, in one batch: LoRA on every projection, with rank and alpha patterns and lora_bias, rsLoRA, IA3, BitFit,
    a soft prompt and no adapter, each row as PEFT (or the formula) gives it alone. The same engine switches:
    its batch ops are kept per backend, and each op calls the backend it was built with."""
    from runtime.kernels import cpu
    from runtime.techniques.lora import LoraSlotsOp

    if cpu.load() is None:
        pytest.skip("the fused CPU kernels could not be built here (see the warning)")
    keys = ["lora_all", "lora_pat", "lora_rs", "ia3", "bitfit", "prompt3", None]
    rows = ROWS + [[8, 60, 2, 2, 30], [77, 1, 13]]
    plans = [plan(k) if k else RowPlan() for k in keys]
    on_reference = engine_rows(engine, rows, plans)
    monkeypatch.setenv("HUB_KERNELS", "cpu")
    got = engine_rows(engine, rows, plans)
    ops = engine.batch_ops(plans)
    assert {op.ops for site in ops.values() for op in site[1] if isinstance(op, LoraSlotsOp)} == {cpu.load()}
    for k, tokens, logits, ref_logits in zip(keys, rows, got, on_reference):
        if k == "bitfit":
            ref = bitfit_reference(base, folders[k], tokens)
        else:
            ref = model_logits(peft_model(base, folders[k]) if k else base, tokens)
        assert (logits - ref).abs().max() <= TOL, (k, (logits - ref).abs().max())
        assert (logits - ref_logits).abs().max() <= TOL, k
