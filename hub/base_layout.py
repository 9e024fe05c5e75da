"""A base model's module shapes read from its config.json alone, for the model types hub/architectures.py lists
(CONFIG_LAYOUTS): what a push checks an adapter's fit against without importing torch and transformers, whose
meta model gives the same shapes after seconds of imports.

The layout answers only for what it knows: the linear projections, the decoder layers and the input
embeddings. A module it does not list (a norm, a misspelt path) raises `Unmapped`, and the caller asks
transformers' meta model, so every error names the module's class exactly as before."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.architectures import CONFIG_LAYOUTS

CONFIG_FILE = "config.json"
# The fields the shapes are computed from; a config without one of them is left to transformers (its defaults
# differ between model types).
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size")


class Unmapped(LookupError):
    """The layout does not list this module: transformers' meta model must answer."""


@dataclass(frozen=True)
class Module:
    """What a fit check reads of one module: its class name, (in_features, out_features) when it is a linear
    layer (else None), and its weight's shape."""

    kind: str
    dims: tuple[int, int] | None = None
    weight_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ConfigLayout:
    """A base's modules as its config.json gives them; `config` is that JSON (what hub.checkpoint.fingerprint
    reads: the same fields transformers' config holds for these model types)."""

    config: dict[str, Any]
    hidden: int
    embedding: tuple[str, tuple[int, int]]  # (module path, weight shape)
    linears: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    layers: frozenset[str]
    layer_kind: str

    def module(self, path: str) -> Module:
        if path in self.linears:
            d_in, d_out = self.linears[path]
            return Module("Linear", (d_in, d_out), (d_out, d_in))
        if path in self.layers:
            return Module(self.layer_kind)
        raise Unmapped(path)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def layout(config: dict[str, Any]) -> ConfigLayout | None:
    """The layout a config.json describes; None for a model type not listed or a config lacking a field."""
    kind = CONFIG_LAYOUTS.get(config.get("model_type"))
    head_dim = config.get("head_dim")
    if kind is None or not all(_positive(config.get(f)) for f in _FIELDS) or not (
            head_dim is None or _positive(head_dim)):
        return None
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = head_dim or hidden // config["num_attention_heads"]  # transformers' default for these types
    heads, kv_heads = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    linears = {"lm_head": (hidden, config["vocab_size"])}
    layers = set()
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        layers.add(layer)
        linears.update({f"{layer}.self_attn.q_proj": (hidden, heads), f"{layer}.self_attn.k_proj": (hidden, kv_heads),
                        f"{layer}.self_attn.v_proj": (hidden, kv_heads), f"{layer}.self_attn.o_proj": (heads, hidden),
                        f"{layer}.mlp.gate_proj": (hidden, inner), f"{layer}.mlp.up_proj": (hidden, inner),
                        f"{layer}.mlp.down_proj": (inner, hidden)})
    return ConfigLayout(config, hidden, ("model.embed_tokens", (config["vocab_size"], hidden)), linears,
                        frozenset(layers), kind)


def read(path: str | Path) -> ConfigLayout | None:
    """The layout of the base model in a folder (or of a config.json file); None when the file is absent,
    unreadable or not a JSON object, or `layout` gives none."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE if path.is_dir() else path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return layout(config) if isinstance(config, dict) else None


def cached(repo_id: str) -> ConfigLayout | None:
    """The layout of an HF hub id from the local HF cache (nothing is downloaded); None when not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CONFIG_FILE)
    except ValueError:  # not a valid repo id
        return None
    return read(found) if isinstance(found, str) else None
