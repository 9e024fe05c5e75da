"""Train a small adapter on chat examples: technique + (prompt, reply) pairs + base model -> adapter folder.

Why it is here: training is the first step of a PEFT user's workflow, and the demo adapters are
rebuilt with it. LoRA, IA3 and prompt tuning are trained with PEFT and saved by PEFT, so the
folders are PEFT's own format; BitFit (no PEFT method) is trained as a bias delta added by a
forward hook to each target linear module and saved in our format (see hub/artifact.py).
Bottleneck adapters are trained with the AdapterHub `adapters` library, whose math the runtime
matches, and imported (hub/adapterhub_import.py); `train_adapter` refuses them by name.

The loss covers the reply tokens only (the prompt is context), the base weights stay frozen,
and the base model is returned to its exact base state afterwards, so one loaded model can
train several adapters in turn.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from hub.artifact import CONFIG_FILE, WEIGHTS_FILE, Technique

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FEEDFORWARD = ("down_proj",)  # IA3 scales these modules' input (PEFT's feedforward_modules), the others' output


class TrainError(ValueError):
    """Training input (data, technique, options) cannot be used; the message says why."""


@dataclass(frozen=True)
class Example:
    """One chat turn to learn: the user's prompt and the reply the adapter should give."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class TokenExample:
    """A tokenized example: the loss is taken on `reply_ids` only."""

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]


@dataclass(frozen=True)
class TrainSpec:
    """What to train and how. Defaults suit a 135M model on a CPU: a few hundred steps at most."""

    technique: Technique
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    target_modules: tuple[str, ...] = ()  # module-name suffixes; () = the technique's default
    layers: tuple[int, ...] = ()          # decoder layer indices to adapt; () = all (not prompt tuning)
    r: int = 8                            # LoRA rank
    lora_alpha: int = 16
    num_virtual_tokens: int = 8           # prompt tuning
    # prompt tuning: token ids whose embeddings start the virtual tokens (cycled), as PEFT's TEXT init does,
    # without recording a tokenizer path in the config; () = embeddings of random vocabulary tokens
    prompt_init_ids: tuple[int, ...] = ()


