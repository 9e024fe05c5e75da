"""Bottleneck adapters in the runtime equal the AdapterHub `adapters` library's output (1e-5, fp32).

The references (tests/fixtures/bottleneck/, made by make_fixtures.py there with adapters 1.3.0 and
transformers 4.57) are logits for fixed input ids; here the same base loads with transformers 5 and
the same adapter folders go adapterhub_import -> read_adapter -> Engine, all cases in one batch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub.adapterhub_import import import_adapterhub
from hub.artifact import ArtifactError, read_adapter
from runtime.engine import Engine
from runtime.plan import AdapterUse, PlanError, RowPlan
from helpers import tiny_llama

pytestmark = pytest.mark.slow  # the engine against the adapters library's recorded outputs, many mixed batches

FIXTURES = Path(__file__).parent / "fixtures" / "bottleneck"
INDEX = json.loads((FIXTURES / "index.json").read_text())
TOL = 1e-5


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """Every fixture adapter converted into our format: {name: folder}."""
    root = tmp_path_factory.mktemp("bottleneck-imported")
    out = {}
    for src in sorted((FIXTURES / "adapters").iterdir()):
        import_adapterhub(src, root / src.name)
        out[src.name] = root / src.name
    return out


@pytest.fixture(scope="module")
def engine(imported) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32)
    eng = Engine(model)
    for name, folder in imported.items():
        eng.load(name, read_adapter(folder))
    return eng


def plan_of(case: dict) -> RowPlan:
    return RowPlan(tuple(AdapterUse(a, w) for a, w in zip(case["adapters"], case["weights"])), case["mode"])


def reference(case: str, row: int) -> torch.Tensor:
    return load_file(str(FIXTURES / INDEX["cases"][case]["logits"]))["logits"][row]


def test_fixtures_cover_every_composition():
    cases = INDEX["cases"].values()
    assert {c["mode"] for c in cases} == {"stack", "average"}
    assert any(len(c["adapters"]) > 1 and c["mode"] == "stack" for c in cases)
    assert any(c["adapters"] == [] for c in cases)
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 2 * 1024 * 1024


def check_batch(engine: Engine, rows: list[tuple[str, int]]) -> None:
    """One forward of these (case, input row) rows: each row's logits within TOL of its reference."""
    ids = torch.tensor(INDEX["input_ids"])
    batch = torch.stack([ids[row] for _, row in rows])
    logits, _ = engine.forward(batch, torch.ones_like(batch), [plan_of(INDEX["cases"][c]) for c, _ in rows],
                               use_cache=False)
    for i, (case, row) in enumerate(rows):
        diff = (logits[i] - reference(case, row)).abs().max().item()
        assert diff <= TOL, f"row {i} ({INDEX['cases'][case]['description']}, input {row}) in {rows}: max diff {diff}"


def test_mixed_batch_equals_adapters_library(engine):
    """Rows with different single adapters, none, Stacks and Averages, in one forward pass."""
    cases = list(INDEX["cases"])
    check_batch(engine, [(case, i % 2) for i, case in enumerate(cases)] + [(case, 1 - i % 2) for i, case in
                                                                          enumerate(cases)])


def test_the_fused_cpu_kernels_give_the_adapters_librarys_outputs(engine, monkeypatch):
    """The same mixed batch on the fused CPU kernels, which a server on a CPU runs (the suite runs the seam's
    reference: tests/conftest.py)."""
    from runtime.kernels import cpu

    if cpu.load() is None:
        pytest.skip("the fused CPU kernels could not be built here (see the warning)")
    monkeypatch.setenv("HUB_KERNELS", "cpu")
    test_mixed_batch_equals_adapters_library(engine)


@pytest.mark.parametrize("order", ["reversed", "alone", "twice"])
def test_a_row_equals_the_reference_whatever_its_neighbours(engine, order):
    """Every composition's rows in another batch (reversed, each alone, each beside a copy of itself): the same
    logits as the reference, so no row's blocks, residual or composition steps leak into another's."""
    rows = [(case, i % 2) for i, case in enumerate(INDEX["cases"])]
    for batch in {"reversed": [rows[::-1]], "alone": [[r] for r in rows], "twice": [[r, r] for r in rows]}[order]:
        check_batch(engine, batch)


