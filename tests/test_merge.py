"""hub.merge against PEFT's own add_weighted_adapter on the same saved adapters, DARE's defining
properties, the hand formulas for IA3 / BitFit / bottleneck / prompt tuning, and every refusal."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

from helpers import tiny_llama
from hub.artifact import Adapter, Technique, read_adapter
from hub.merge import check_same_base, combine, lora_modules, merge
from hub.merge_spec import MergeError, MergeSpec
from hub.artifact import write_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]


def peft_adapter(folder: Path, config, seed: int) -> Path:
    """A randomly initialised adapter saved by PEFT itself (non-zero B, so deltas are not trivial)."""
    model = get_peft_model(tiny_llama(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def lora(folder: Path, seed: int, r: int = 4, alpha: int = 8, targets=ALL, **kw) -> Path:
    return peft_adapter(folder, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw), seed)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """Three same-rank LoRAs (one targeting fewer modules), two of other ranks, one with patterns."""
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": lora(d / "a", 1, targets=ALL + ["embed_tokens"]),
        "b": lora(d / "b", 2, alpha=16, targets=ALL + ["embed_tokens"]),
        "c": lora(d / "c", 3, alpha=4, targets=["q_proj", "v_proj", "embed_tokens"]),
        "r8": lora(d / "r8", 4, r=8, alpha=8, targets=ALL + ["embed_tokens"]),
        "r2": lora(d / "r2", 5, r=2, alpha=4, targets=ATTN),
        "pat": lora(d / "pat", 6, r=4, alpha=8, targets=ALL, rank_pattern={"v_proj": 6},
                    alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        "rs": lora(d / "rs", 7, r=4, alpha=8, use_rslora=True),
        "rs8": lora(d / "rs8", 8, r=8, alpha=4, use_rslora=True),
    }


def peft_merged_deltas(folders: list[Path], weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    """Module path -> delta weight of PEFT's own merge (get_delta_weight, in B @ A layout)."""
    names = [f"p{i}" for i in range(len(folders))]
    model = PeftModel.from_pretrained(tiny_llama(), str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    model.add_weighted_adapter(names, weights, "merged", **kwargs)
    return _peft_deltas(model, "merged")


def _peft_deltas(model, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and (adapter_name in getattr(module, "lora_A", {})
                                                    or adapter_name in getattr(module, "lora_embedding_A", {})):
            delta = module.get_delta_weight(adapter_name).detach()
            out[path] = delta.T if adapter_name in module.lora_embedding_A else delta
    return out


def our_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {path: m.delta() for path, m in lora_modules(adapter).items()}


def assert_deltas_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    # PEFT keeps modules that no parent touched (all zero); we do not create them.
    theirs = {k: v for k, v in theirs.items() if k in ours or v.abs().max() > 0}
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        torch.testing.assert_close(ours[path], theirs[path].float(), atol=1e-5, rtol=0, msg=path)


CASES = [
    # (parents, weights, method, extra kwargs)
    ("ab", [0.7, 0.4], "linear", {}),
    ("abc", [0.5, -0.8, 1.3], "linear", {}),  # a negative weight: task negation
    ("abc", [1.0, 0.6, -0.5], "cat", {}),
    ("a", [-1.0], "linear", {}),
    ("ab", [0.7, 0.4], "svd", {}),
    ("ab", [0.7, 0.4], "svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("abc", [0.5, 0.9, -0.4], "ties", {"density": 0.5}),
    ("abc", [0.5, 0.9, 0.4], "ties", {"density": 0.3, "majority_sign": "frequency"}),
    ("abc", [0.6, 0.3, 0.8], "magnitude_prune", {"density": 0.4}),
    ("ab", [0.7, 0.4], "dare_ties", {"density": 1.0}),  # no pruning at density 1: deterministic
    ("ab", [0.7, 0.4], "dare_linear", {"density": 1.0}),
]
SVD_CASES = [  # different ranks: only cat and the full-delta forms apply
    (["a", "r8", "r2"], [0.6, 0.5, -0.7], "cat", {}),
    (["a", "r8", "r2"], [0.6, 0.5, -0.7], "svd", {"svd_rank": 5}),
    (["a", "r8", "r2"], [0.6, 0.5, 0.7], "ties_svd", {"density": 0.5}),
    (["a", "r8", "r2"], [0.6, -0.5, 0.7], "ties_svd", {"density": 0.4, "majority_sign": "frequency"}),
    (["a", "r8", "r2"], [0.6, 0.5, 0.7], "magnitude_prune_svd", {"density": 0.3, "svd_rank": 6}),
    (["r8", "r2"], [0.6, 0.5], "dare_linear_svd", {"density": 1.0}),
    (["r8", "pat"], [0.6, 0.5], "svd", {}),
    (["a", "pat"], [0.6, 0.5], "cat", {}),
    # rsLoRA parents (scaling alpha / sqrt(r)); not first: PEFT's merge takes use_rslora from the first parent
    (["a", "rs"], [0.6, -0.5], "svd", {"svd_rank": 6}),
    (["a", "rs8", "rs"], [0.6, 0.5, 0.7], "ties_svd", {"density": 0.5}),
    (["a", "rs8"], [0.6, -0.8], "cat", {}),
]


def _peft_kwargs(extra: dict) -> dict:
    return {{"majority_sign": "majority_sign_method"}.get(k, k): v for k, v in extra.items()}


# the full-delta SVD cases take seconds each: slow
@pytest.mark.parametrize("parents,weights,method,extra",
                         CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SVD_CASES])
def test_lora_merge_equals_peft(loras, parents, weights, method, extra):
    adapters = [read_adapter(loras[p]) for p in parents]
    merged = merge(adapters, MergeSpec(method, tuple(weights), **extra))
    theirs = peft_merged_deltas([loras[p] for p in parents], weights, combination_type=method,
                                **_peft_kwargs(extra))
    assert_deltas_equal(our_deltas(merged), theirs)


@pytest.mark.parametrize("parents,method,extra", [("abc", "cat", {}), (["a", "r8", "r2"], "ties_svd", {"density": 0.5}),
                                                  (["a", "pat"], "cat", {}), ("abc", "ties", {"density": 0.5})])
def test_merged_lora_loads_back_into_peft(loras, tmp_path, parents, method, extra):
    """The merged config (r, lora_alpha, rank/alpha patterns, target_modules) is a valid PEFT LoraConfig."""
    merged = merge([read_adapter(loras[p]) for p in parents], MergeSpec(method, (0.5, -0.7, 0.9)[:len(parents)], **extra))
    folder = write_adapter(merged, tmp_path / "merged")
    model = PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name="m")
    assert_deltas_equal(our_deltas(merged), _peft_deltas(model, "m"))
    assert read_adapter(folder).technique is Technique.LORA


def test_merged_lora_config(loras):
    merged = merge([read_adapter(loras[p]) for p in ("a", "r8", "r2")], MergeSpec("cat", (1.0, 1.0, 1.0)))
    assert merged.config["r"] == merged.config["lora_alpha"] == 14 and not merged.config["use_rslora"]
    mlp = "model.layers.0.mlp.up_proj"  # r2 does not touch the MLP: rank 4 + 8 there
    assert merged.config["rank_pattern"][mlp] == merged.config["alpha_pattern"][mlp] == 12
    assert lora_modules(merged)[mlp].rank == 12 and lora_modules(merged)["model.layers.0.self_attn.q_proj"].rank == 14


def test_cat_is_exact_for_rslora(loras):
    """cat is the exact weighted sum of the parents' deltas as PEFT computes them, also with an rsLoRA parent
    first (PEFT's own merge keeps use_rslora then and would rescale by sqrt(r); ours has scaling 1)."""
    deltas = [_peft_deltas(PeftModel.from_pretrained(tiny_llama(), str(loras[p]), adapter_name="p"), "p")
              for p in ("rs", "a")]
    merged = our_deltas(merge([read_adapter(loras[p]) for p in ("rs", "a")], MergeSpec("cat", (0.3, -1.2))))
    expected = {path: 0.3 * deltas[0].get(path, 0) + -1.2 * deltas[1][path] for path in deltas[1]}  # a: + embed_tokens
    assert set(deltas[0]) < set(deltas[1])
    assert_deltas_equal(merged, expected)


# ---------------------------------------------------------------------------------------------- DARE

def test_dare_keeps_density_fraction_and_rescales():
    t = torch.randn(400, 250, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(7)
    out = combine([t], torch.tensor([1.0]), MergeSpec("dare_linear", density=0.3), gen)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 100k Bernoulli(0.3) draws: sd 0.0014
    torch.testing.assert_close(out[kept], t[kept] / 0.3)


def test_dare_preserves_expectation():
    """Mean over many seeds of the pruned-and-rescaled merge tends to the unpruned weighted sum."""
    g = torch.Generator().manual_seed(0)
    t = [torch.rand(40, 30, generator=g) + 0.5, torch.rand(40, 30, generator=g) - 1.0]
    w = torch.tensor([0.6, 0.9])
    full = w[0] * t[0] + w[1] * t[1]
    n = 400
    spec = MergeSpec("dare_linear", density=0.5)
    mean = sum(combine(t, w, spec, torch.Generator().manual_seed(s)) for s in range(n)) / n
    diff = (mean - full).abs()
    # per entry the estimate's sd is at most sqrt(sum (w t)^2 (1 - p) / p / n) ~ 0.07: allow ~4 sd at the
    # worst of 1200 entries, and the mean error (~0.8 sd) must be far smaller still
    assert diff.max() < 0.3 and diff.mean() < 0.08
    assert (mean - full).mean().abs() < 0.01  # unbiased: errors of both signs cancel over the entries


def test_dare_same_seed_same_result(loras):
    adapters = [read_adapter(loras[p]) for p in "ab"]
    spec = MergeSpec("dare_ties", (0.5, 0.5), density=0.4, seed=11)
    one, two = merge(adapters, spec), merge(adapters, spec)
    other = merge(adapters, MergeSpec("dare_ties", (0.5, 0.5), density=0.4, seed=12))
    assert one.tensors.keys() == two.tensors.keys()
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    assert any(not torch.equal(one.tensors[k], other.tensors[k]) for k in one.tensors)
    state = torch.random.get_rng_state()
    merge(adapters, MergeSpec("dare_linear_svd", (0.5, 0.5), density=0.4))
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG state touched


def test_dare_merge_kept_fraction(loras):
    """In a merged adapter, DARE keeps about `density` of a parent's factor entries."""
    a = read_adapter(loras["a"])
    merged = merge([a, a], MergeSpec("dare_linear", (1.0, 0.0), density=0.25, seed=3))  # only the first counts
    kept = [(t != 0).float() for t in merged.tensors.values()]
    fraction = sum(k.sum() for k in kept) / sum(k.numel() for k in kept)
    assert abs(fraction - 0.25) < 0.02, fraction  # ~15k Bernoulli draws: sd 0.004


# ------------------------------------------------------------------------------------ other techniques

def test_ia3_weighted_sum_equals_peft(tmp_path):
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    folders = [peft_adapter(tmp_path / f"i{i}", IA3Config(**cfg), seed=i) for i in range(2)]
    folders.append(peft_adapter(tmp_path / "i2", IA3Config(target_modules=["k_proj"], feedforward_modules=[]), seed=5))
    weights = [0.5, 0.8, -0.3]
    merged = merge([read_adapter(f) for f in folders], MergeSpec("linear", tuple(weights)))
    model = PeftModel.from_pretrained(tiny_llama(), str(folders[0]), adapter_name="p0")
    for i, f in enumerate(folders[1:], 1):
        model.load_adapter(str(f), adapter_name=f"p{i}")
    model.add_weighted_adapter(["p0", "p1", "p2"], weights, "m")
    theirs = {n.removesuffix(".m"): p.detach() for n, p in model.named_parameters() if n.endswith("ia3_l.m")}
    assert sorted(theirs) == sorted(merged.tensors)
    for key, value in merged.tensors.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=0)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(write_adapter(merged, tmp_path / "m")))  # a valid IA3Config
    assert sorted(loaded.peft_config["default"].feedforward_modules) == ["model.layers.0.mlp.down_proj",
                                                                         "model.layers.1.mlp.down_proj"]


