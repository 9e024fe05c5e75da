"""Folding an adapter into a private copy of its base model's weights, and saving that as a plain HF model.

Deploying one adapter alone then costs nothing at inference: transformers loads the folder with
`from_pretrained` like any model. The served base is never touched: the export loads its own copy.
- LoRA: W += B @ A * scaling (transposed for embeddings and fan_in_fan_out); lora_bias adds to the bias.
- IA3: W *= l, per output row for attention modules (and their bias), per input column for feed-forward ones.
- BitFit: bias += delta. A module without a bias gets one when the architecture has a config flag for it
  (Llama's `attention_bias` / `mlp_bias`): the flags that add the fewest zero biases are switched on.
Prompt tuning and bottleneck adapters add inputs or layers, which no weight can absorb: refused.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from hub import basemodel
from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, is_feedforward, module_tensors
from hub.merge import lora_modules
from hub.merge_spec import MergeError
from hub.store import new_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FOLDABLE = (Technique.LORA, Technique.IA3, Technique.BITFIT)
BIAS_FLAGS = ("attention_bias", "mlp_bias")  # config flags that give a family's linear layers biases
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _bias_flags(config: Any, needed: set[str]) -> list[str]:
    """The fewest config flags whose switching on gives every `needed` module a bias (checked on "meta")."""
    from transformers import AutoModelForCausalLM

    gained: dict[str, set[str]] = {}
    for flag in BIAS_FLAGS:
        if getattr(config, flag, None) is False:
            trial = config.__class__.from_dict({**config.to_dict(), flag: True})
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(trial)
            gained[flag] = {n for n, m in model.named_modules() if getattr(m, "bias", None) is not None} & needed
    chosen = [f for f in gained if gained[f]]
    missing = needed - set().union(*(gained[f] for f in chosen)) if chosen else needed
    if missing:
        raise ArtifactError(f"module {sorted(missing)[0]!r} has no bias and the {config.model_type} architecture "
                            "has no config flag that adds one: this adapter cannot be folded into the weights")
    return chosen


def _load_copy(path: str, adapter: Adapter) -> tuple[PreTrainedModel, torch.dtype | None]:
    """A float32 copy of the base, with zero biases added (via config flags) where the adapter needs them;
    and the dtype the base is saved in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    saved_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else None
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    modules = dict(meta.named_modules())
    needed = {p for p, parts in module_tensors(adapter).items()
              if ("bias" in parts or "lora_bias" in parts) and getattr(modules.get(p), "bias", 1) is None}
    flags = _bias_flags(config, needed) if needed else []
    for flag in flags:
        setattr(config, flag, True)
    # with output_loading_info, from_pretrained returns (model, info): its annotations say the model alone
    model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, output_loading_info=True))
    new_biases = set(info["missing_keys"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in new_biases:
                p.zero_()
    return model.eval(), saved_dtype


def fold(model: PreTrainedModel, adapter: Adapter) -> None:
    """Fold the adapter into `model`'s weights in place (give it a private copy, never a served base)."""
    if adapter.technique not in FOLDABLE:
        raise ArtifactError(f"a {adapter.technique.value} adapter adds inputs or layers and cannot be folded into "
                            "the base weights; serve it as an adapter instead")
    check_fits(adapter, model)
    modules = dict(model.named_modules())
    transposed = bool(adapter.config.get("fan_in_fan_out"))  # GPT-2 Conv1D: weight stored (in, out)
    with torch.no_grad():
        if adapter.technique is Technique.LORA:
            for path, m in lora_modules(adapter).items():
                module = modules[path]
                a, b = m.a.to(module.weight.dtype), m.b.to(module.weight.dtype)
                if m.embedding or transposed:  # weight stored (in, out): add (B @ A)^T = A^T @ B^T
                    module.weight.addmm_(a.T, b.T, alpha=m.scaling)
                else:
                    module.weight.addmm_(b, a, alpha=m.scaling)
                if m.bias is not None:
                    _bias(module, path).add_((m.bias.float() * m.scaling).to(module.weight.dtype))
        for path, parts in module_tensors(adapter).items():
            module = modules[path]
            if "ia3_l" in parts:
                vector = parts["ia3_l"].float()  # (out, 1) or, feed-forward, (1, in)
                module.weight.mul_((vector.T if transposed else vector).to(module.weight.dtype))
                if not is_feedforward(adapter, path) and module.bias is not None:
                    module.bias.mul_(vector.flatten().to(module.bias.dtype))
            if "bias" in parts:
                _bias(module, path).add_(parts["bias"].to(module.weight.dtype))


def _bias(module: nn.Module, path: str) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):  # None: the layer was built without one
        raise MergeError(f"module {path!r} has no bias to fold the adapter's bias into")
    return bias


def export_merged(adapter: Adapter, base_model: str, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a full HF model folder: `base_model` (embedded name, folder or hub id) with the adapter folded in.

    Folds in float32 and saves in `dtype` (default: the base's own, e.g. bf16 for the embedded SmolLM2);
    copies the base's tokenizer files when it has them. `out_dir` must not exist or be empty (checked
    before any work); it appears complete or not at all.
    """
    with new_folder(Path(out_dir)) as tmp:
        path = basemodel.resolve(base_model)
        try:
            model, saved_dtype = _load_copy(path, adapter)
        except OSError as e:
            raise ArtifactError(f"cannot load base model {base_model!r}: {e}") from None
        fold(model, adapter)
        save_dtype = dtype or saved_dtype
        if save_dtype is not None:
            # transformers' wrapper around PreTrainedModel.to hides its signature from type checkers
            model.to(save_dtype)  # type: ignore[arg-type]
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(path) / name).is_file():
                shutil.copy2(Path(path) / name, tmp / name)
    return Path(out_dir)
