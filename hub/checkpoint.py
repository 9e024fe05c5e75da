"""Checkpoint parsing: which base-model modules an adapter touches, and whether it fits the base.

Adapters name base modules by path (PEFT prefixes `base_model.model.`); this maps every tensor key
to the module path exactly as `model.named_modules()` spells it, so the runtime and the registry
agree on what an adapter touches. An adapter that does not fit is refused here, naming the module,
because serving it anyway would silently return the base model's output (vLLM issues 34186, 55193).
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable, cast

from hub import patterns
from hub.artifact import Adapter, ArtifactError, Technique
from hub.base_layout import ConfigLayout, Module
from hub.weakmemo import per_object

if TYPE_CHECKING:  # torch is imported where a model is at hand: checks against a config.json never need it
    import torch
    from torch import nn
    from transformers import PreTrainedConfig, PreTrainedModel

PEFT_PREFIX = "base_model.model."
PROMPT_SITE = ""  # prompt tuning touches no module; its tensors live under the empty path

# technique -> tensor-key suffix -> the name module_tensors gives it
_SUFFIXES: dict[Technique, dict[str, str]] = {
    Technique.LORA: {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_B.bias": "lora_bias",
                     ".lora_embedding_A": "lora_embedding_A", ".lora_embedding_B": "lora_embedding_B"},
    Technique.IA3: {".ia3_l": "ia3_l"},
    Technique.BITFIT: {".bias": "bias"},
}


def _split(technique: Technique, key: str) -> tuple[str, str]:
    """(module path, tensor name) for one tensor key."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    if technique is Technique.PROMPT_TUNING:
        return PROMPT_SITE, key
    if technique is Technique.BOTTLENECK:
        # model.layers.<i>.<location>_adapter.<down|up>.<weight|bias>: the site is the decoder layer
        head, sep, tail = key.partition("_adapter.")
        if not sep or "." not in head:
            raise ArtifactError(f"bottleneck tensor key {key!r} is not <layer path>.<location>_adapter.<...>")
        layer, location = head.rsplit(".", 1)
        return layer, f"{location}_adapter.{tail}"
    for suffix, name in _SUFFIXES[technique].items():
        if key.endswith(suffix):
            return key[: -len(suffix)], name
    raise ArtifactError(f"{technique.value} adapter: unexpected tensor key {key!r}")


def module_tensors(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Base-module path -> that module's named tensors (docs/registry.md, Artifacts, lists them per technique)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        module, name = _split(adapter.technique, key)
        out.setdefault(module, {})[name] = tensor
    return out


def _as_model(model_or_config: Any) -> nn.Module:
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config)


class _ModelModules:
    """A model's modules as `check_fits` reads them (the shape of hub.base_layout.ConfigLayout). Made once per
    model (`_modules_of`): a server checks every adapter it loads against one frozen base, and walking its
    modules each time was a large part of a load. Wrapping a module later (the runtime's and PEFT's wrappers)
    keeps the base layer and its shape, which is all this reads."""

    def __init__(self, model: nn.Module):
        self.model_name = type(model).__name__
        self._modules = dict(model.named_modules())
        self._embeddings = cast("PreTrainedModel", model).get_input_embeddings()
        self._shape: tuple[int, ...] = tuple(cast("torch.Tensor", self._embeddings.weight).shape)
        self.hidden = self._shape[1]
        self._read: dict[str, Module | None] = {}


    @property
    def embedding(self) -> tuple[str, tuple[int, ...]]:
        name = next(n for n, m in self._modules.items() if m is self._embeddings)
        return name, self._shape

    def module(self, path: str) -> Module | None:
        if path not in self._read:
            self._read[path] = self._describe(path)
        return self._read[path]

    def _describe(self, path: str) -> Module | None:
        module = self._modules.get(path)
        module = getattr(module, "base_layer", module)  # the runtime's (and PEFT's) wrappers keep the base here
        if module is None:
            return None
        dims = linear_shape(module)
        return Module(type(module).__name__, dims, None if dims is None else tuple(module.weight.shape))


_modules_of: Callable[[nn.Module], _ModelModules] = per_object(_ModelModules)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored (in, out)); else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        fan_in, fan_out = weight.shape
        return int(fan_in), int(fan_out)
    return None


def _check_linear(path: str, module: Module, tensors: dict[str, torch.Tensor], technique: Technique,
                  feedforward: bool) -> None:
    if module.dims is None:
        raise ArtifactError(f"module {path!r} is a {module.kind}, not a linear layer: "
                            f"{technique.value} on it is not served")
    d_in, d_out = module.dims

    def need(name: str, ok: bool, want: str) -> None:
        if not ok:
            shape = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ArtifactError(f"module {path!r} ({d_in} -> {d_out}): {name} has shape {shape}, expected {want}")

    if technique is Technique.LORA:
        need("lora_A", "lora_A" in tensors and tensors["lora_A"].dim() == 2 and tensors["lora_A"].shape[1] == d_in,
             f"(r, {d_in})")
        r = tensors["lora_A"].shape[0]
        need("lora_B", "lora_B" in tensors and tuple(tensors["lora_B"].shape) == (d_out, r), f"({d_out}, {r})")
        if "lora_bias" in tensors:
            need("lora_bias", tensors["lora_bias"].numel() == d_out, f"({d_out},)")
    elif technique is Technique.IA3:
        want = d_in if feedforward else d_out
        need("ia3_l", tensors["ia3_l"].numel() == want, f"{want} values ({'input' if feedforward else 'output'})")
    elif technique is Technique.BITFIT:
        need("bias", tensors["bias"].numel() == d_out, f"({d_out},)")