def test_ia3_scales_a_block_output_before_the_block_whatever_the_plans(engine, imported, tmp_path):
    """IA3 on o_proj scales its output, and the bottleneck block after attention sees the scaled output: a row
    with both equals the block on a base with the scaling merged into o_proj, whichever technique its plan names
    first and whatever its neighbours name."""
    import copy

    from peft import IA3Config, PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import save_peft_adapter

    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32)
    folder = save_peft_adapter(base, IA3Config(target_modules=["o_proj"], feedforward_modules=[]), tmp_path / "ia3")
    merged = Engine(PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload())
    merged.load("houlsby", read_adapter(imported["houlsby"]))
    engine.load("ia3_o", read_adapter(folder))
    ids = torch.tensor(INDEX["input_ids"])
    want, _ = merged.forward(ids[:1], torch.ones_like(ids[:1]), [RowPlan((AdapterUse("houlsby"),))], use_cache=False)
    both = [RowPlan((AdapterUse("houlsby"), AdapterUse("ia3_o"))), RowPlan((AdapterUse("ia3_o"), AdapterUse("houlsby")))]
    for plans in ([both[0], RowPlan((AdapterUse("ia3_o"),))], [RowPlan((AdapterUse("ia3_o"),)), both[1]],
                  [both[1], both[0]]):
        batch = torch.stack([ids[0], ids[0]])
        logits, _ = engine.forward(batch, torch.ones_like(batch), plans, use_cache=False)
        for row in (r for r, p in enumerate(plans) if p in both):
            assert (logits[row] - want[0]).abs().max().item() <= TOL, plans
    engine.unload("ia3_o")


def test_blocks_are_read_in_place_from_slots(engine):
    """Each adapter's blocks live in its slot of the site's buffer for its bottleneck size from load on (exactly its
    tensors' bytes); a batch's op holds index tensors into those buffers, and batch changes move no block."""
    from runtime.techniques.base import Stage
    from runtime.techniques.bottleneck import BlockSlot
    from runtime.techniques.slots import store_of

    site = "model.layers.0.mlp.down_proj"
    blocks = {key: engine._residents[key].sites[site] for key in ("houlsby", "pfeiffer", "seq_tanh")}
    assert all(isinstance(b, BlockSlot) for b in blocks.values())
    assert blocks["houlsby"].buffer is blocks["seq_tanh"].buffer is not blocks["pfeiffer"].buffer  # b 8, 8, 4
    hidden = engine.model.config.hidden_size
    b = blocks["houlsby"].buffer.parts[0].shape[1]
    assert blocks["houlsby"].buffer.slot_bytes == 4 * (2 * b * hidden + b + hidden)
    plans = [plan_of(INDEX["cases"][c]) for c in ("stack_pfeiffer_houlsby", "average_pfeiffer_seq_gelu_new", "base")]
    op, = engine.batch_ops(plans)[site][Stage.POST]
    read = {id(g.buffer) for step in op.steps for g in step} | {id(g.buffer) for g in op.average[1]}
    assert read == {id(blocks["houlsby"].buffer), id(blocks["pfeiffer"].buffer),
                    id(engine._residents["seq_gelu_new"].sites[site].buffer)}
    store = store_of(engine.model)
    pointers = {k: [p.data_ptr() for p in buf.parts] for k, buf in store.buffers.items()}
    ids = torch.tensor(INDEX["input_ids"])
    for n in (1, 2, 3):
        tokens = torch.stack([ids[i % 2] for i in range(n)])
        engine.forward(tokens, torch.ones_like(tokens), plans[:n][::-1], use_cache=False)
    assert {k: [p.data_ptr() for p in buf.parts] for k, buf in store.buffers.items()} == pointers


def test_left_padded_rows_equal_reference(engine):
    """Rows padded to a longer row of the batch still give the reference at their real tokens."""
    ids = torch.tensor(INDEX["input_ids"])
    pad = 3
    long_row = torch.arange(3, 3 + ids.shape[1] + pad)
    batch = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), ids[0]]),
                         torch.cat([torch.zeros(pad, dtype=torch.long), ids[1]]), long_row])
    mask = torch.ones_like(batch)
    mask[:2, :pad] = 0
    cases = ["stack_pfeiffer_houlsby", "average_pfeiffer_parallel"]
    plans = [plan_of(INDEX["cases"][c]) for c in cases] + [RowPlan()]
    logits, _ = engine.forward(batch, mask, plans, use_cache=False)
    for row, case in enumerate(cases):
        assert (logits[row, pad:] - reference(case, row)).abs().max().item() <= TOL


def test_decode_with_cache_equals_reference(engine):
    """Prefill then one token at a time through the KV cache: the residual taps work per step."""
    ids = torch.tensor(INDEX["input_ids"])
    cases = ["houlsby", "stack_houlsby_seq_tanh"]
    plans = [plan_of(INDEX["cases"][c]) for c in cases]
    prefix = 6
    logits, cache = engine.forward(ids[:, :prefix], torch.ones(2, prefix, dtype=torch.long), plans)
    steps = [logits]
    for t in range(prefix, ids.shape[1]):
        logits, cache = engine.forward(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.long), plans, cache=cache)
        steps.append(logits)
    got = torch.cat(steps, dim=1)
    for row, case in enumerate(cases):
        assert (got[row] - reference(case, row)).abs().max().item() <= TOL