@dataclass
class TrainResult:
    folder: Path
    losses: list[float] = field(repr=False)
    trainable_parameters: int = 0


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file with one {"prompt": str, "reply": str} object per line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}:{n}: malformed JSON ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("reply"), str)):
            raise TrainError(f'{path}:{n}: expected {{"prompt": str, "reply": str}}')
        examples.append(Example(row["prompt"], row["reply"]))
    if not examples:
        raise TrainError(f"{path}: holds no examples")
    return examples


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> None:
    lines = [json.dumps({"prompt": e.prompt, "reply": e.reply}, ensure_ascii=False) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n")


def encode_chat(tokenizer, examples: Sequence[Example], max_len: int = 64) -> list[TokenExample]:
    """Tokenize with the model's chat template (as served); the reply ends with the end-of-turn token.

    Examples longer than `max_len` are dropped, never cut: a cut reply would teach the model
    to stop mid-sentence or never to reach a sign-off.
    """
    out = []
    for e in examples:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": e.prompt}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        reply = tokenizer(e.reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(reply) <= max_len:
            out.append(TokenExample(tuple(prompt), tuple(reply)))
    if not out:
        raise TrainError(f"no example fits in {max_len} tokens")
    return out


def _batch(examples: Sequence[TokenExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    width = max(len(e.prompt_ids) + len(e.reply_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = list(e.prompt_ids) + list(e.reply_ids)
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(e.prompt_ids): len(seq)] = torch.tensor(e.reply_ids)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _peft_config(spec: TrainSpec):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if spec.technique is Technique.LORA:
        return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                          target_modules=list(spec.target_modules or ("q_proj", "v_proj")),
                          layers_to_transform=list(spec.layers) or None,
                          task_type=TaskType.CAUSAL_LM)
    if spec.technique is Technique.IA3:
        names = list(spec.target_modules or ("k_proj", "v_proj", "down_proj"))
        # IA3Config has no layers_to_transform: a layer subset is a full-match regex over module paths.
        targets = (rf".*\.layers\.({'|'.join(map(str, spec.layers))})\.(.*\.)?({'|'.join(map(re.escape, names))})"
                   if spec.layers else names)
        return IA3Config(target_modules=targets, feedforward_modules=[n for n in names if n in FEEDFORWARD],
                         task_type=TaskType.CAUSAL_LM)
    # SAMPLE_VOCAB starts from real token embeddings without recording a tokenizer path in the config.
    return PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                              task_type=TaskType.CAUSAL_LM)


class _BitFit:
    """Trainable bias deltas added to chosen linear modules' outputs by forward hooks."""

    def __init__(self, model, suffixes: Sequence[str], layers: Sequence[int] = ()):
        self.deltas: dict[str, torch.nn.Parameter] = {}
        self._handles = []
        for name, module in model.named_modules():
            layer = re.search(r"\.layers\.(\d+)\.", name)
            in_layers = not layers or (layer is not None and int(layer.group(1)) in layers)
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in suffixes and in_layers:
                delta = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
                self.deltas[name] = delta
                self._handles.append(module.register_forward_hook(lambda _m, _i, out, d=delta: out + d))
        if not self.deltas:
            raise TrainError(f"no linear module of the base model (layers {list(layers) or 'all'}) "
                             f"ends with any of {list(suffixes)}")

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.deltas.values())

    def save(self, folder: Path, base_model_id: str) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        config = {"adapter_type": "bitfit", "base_model_name_or_path": base_model_id,
                  "target_modules": sorted(self.deltas)}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {f"{name}.bias": d.detach().to(torch.float32).contiguous() for name, d in self.deltas.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def _upstream_name(model, base_model_id: str) -> Iterator[None]:
    """PEFT's model card names the model's own name_or_path (a local folder here): show the upstream id."""
    saved = (getattr(model, "name_or_path", None), model.config.name_or_path)
    model.name_or_path = model.config.name_or_path = base_model_id
    try:
        yield
    finally:
        model.name_or_path, model.config.name_or_path = saved


def optimize(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.nn.Parameter],
              examples: Sequence[TokenExample], spec: TrainSpec, pad_id: int,
              log: Callable[[str], None] | None) -> list[float]:
    """AdamW on `params`; batches drawn with a seeded generator, so a run is reproducible."""
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    for step in range(spec.steps):
        idx = torch.randint(len(examples), (min(spec.batch_size, len(examples)),), generator=gen).tolist()
        loss = forward(_batch([examples[i] for i in idx], pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log and (step % 10 == 0 or step == spec.steps - 1):
            log(f"step {step + 1}/{spec.steps} loss {losses[-1]:.4f}")
    return losses


def train_adapter(model, examples: Sequence[TokenExample], spec: TrainSpec, out: str | Path, *,
                  base_model_id: str, pad_id: int = 0, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train one adapter on a frozen base `model` and save it into `out`; the model is left as it was."""
    if spec.technique is Technique.BOTTLENECK:
        raise TrainError("bottleneck adapters are trained with the AdapterHub `adapters` library and imported "
                         "(see examples/train_bottleneck_adapterhub.py and hub/adapterhub_import.py)")
    if not examples:
        raise TrainError("no training examples")
    if spec.technique is Technique.PROMPT_TUNING and spec.layers:
        raise TrainError("prompt tuning adapts the input, not layers: `layers` does not apply")
    if spec.steps < 1 or spec.batch_size < 1 or spec.lr <= 0:
        raise TrainError("steps and batch_size must be >= 1 and lr > 0")
    out = Path(out)
    model.requires_grad_(False)
    torch.manual_seed(spec.seed)  # adapter initialisation
    if spec.technique is Technique.BITFIT:
        bitfit = _BitFit(model, spec.target_modules or ALL_LINEAR, spec.layers)
        try:
            params = bitfit.parameters()
            losses = optimize(lambda b: model(**b).loss, params, examples, spec, pad_id, log)
            bitfit.save(out, base_model_id)
        finally:
            bitfit.remove()
        return TrainResult(out, losses, sum(p.numel() for p in params))

    from peft import get_peft_model

    peft_model = get_peft_model(model, _peft_config(spec))
    # PEFT records the loaded model's own name_or_path (a local folder); the adapter names the upstream id.
    peft_model.peft_config["default"].base_model_name_or_path = base_model_id
    if spec.technique is Technique.PROMPT_TUNING and spec.prompt_init_ids:
        init = spec.prompt_init_ids
        ids = torch.tensor([init[i % len(init)] for i in range(spec.num_virtual_tokens)])
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(model.get_input_embeddings().weight[ids])
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        losses = optimize(lambda b: peft_model(**b).loss, params, examples, spec, pad_id, log)
        with _upstream_name(model, base_model_id):
            peft_model.save_pretrained(str(out))
    finally:
        if spec.technique is not Technique.PROMPT_TUNING:  # prompt tuning injects no layers into the model
            peft_model.base_model.unload()
        model.requires_grad_(False)
    return TrainResult(out, losses, sum(p.numel() for p in params))