def is_feedforward(adapter: Adapter, path: str) -> bool:
    """IA3: does this module scale its input (PEFT's `feedforward_modules`) rather than its output?"""
    ff = adapter.config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return patterns.fullmatch(ff, path)  # PEFT's re.fullmatch, without backtracking
    return any(path.endswith(name) for name in ff)  # PEFT's own rule


def lora_rank_alpha(config: dict[str, Any], path: str) -> tuple[int, float]:
    """(rank, alpha) of the LoRA module at `path`: `r`/`lora_alpha`, or the first `rank_pattern`/`alpha_pattern`
    key naming it, picked as PEFT's `get_pattern_key` does (and, as there, a key equal to `path`)."""
    def lookup(table: dict[str, Any] | None, default: Any) -> Any:
        table = table or {}
        key = patterns.pattern_key(table, path)
        return table.get(path if key is None else key, default)

    return (int(lookup(config.get("rank_pattern"), config.get("r", 8))),
            float(lookup(config.get("alpha_pattern"), config.get("lora_alpha", 8))))


# LoRA tensor name -> which axis holds the rank
_RANK_AXIS = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def check_structure(adapter: Adapter, sites: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """What needs no base model: every tensor key names a module, and each LoRA module's tensors have the
    rank its config gives it (else the runtime would refuse it at load, after eviction decisions, or PEFT
    would fail to load it), and that there is something at all: one with no tensors would load as a no-op and
    serve the base model under an adapter's name. `sites`: the adapter's `module_tensors`, where the caller has
    them."""
    if not adapter.tensors:
        raise ArtifactError(f"the {adapter.technique.value} adapter holds no tensors")
    sites = module_tensors(adapter) if sites is None else sites
    if adapter.technique is not Technique.LORA:
        return
    for path, tensors in sorted(sites.items()):
        r, _ = lora_rank_alpha(adapter.config, path)
        for name, axis in _RANK_AXIS.items():
            t = tensors.get(name)
            if t is not None and (t.dim() != 2 or t.shape[axis] != r):
                raise ArtifactError(f"module {path!r}: {name} has shape {tuple(t.shape)}, "
                                    f"but the config gives this module rank {r}")


def check_fits(adapter: Adapter, model_or_config: Any) -> dict[str, tuple[int, ...]]:
    """Refuse (ArtifactError naming the module) an adapter that does not fit; else {module: weight shape}.

    `model_or_config`: a model, a transformers config (built on the meta device), or a ConfigLayout, which
    raises hub.base_layout.Unmapped for a module it does not list."""
    sites = module_tensors(adapter)
    check_structure(adapter, sites)  # again for adapters built in memory (merges, tests), not read through hub.artifact
    base = model_or_config if isinstance(model_or_config, ConfigLayout) else _modules_of(_as_model(model_or_config))
    hidden = base.hidden
    touched: dict[str, tuple[int, ...]] = {}
    for path, tensors in sorted(sites.items()):
        if adapter.technique is Technique.PROMPT_TUNING:
            emb = tensors.get("prompt_embeddings")
            if emb is None or emb.dim() != 2 or emb.shape[1] != hidden:
                shape = None if emb is None else tuple(emb.shape)
                raise ArtifactError(f"prompt_embeddings has shape {shape}, expected (tokens, {hidden})")
            name, shape = base.embedding
            touched[name] = shape
            continue
        module = base.module(path)
        if module is None:
            raise ArtifactError(f"module {path!r} named by the {adapter.technique.value} adapter "
                                f"does not exist in the base model ({base.model_name})")
        if adapter.technique is Technique.BOTTLENECK:
            for name, t in tensors.items():
                if name.endswith("down.weight") and t.shape[-1] != hidden:
                    raise ArtifactError(f"module {path!r}: {name} has shape {tuple(t.shape)}, expected (*, {hidden})")
                if name.endswith("up.weight") and t.shape[0] != hidden:
                    raise ArtifactError(f"module {path!r}: {name} has shape {tuple(t.shape)}, expected ({hidden}, *)")
            touched[path] = (hidden,)
            continue
        _check_linear(path, module, tensors, adapter.technique, is_feedforward(adapter, path))
        assert module.weight_shape is not None  # a linear layer's (what _check_linear just checked)
        touched[path] = module.weight_shape
    return touched


_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner")


def fitted_fingerprint(adapter: Adapter, model_or_config: nn.Module | PreTrainedConfig | ConfigLayout) -> str:
    """The fingerprint of the base the adapter fits, after `check_fits` (its ArtifactError when it does not):
    what a push records and what a load compares with the recorded one."""
    touched = check_fits(adapter, model_or_config)
    return fingerprint(getattr(model_or_config, "config", model_or_config), touched)


def fingerprint(model_config: Any, touched: dict[str, tuple[int, ...]]) -> str:
    """sha256 over the base's architecture-defining config fields and the touched modules' shapes."""
    cfg = model_config if isinstance(model_config, dict) else model_config.to_dict()
    arch = {k: cfg.get(k) for k in _ARCH_FIELDS if cfg.get(k) is not None}
    payload = {"config": arch, "modules": sorted((name, list(shape)) for name, shape in touched.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