def test_stack_weight_scales_the_adapter(engine):
    """Our extension of Stack: a weight scales the adapter's f; weight 0 leaves the base output."""
    ids = torch.tensor(INDEX["input_ids"])
    plans = [RowPlan((AdapterUse("pfeiffer", 0.0),)), RowPlan((AdapterUse("pfeiffer", 1.0),))]
    logits, _ = engine.forward(ids, torch.ones_like(ids), plans, use_cache=False)
    assert (logits[0] - reference("base", 0)).abs().max().item() <= TOL
    assert (logits[1] - reference("pfeiffer", 1)).abs().max().item() <= TOL


def test_average_of_one_is_the_adapter_alone(engine):
    ids = torch.tensor(INDEX["input_ids"])
    plans = [RowPlan((AdapterUse("houlsby", 5.0),), mode="average")] * 2
    logits, _ = engine.forward(ids, torch.ones_like(ids), plans, use_cache=False)
    for row in range(2):
        assert (logits[row] - reference("houlsby", row)).abs().max().item() <= TOL


def test_average_weights_summing_to_zero_where_present_is_refused(engine):
    """houlsby and parallel share only the ffn block; pfeiffer's -1 cancels houlsby's 1 there."""
    ids = torch.tensor(INDEX["input_ids"])
    plan = RowPlan((AdapterUse("houlsby", 1.0), AdapterUse("pfeiffer", -1.0), AdapterUse("parallel", 2.0)),
                   mode="average")
    engine.forward(ids[:1], torch.ones_like(ids[:1]), [plan], use_cache=False)  # every block: sum != 0
    plan = RowPlan((AdapterUse("houlsby", 1.0), AdapterUse("seq_tanh", 1.0), AdapterUse("pfeiffer", -1.0)),
                   mode="average")
    with pytest.raises(PlanError, match="sum to 0"):  # layer 1's ffn: seq_tanh leaves it out
        engine.forward(ids[:1], torch.ones_like(ids[:1]), [plan], use_cache=False)


def test_base_rows_are_bit_exact(engine):
    """A row without bottleneck adapters is untouched, even beside rows with them."""
    ids = torch.tensor(INDEX["input_ids"])
    alone, _ = engine.forward(ids, torch.ones_like(ids), [RowPlan(), RowPlan()], use_cache=False)
    mixed, _ = engine.forward(ids, torch.ones_like(ids), [RowPlan((AdapterUse("houlsby"),)), RowPlan()],
                              use_cache=False)
    assert torch.equal(alone[1], mixed[1])
    assert not torch.allclose(alone[0], mixed[0], atol=1e-3)


def test_refuses_base_of_another_size(imported):
    eng = Engine(tiny_llama(hidden_size=32, intermediate_size=64))
    with pytest.raises(ArtifactError, match="hidden_size|expected"):
        eng.load("houlsby", read_adapter(imported["houlsby"]))
    assert eng.resident() == {}


def test_refuses_base_with_another_layer_layout(imported):
    from transformers import GPT2Config, GPT2LMHeadModel

    eng = Engine(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)))
    with pytest.raises(ArtifactError, match="'gpt2'"):
        eng.load("pfeiffer", read_adapter(imported["pfeiffer"]))


def test_refuses_size_disagreeing_with_config(imported, tmp_path):
    folder = tmp_path / "pfeiffer"
    shutil.copytree(imported["pfeiffer"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["bottleneck_size"] = 5
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="bottleneck size 4, the config says 5"):
        Engine(tiny_llama()).load("p", read_adapter(folder))


def test_bf16_base_serves_the_same_adapters(imported):
    """In bf16 the blocks are kept in the base's dtype (each output rounded into it once); rounding stays below 2 %
    of each row's adapter effect (an adapter applied 15 % too weakly fails)."""
    from transformers import AutoModelForCausalLM

    eng = Engine(AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.bfloat16))
    for name in ("houlsby", "pfeiffer", "parallel"):
        eng.load(name, read_adapter(imported[name]))
    ids = torch.tensor(INDEX["input_ids"])
    cases = ["stack_pfeiffer_houlsby", "average_pfeiffer_parallel"]
    logits, _ = eng.forward(ids, torch.ones_like(ids), [plan_of(INDEX["cases"][c]) for c in cases], use_cache=False)
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():  # the base alone, in float32: each row's adapter effect is its reference minus this
        plain = AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32)(ids).logits
    for row, case in enumerate(cases):
        error = (logits[row].float() - reference(case, row)).abs().max().item()
        effect = (reference(case, row) - plain[row]).abs().max().item()
        assert error <= 0.02 * effect, (case, error, effect)


def test_refuses_base_missing_a_layer_naming_it(imported):
    eng = Engine(tiny_llama(num_hidden_layers=1))
    with pytest.raises(ArtifactError, match="'model.layers.1'"):
        eng.load("houlsby", read_adapter(imported["houlsby"]))