def own_adapter(technique: str, tensors: dict[str, torch.Tensor], **config) -> Adapter:
    return Adapter(Technique(technique), {"adapter_type": technique, **config}, tensors)


def test_bitfit_weighted_sum():
    x = {"model.layers.0.self_attn.q_proj.bias": torch.randn(64), "model.layers.1.mlp.up_proj.bias": torch.randn(128)}
    y = {"model.layers.0.self_attn.q_proj.bias": torch.randn(64), "model.layers.0.mlp.down_proj.bias": torch.randn(64)}
    a = own_adapter("bitfit", x, target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    b = own_adapter("bitfit", y, target_modules=["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    merged = merge([a, b], MergeSpec("linear", (2.0, -0.5)))
    q = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(merged.tensors[q], 2.0 * x[q] - 0.5 * y[q])
    torch.testing.assert_close(merged.tensors["model.layers.1.mlp.up_proj.bias"], 2.0 * x["model.layers.1.mlp.up_proj.bias"])
    torch.testing.assert_close(merged.tensors["model.layers.0.mlp.down_proj.bias"],
                               -0.5 * y["model.layers.0.mlp.down_proj.bias"])
    assert merged.config["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                               "model.layers.1.mlp.up_proj"]


def bottleneck(seed: int, size: int = 16, **config) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    keys = {"down.weight": (size, 64), "down.bias": (size,), "up.weight": (64, size), "up.bias": (64,)}
    tensors = {f"model.layers.{i}.ffn_adapter.{k}": torch.randn(*s, generator=g) for i in (0, 1) for k, s in keys.items()}
    return own_adapter("bottleneck", tensors, **{"locations": ["ffn"], "bottleneck_size": size, "hidden_size": 64,
                                                 "non_linearity": "relu", **config})


def test_bottleneck_weighted_average_normalises_weights():
    parents = [bottleneck(1), bottleneck(2, source={"imported_from": "x"}), bottleneck(3)]
    weights = (-1.0, 1.2, 0.8)  # AdapterHub's documented example; sum 1
    merged = merge(parents, MergeSpec("linear", weights))
    for key in parents[0].tensors:
        torch.testing.assert_close(merged.tensors[key], sum(w * p.tensors[key] for w, p in zip(weights, parents)))
    halves = merge(parents[:2], MergeSpec("linear", (1.0, 3.0)))  # normalised to 0.25 / 0.75
    key = "model.layers.1.ffn_adapter.up.weight"
    torch.testing.assert_close(halves.tensors[key], 0.25 * parents[0].tensors[key] + 0.75 * parents[1].tensors[key])


def test_prompt_tuning_concatenates(tmp_path):
    folders = [peft_adapter(tmp_path / f"p{n}", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), n)
               for n in (3, 5)]
    parents = [read_adapter(f) for f in folders]
    merged = merge(parents, MergeSpec("cat"))
    emb = merged.tensors["prompt_embeddings"]
    assert emb.shape == (8, 64) and merged.config["num_virtual_tokens"] == 8
    torch.testing.assert_close(emb, torch.cat([p.tensors["prompt_embeddings"] for p in parents]))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(write_adapter(merged, tmp_path / "m")))
    torch.testing.assert_close(loaded.prompt_encoder["default"].embedding.weight.detach(), emb)


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("spec,message", [
    (MergeSpec("ties", (1.0, 1.0)), "needs a density"),
    (MergeSpec("ties", (1.0, 1.0), density=0.0), "needs a density"),
    (MergeSpec("dare_linear", (1.0, 1.0), density=1.5), "needs a density"),
    (MergeSpec("linear", (1.0, 1.0), density=0.5), "density does not apply"),
    (MergeSpec("linear", (1.0, 1.0), seed=3), "seed does not apply"),
    (MergeSpec("ties", (1.0, 1.0), density=0.5, svd_rank=4), "svd_rank does not apply"),
    (MergeSpec("dare_linear", (1.0, 1.0), density=0.5, majority_sign="total"), "majority_sign does not apply"),
    (MergeSpec("ties", (1.0, 1.0), density=0.5, majority_sign="mean"), "majority sign must be"),
    (MergeSpec("linear", (1.0,)), "1 weights given for 2 adapters"),
    (MergeSpec("linear", (1.0, float("nan"))), "finite"),
    (MergeSpec("average", (1.0, 1.0)), "does not apply to lora"),
    (MergeSpec("svd", (1.0, 1.0), svd_rank=65), "exceeds module"),
])
def test_refuses_bad_parameters(loras, spec, message):
    with pytest.raises(MergeError, match=message):
        merge([read_adapter(loras["a"]), read_adapter(loras["b"])], spec)


def test_refuses_different_ranks_for_per_factor_methods(loras):
    with pytest.raises(MergeError, match="one rank"):
        merge([read_adapter(loras["a"]), read_adapter(loras["r8"])], MergeSpec("ties", density=0.5))


def test_refuses_different_bases_and_techniques(loras, tmp_path):
    a = read_adapter(loras["a"])
    with pytest.raises(MergeError, match="different base models"):
        check_same_base({"a@1.0.0": "f" * 64, "b@1.0.0": "f" * 64, "c@1.0.0": "e" * 64})
    check_same_base({"a@1.0.0": "f" * 64, "b@1.0.0": "f" * 64, "c@1.0.0": None})  # no base recorded: any
    # the same base is the same fingerprint: the id strings in the configs are no test of it
    merge([Adapter(a.technique, {**a.config, "base_model_name_or_path": name, "revision": name}, a.tensors)
           for name in ("/home/me/.cache/hub/bases/tiny", "org/tiny")], MergeSpec("linear"))
    with pytest.raises(MergeError, match="different task_type"):
        merge([Adapter(a.technique, {**a.config, "task_type": t}, a.tensors) for t in ("CAUSAL_LM", "SEQ_CLS")],
              MergeSpec("linear"))
    merge([a, Adapter(a.technique, {**a.config, "task_type": "CAUSAL_LM"}, a.tensors)], MergeSpec("linear"))  # one unset
    with pytest.raises(MergeError, match="different techniques"):
        merge([a, bottleneck(1)], MergeSpec("linear"))
    with pytest.raises(MergeError, match="nothing to merge"):
        merge([], MergeSpec("linear"))


def test_refuses_incompatible_shapes(tmp_path):
    with pytest.raises(MergeError, match="share one configuration"):
        merge([bottleneck(1), bottleneck(2, size=8)], MergeSpec("linear"))
    with pytest.raises(MergeError, match="sum, which is 0"):
        merge([bottleneck(1), bottleneck(2)], MergeSpec("linear", (1.0, -1.0)))
    ff = peft_adapter(tmp_path / "ff", IA3Config(target_modules=["o_proj"], feedforward_modules=["o_proj"]), 1)
    attn = peft_adapter(tmp_path / "at", IA3Config(target_modules=["o_proj"], feedforward_modules=[]), 2)
    with pytest.raises(MergeError, match="feed-forward in some"):
        merge([read_adapter(ff), read_adapter(attn)], MergeSpec("linear"))
    p = Adapter(Technique.PROMPT_TUNING, {"peft_type": "PROMPT_TUNING", "token_dim": 64},
                {"prompt_embeddings": torch.zeros(2, 64)})
    with pytest.raises(MergeError, match="weights must all be 1"):
        merge([p, p], MergeSpec("cat", (1.0, 0.5)))
    with pytest.raises(MergeError, match="differ in token_dim"):
        merge([p, Adapter(p.technique, {**p.config, "token_dim": 32}, {"prompt_embeddings": torch.zeros(2, 32)})],
              MergeSpec("cat"))


def test_refuses_lora_bias(tmp_path):
    a = read_adapter(lora(tmp_path / "lb", 1, targets=["q_proj"], lora_bias=True))
    with pytest.raises(MergeError, match="lora_bias"):
        merge([a, a], MergeSpec("linear"))
