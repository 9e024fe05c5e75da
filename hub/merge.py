"""Merging several adapters into one new adapter: pure tensor math on `Adapter` objects (no registry, no I/O).

LoRA follows PEFT's `LoraModel.add_weighted_adapter` (peft 0.21) operation for operation, so a merge made
here equals the one PEFT makes from the same adapters:
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A and B matrices separately
  (weights sqrt(|w * scaling|) on both, the sign on A only); all adapters need the same rank in a module.
- `cat` concatenates the weighted, scaled A's and the B's: exact, rank = sum of ranks.
- `svd` and the `*_svd` forms combine the full deltas B @ A * scaling (so ranks may differ) and factor the
  result back to rank `svd_rank` (default: the largest parent rank) with a truncated SVD, optionally clamped.
- With one adapter every method is `linear`, as in PEFT (weight -1 negates a task).
The merged LoRA has scaling 1 (lora_alpha = r), and targets exactly the modules that carry tensors.

IA3 and BitFit are weighted sums (IA3 as PEFT's `IA3Model.add_weighted_adapter`); bottleneck adapters of the
same configuration are averaged parameter by parameter with weights normalised to sum 1 (AdapterHub's
`average_adapter`); soft prompts are concatenated.

Randomness (DARE) comes from a local generator seeded by `MergeSpec.seed`: the same seed gives the same
adapter, and no global RNG state is touched.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch

from hub.bottleneck_format import BottleneckConfig
from hub.artifact import Adapter, Technique
from hub.checkpoint import PEFT_PREFIX, lora_rank_alpha, module_tensors
from hub.merge_spec import CheckedMergeSpec, MergeError, MergeSpec, method_family, uses_density, uses_svd


def combine(tensors: Sequence[torch.Tensor], weights: torch.Tensor, spec: CheckedMergeSpec,
            generator: torch.Generator | None) -> torch.Tensor:
    """Combine task tensors of one shape by the spec's method family (PEFT's merge_utils, step by step).

    The one place where linear / ties / dare_linear / dare_ties / magnitude_prune differ: prune
    (top-k magnitude, or a seeded Bernoulli mask rescaled by 1/density), weight, then sum or, for
    the TIES forms, keep the entries agreeing with the elected sign and average them.
    """
    # peft is imported here, not at module level: it loads only when a merge runs.
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, reshape_weight_task_tensors
    family = method_family(spec.method)
    density = spec.density
    if uses_density(spec.method):
        assert density is not None, "checked() requires a density for this method"
        if family in ("ties", "magnitude_prune"):
            tensors = [prune(t, density, method="magnitude") for t in tensors]
        elif density < 1.0:  # the dare forms
            tensors = [t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density
                       for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    weighted = stacked * reshape_weight_task_tensors(stacked, weights)
    if family in ("ties", "dare_ties"):
        # checked() fills in "total" and refuses signs other than MAJORITY_SIGNS for these methods
        sign = cast(Literal["total", "frequency"], spec.majority_sign)
        return disjoint_merge(weighted, calculate_majority_sign_mask(stacked, method=sign))
    return weighted.sum(dim=0)


def merge(adapters: Sequence[Adapter], spec: MergeSpec) -> Adapter:
    """Merge adapters of one technique made for one base model into a new Adapter.

    The base is not compared here: the ids in the adapters' configs are no test of it (a local folder and a
    hub id name one base). The callers check it by architecture fingerprint: `hub merge` with
    `check_same_base`, the runtime by checking each parent against the served base's fingerprint.
    """
    if not adapters:
        raise MergeError("nothing to merge: give at least one adapter")
    techniques = sorted({a.technique.value for a in adapters})
    if len(techniques) > 1:
        raise MergeError(f"cannot merge adapters of different techniques: {', '.join(techniques)}")
    _check_compatible(adapters)
    technique = adapters[0].technique
    spec = spec.checked(technique, len(adapters))
    if technique is Technique.LORA:
        return _merge_lora(adapters, spec)
    if technique is Technique.PROMPT_TUNING:
        return _merge_prompts(adapters, spec)
    if technique is Technique.BOTTLENECK:
        return _merge_bottleneck(adapters, spec)
    return _merge_sum(adapters, spec)


def check_same_base(bases: Mapping[str, str | None]) -> None:
    """Refuse parents made for different base models. `bases`: each parent's ref -> what identifies its base:
    the base's architecture fingerprint (hub.basemodel.architecture_fingerprint, what the runtime compares),
    or its recorded id where the base is not at hand; None (no base recorded) matches any."""
    known = {key: ref for ref, key in bases.items() if key}
    if len(known) > 1:
        raise MergeError(f"adapters were made for different base models ({', '.join(sorted(known.values()))} "
                         "have different architecture fingerprints)")


def _check_compatible(adapters: Sequence[Adapter]) -> None:
    task_types = {t for a in adapters if (t := a.config.get("task_type")) is not None}
    if len(task_types) > 1:
        raise MergeError(f"cannot merge adapters with different task_type: {', '.join(sorted(task_types))}")
    if len({bool(a.config.get("fan_in_fan_out")) for a in adapters}) > 1:
        raise MergeError("cannot merge adapters with different fan_in_fan_out (weight layouts differ)")


def _dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The parents' common dtype; float32 when they differ (all arithmetic is done in float32)."""
    dtypes = {t.dtype for a in adapters for t in a.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


# ---------------------------------------------------------------------------------------------- LoRA

@dataclass(frozen=True)
class LoraModule:
    """One base module's LoRA factors in one adapter, with the scaling PEFT applies to B @ A."""

    a: torch.Tensor  # (r, in); for embeddings (r, num_embeddings)
    b: torch.Tensor  # (out, r); for embeddings (embedding_dim, r)
    scaling: float
    embedding: bool
    bias: torch.Tensor | None = None  # PEFT's lora_bias (out,): added as bias * scaling

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """B @ A * scaling in float32, in the (B rows, A columns) layout (PEFT transposes it for embeddings)."""
        return (self.b.float() @ self.a.float()) * self.scaling


def lora_modules(adapter: Adapter) -> dict[str, LoraModule]:
    """Base-module path (as in `model.named_modules()`) -> its LoRA factors and scaling.

    Scaling is lora_alpha / r (or / sqrt(r) with use_rslora), with `rank_pattern` / `alpha_pattern`
    resolved per module exactly as PEFT does (`get_pattern_key`).
    """
    config = adapter.config
    modules = {}
    for name, parts in sorted(module_tensors(adapter).items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding \
            else (parts.get("lora_A"), parts.get("lora_B"))
        if a is None or b is None:
            raise MergeError(f"LoRA module {name!r} lacks its {'lora_B' if b is None else 'lora_A'} tensor")
        r, alpha = lora_rank_alpha(config, name)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[name] = LoraModule(a, b, scaling, embedding, parts.get("lora_bias"))
    return modules


def _config_rank(config: dict[str, Any]) -> int:
    """The largest rank a LoRA config allows anywhere (PEFT's rank for sizing merged adapters)."""
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def _merge_lora(adapters: Sequence[Adapter], spec: CheckedMergeSpec) -> Adapter:
    if len(adapters) == 1:  # PEFT merges a single adapter linearly, whatever the method
        spec = replace(spec, method="linear")
    method = spec.method
    parents = [lora_modules(a) for a in adapters]
    if any(m.bias is not None for p in parents for m in p.values()):
        raise MergeError("LoRA adapters with lora_bias cannot be merged (PEFT's merge methods do not combine it)")
    ranks = [_config_rank(a.config) for a in adapters]
    if method == "cat":
        new_rank = sum(ranks)
    elif uses_svd(method):
        new_rank = spec.svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise MergeError(f"method {method!r} needs adapters of one rank (ranks: {ranks}); "
                         "use cat, svd or a *_svd method")
    else:
        new_rank = ranks[0]
    generator = torch.Generator().manual_seed(spec.seed) if spec.seed is not None else None
    dtype = _dtype(adapters)
    tensors: dict[str, torch.Tensor] = {}
    module_ranks: dict[str, int] = {}
    for name in sorted(set().union(*parents)):
        present = [(w, p[name]) for w, p in zip(spec.weights, parents) if name in p]
        if len({m.embedding for _, m in present}) > 1:
            raise MergeError(f"module {name!r} is an embedding in some adapters and not in others")
        a, b = _merge_module(name, present, spec, new_rank, generator)
        suffix_a, suffix_b = ("lora_embedding_A", "lora_embedding_B") if present[0][1].embedding \
            else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{name}.{suffix_a}"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.{suffix_b}"] = b.to(dtype).contiguous()
        module_ranks[name] = a.shape[0]
    odd = {name: r for name, r in module_ranks.items() if r != new_rank}
    config = dict(adapters[0].config)
    config.update(
        r=new_rank, lora_alpha=new_rank, rank_pattern=odd, alpha_pattern=dict(odd), use_rslora=False,
        target_modules=sorted(module_ranks), layers_to_transform=None, layers_pattern=None,
        exclude_modules=None, init_lora_weights=True, inference_mode=True,
    )
    return Adapter(Technique.LORA, config, tensors)


def _merge_module(name: str, present: list[tuple[float, LoraModule]], spec: CheckedMergeSpec, new_rank: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged (A, B), in float32."""
    if spec.method == "cat":
        a = torch.cat([m.a.float() * w * m.scaling for w, m in present], dim=0)
        return a, torch.cat([m.b.float() for _, m in present], dim=1)
    if uses_svd(spec.method):
        delta = combine([m.delta() for _, m in present], torch.tensor([w for w, _ in present]), spec, generator)
        if new_rank > min(delta.shape):
            raise MergeError(f"svd rank {new_rank} exceeds module {name!r}'s smaller dimension {min(delta.shape)}")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, vh = u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank, :]
        if spec.svd_clamp is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), spec.svd_clamp)
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        return vh, u
    if len({m.rank for _, m in present}) > 1:
        raise MergeError(f"module {name!r} has different ranks across adapters "
                         f"({[m.rank for _, m in present]}); use cat, svd or a *_svd method")
    scaled = [w * m.scaling for w, m in present]
    weights_b = [math.sqrt(abs(x)) for x in scaled]
    weights_a = [wb if x >= 0 else -wb for wb, x in zip(weights_b, scaled)]  # the sign on A only
    a = combine([m.a.float() for _, m in present], torch.tensor(weights_a), spec, generator)
    b = combine([m.b.float() for _, m in present], torch.tensor(weights_b), spec, generator)
    return a, b


# ------------------------------------------------------------------------------------ other techniques

def _merge_sum(adapters: Sequence[Adapter], spec: CheckedMergeSpec) -> Adapter:
    """IA3 / BitFit: sum_i w_i * tensor_i per key over the adapters that have it (PEFT's IA3 merge)."""
    dtype = _dtype(adapters)
    tensors: dict[str, torch.Tensor] = {}
    technique = adapters[0].technique
    for adapter in adapters:
        module_tensors(adapter)  # refuses keys that are not this technique's
    for key in sorted(set().union(*(a.tensors for a in adapters))):
        present = [(w, a.tensors[key]) for w, a in zip(spec.weights, adapters) if key in a.tensors]
        shapes = {tuple(t.shape) for _, t in present}
        if len(shapes) > 1:
            raise MergeError(f"tensor {key!r} has different shapes across adapters ({sorted(shapes)})"
                             + (" (feed-forward in some, attention in others)" if key.endswith("ia3_l") else ""))
        tensors[key] = sum(w * t.float() for w, t in present).to(dtype)
    config = dict(adapters[0].config)
    if technique is Technique.IA3:
        vectors = {path: parts["ia3_l"] for path, parts in module_tensors(Adapter(technique, config, tensors)).items()}
        # (1, in) vectors scale a feed-forward module's input; (out, 1) an attention module's output.
        feedforward = sorted(m for m, t in vectors.items() if t.shape[0] == 1)
        config.update(target_modules=sorted(vectors), feedforward_modules=feedforward, inference_mode=True,
                      layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    elif technique is Technique.BITFIT:
        config["target_modules"] = sorted({m for a in adapters for m in a.config.get("target_modules", [])})
    return Adapter(technique, config, tensors)


def _merge_bottleneck(adapters: Sequence[Adapter], spec: CheckedMergeSpec) -> Adapter:
    """Weighted parameter average of same-shape bottleneck adapters, weights normalised to sum 1.

    Configurations must agree on everything but `source` (where an imported adapter came from, which
    the merge no longer is).
    """
    configs = [replace(BottleneckConfig.from_dict(a.config), source={}) for a in adapters]
    shapes = [{k: tuple(t.shape) for k, t in a.tensors.items()} for a in adapters]
    if any(c != configs[0] for c in configs) or any(s != shapes[0] for s in shapes):
        raise MergeError("bottleneck adapters can only be averaged when they share one configuration "
                         "and tensor shapes")
    total = sum(spec.weights)
    if abs(total) < 1e-12:
        raise MergeError(f"bottleneck weights are normalised by their sum, which is 0 ({list(spec.weights)})")
    merged = _merge_sum(adapters, replace(spec, weights=tuple(w / total for w in spec.weights)))
    return Adapter(Technique.BOTTLENECK, configs[0].to_dict(), merged.tensors)


def _merge_prompts(adapters: Sequence[Adapter], spec: CheckedMergeSpec) -> Adapter:
    """Concatenate soft prompts along the virtual tokens (per transformer submodule)."""
    if any(w != 1.0 for w in spec.weights):
        raise MergeError(f"soft prompts are concatenated, not weighted: weights must all be 1 (got {list(spec.weights)})")
    fields = ("token_dim", "num_transformer_submodules")
    for field in fields:
        values = {a.config.get(field) for a in adapters}
        if len(values) > 1:
            raise MergeError(f"prompt tuning adapters differ in {field} ({sorted(map(str, values))})")
    subs = int(adapters[0].config.get("num_transformer_submodules") or 1)
    prompts = []
    for a in adapters:
        if set(a.tensors) != {"prompt_embeddings"}:
            raise MergeError(f"a prompt tuning adapter holds one tensor 'prompt_embeddings', got {sorted(a.tensors)}")
        p = a.tensors["prompt_embeddings"]
        prompts.append(p.float().reshape(subs, -1, p.shape[-1]))
    merged = torch.cat(prompts, dim=1)
    config = dict(adapters[0].config)
    config.update(num_virtual_tokens=merged.shape[1], prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                  inference_mode=True)
    return Adapter(Technique.PROMPT_TUNING, config,
                   {"prompt_embeddings": merged.reshape(-1, merged.shape[-1]).to(_dtype(adapters)).contiguous()})
