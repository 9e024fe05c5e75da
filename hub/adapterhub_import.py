"""The import of AdapterHub `adapters` library folders into our bottleneck format (hub/bottleneck_format.py).

The `adapters` library's files name modules by its own wrapper layers
(`...attention_adapters.adapters.<name>.adapter_down.0.weight`) and need that library (and transformers
4.x) to be read back; the import maps its config and tensor keys onto ours. Options that change the
math in ways we do not implement are refused here, by name, so no weight is ever silently dropped.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hub.architectures import BOTTLENECK_MODEL_TYPES
from hub.artifact import CONFIG_FILE, WEIGHTS_FILE, ArtifactError, read_config, read_tensors
from hub.bottleneck_format import LOCATIONS, BottleneckConfig, check_non_linearity, check_scaling, positive_int
from hub.files import open_regular

SAFE_WEIGHTS = "adapter.safetensors"  # the `adapters` library's file names
TORCH_WEIGHTS = "pytorch_adapter.bin"

# `adapters` options that change the math but that we do not serve: refused by name.
_REFUSED_TRUE = {
    "ln_before": "a LayerNorm inside the adapter, before the bottleneck",
    "ln_after": "a LayerNorm inside the adapter, after the bottleneck",
    "use_gating": "a learned gate (UniPELT)",
    "phm_layer": "PHM (Compacter) projections",
    "cross_adapter": "adapters after cross-attention (decoder-only bases have none)",
}


def _convert_config(saved: dict[str, Any], path: Path) -> tuple[BottleneckConfig, str]:
    """(our config without sizes yet, the adapter's name) from an `adapters` adapter_config.json."""
    cfg = saved.get("config")
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path}: 'config' must be the saved adapter config object, got {cfg!r}")
    architecture = cfg.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise ArtifactError(f"{path}: AdapterHub architecture {architecture!r} is not a bottleneck adapter "
                            "(only bottleneck adapters are imported)")
    model_type = saved.get("model_type")
    if model_type not in BOTTLENECK_MODEL_TYPES:
        raise ArtifactError(f"{path}: model_type {model_type!r} is not served for bottleneck adapters "
                            f"(served: {', '.join(BOTTLENECK_MODEL_TYPES)})")
    for key, what in _REFUSED_TRUE.items():
        if cfg.get(key):
            raise ArtifactError(f"{path}: option {key}=true ({what}) is not served")
    if cfg.get("inv_adapter"):
        raise ArtifactError(f"{path}: option inv_adapter={cfg['inv_adapter']!r} (invertible adapters on the "
                            "embeddings) is not served")
    if not isinstance(cfg.get("residual_before_ln", True), bool):
        raise ArtifactError(f"{path}: option residual_before_ln={cfg['residual_before_ln']!r} is not served "
                            "(the adapters library itself fails on it for pre-norm decoders)")
    non_linearity = cfg.get("non_linearity")
    non_linearity = check_non_linearity(non_linearity.lower() if isinstance(non_linearity, str) else non_linearity)
    check_scaling(cfg.get("scaling", 1.0))
    locations = tuple(loc for loc, key in zip(LOCATIONS, ("mh_adapter", "output_adapter")) if cfg.get(key))
    if not locations:
        raise ArtifactError(f"{path}: neither mh_adapter nor output_adapter is set: the adapter has no place")
    hidden = saved.get("hidden_size")
    if not positive_int(hidden):
        raise ArtifactError(f"{path}: hidden_size must be a positive integer, got {hidden!r}")
    name = saved.get("name")
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{path}: no adapter 'name'")
    config = BottleneckConfig(
        locations=locations, non_linearity=non_linearity, hidden_size=hidden,
        parallel=bool(cfg.get("is_parallel", False)), scaling=float(cfg.get("scaling", 1.0)),
        original_ln_before=bool(cfg.get("original_ln_before", False)),
        original_ln_after=bool(cfg.get("original_ln_after", True)),
        residual_before_ln=bool(cfg.get("residual_before_ln", True)),
        source={"library": "adapters", "version": saved.get("version"), "name": name, "model_type": model_type,
                "model_name": saved.get("model_name"), "config": cfg},
    )
    return config, name


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved weights: safetensors if present, else the torch file, read weights-only (no code runs)."""
    if (folder / SAFE_WEIGHTS).exists() or (folder / SAFE_WEIGHTS).is_symlink():
        return read_tensors(folder / SAFE_WEIGHTS)
    path = folder / TORCH_WEIGHTS
    if not path.exists() and not path.is_symlink():
        raise ArtifactError(f"{folder}: no {SAFE_WEIGHTS} or {TORCH_WEIGHTS}")
    try:
        with open_regular(path) as f:  # a link or FIFO is refused, never followed or waited on
            state = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: not a weights-only PyTorch file ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ArtifactError(f"{path}: expected a mapping of tensor names to tensors")
    return state


_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
                  r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
_LOCATION_OF = {"attention_adapters": "attention", "output_adapters": "ffn"}
_PART_OF = {"adapter_down.0": "down", "adapter_up": "up"}


def _convert_tensors(state: dict[str, torch.Tensor], name: str, config: BottleneckConfig,
                     path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(our tensors, bottleneck size per layer); refuses any tensor we would not use, by key."""
    out: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None or m.group(3) != name:
            raise ArtifactError(f"{path}: tensor {key!r} is not a bottleneck projection of adapter {name!r} "
                                "(not served; it would be dropped)")
        layer, location = m.group(1), _LOCATION_OF[m.group(2)]
        if location not in config.locations:
            raise ArtifactError(f"{path}: tensor {key!r} is at location {location!r}, which the config does not "
                                "enable")
        out[f"model.layers.{layer}.{location}_adapter.{_PART_OF[m.group(4)]}.{m.group(5)}"] = tensor
    if not out:
        raise ArtifactError(f"{path}: holds no tensors")
    hidden = config.hidden_size
    for prefix in sorted({k.rsplit(".", 2)[0] for k in out}):
        names = ("down.weight", "down.bias", "up.weight", "up.bias")
        absent = [p for p in names if f"{prefix}.{p}" not in out]
        if absent:
            raise ArtifactError(f"{path}: {prefix} lacks {', '.join(absent)}")
        parts = {p: out[f"{prefix}.{p}"] for p in names}
        b = parts["down.weight"].shape[0] if parts["down.weight"].dim() == 2 else -1
        want = {"down.weight": (b, hidden), "down.bias": (b,), "up.weight": (hidden, b), "up.bias": (hidden,)}
        for p, shape in want.items():
            if tuple(parts[p].shape) != shape or b <= 0:
                raise ArtifactError(f"{path}: {prefix}.{p} has shape {tuple(parts[p].shape)}, expected {shape}")
        layer = prefix.split(".")[2]
        if sizes.setdefault(layer, b) != b:
            raise ArtifactError(f"{path}: layer {layer} has bottleneck sizes {sizes[layer]} and {b}")
    return out, sizes


def import_adapterhub(src: str | Path, dst: str | Path) -> None:
    """Convert an `adapters` library folder into our bottleneck artifact in `dst` (new or empty).

    Everything is read and checked before anything is written, so a refused folder leaves no `dst`.
    """
    src, dst = Path(src), Path(dst)
    saved = read_config(src)
    config, name = _convert_config(saved, src / CONFIG_FILE)
    tensors, sizes = _convert_tensors(_read_weights(src), name, config, src)
    size: int | dict[str, int] = next(iter(sizes.values())) if len(set(sizes.values())) == 1 else sizes
    config = BottleneckConfig(**{**asdict(config), "bottleneck_size": size})
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ArtifactError(f"{dst}: exists and is not an empty folder")
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().clone().contiguous() for k, t in sorted(tensors.items())}, str(dst / WEIGHTS_FILE))
    (dst / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
