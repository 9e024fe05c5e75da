"""Train a small adapter on chat examples: technique + (prompt, reply) pairs or chats + base model -> adapter folder.

Why it is here: training is the first step of a PEFT user's workflow (`hub train`, hub/train_cli.py), and
the demo adapters are rebuilt with it. LoRA, IA3 and prompt tuning are trained with PEFT and saved by
PEFT, so the folders are PEFT's own format; BitFit (no PEFT method) is trained as a bias delta added by a
forward hook to each target linear module, and bottleneck adapters (Pfeiffer, Houlsby) as hooked
down/up projections at the places the runtime serves them; both are saved in our format (see
hub/artifact.py and hub/bottleneck_format.py).

The loss covers the reply (assistant) tokens only (the prompt is context), the base weights stay frozen,
and the base model is returned to its exact base state afterwards, so one loaded model can
train several adapters in turn. Checkpoints are taken at intervals; the best one (lowest validation
loss, or the latest without validation data) is what is saved, also when Ctrl-C stops a run.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from hub.architectures import BOTTLENECK_SITES, FEEDFORWARD, IA3_TARGETS, LORA_TARGETS, PROJECTIONS
from hub.artifact import CONFIG_FILE, WEIGHTS_FILE, Technique
from hub.bottleneck_format import ACTIVATIONS, BottleneckConfig


class TrainError(ValueError):
    """Training input (data, technique, options) cannot be used; the message says why."""


@dataclass(frozen=True)
class Example:
    """One chat turn to learn: the user's prompt and the reply the adapter should give."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class Chat:
    """A conversation to learn: (role, content) messages; the loss covers the assistant turns only."""

    messages: tuple[tuple[str, str], ...]


ROLES = ("system", "user", "assistant")

# The AdapterHub `adapters` library's two sequential presets (SeqBnConfig, DoubleSeqBnConfig), in our config's terms.
BOTTLENECK_PRESETS: dict[str, dict] = {
    "pfeiffer": dict(locations=("ffn",), non_linearity="relu", original_ln_before=True),
    "houlsby": dict(locations=("attention", "ffn"), non_linearity="swish", original_ln_before=False),
}


def bottleneck_preset(name: str) -> dict:
    """The config options of a bottleneck preset, by name."""
    if name not in BOTTLENECK_PRESETS:
        raise TrainError(f"unknown bottleneck config {name!r}; known: {', '.join(BOTTLENECK_PRESETS)}")
    return BOTTLENECK_PRESETS[name]


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
    bottleneck_config: str = "pfeiffer"   # a BOTTLENECK_PRESETS name
    reduction_factor: int = 16            # bottleneck size = hidden size // reduction_factor
    eval_every: int = 0                   # steps between checkpoints (validation); 0 = about ten per run

    def options(self) -> dict:
        """The technique's own options, as applied (for the training record)."""
        t = self.technique
        common = {"target_modules": list(self.target_modules), "layers": list(self.layers)}
        if t is Technique.LORA:
            return {**common, "r": self.r, "lora_alpha": self.lora_alpha}
        if t is Technique.PROMPT_TUNING:
            return {"num_virtual_tokens": self.num_virtual_tokens}
        if t is Technique.BOTTLENECK:
            return {"layers": list(self.layers), "config": self.bottleneck_config,
                    "reduction_factor": self.reduction_factor}
        return common


@dataclass
class Fit:
    """What an optimisation run did: per-step train losses, (step, validation loss) at each checkpoint,
    the step of the checkpoint kept, and whether Ctrl-C stopped it."""

    losses: list[float] = field(repr=False)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    interrupted: bool = False


@dataclass
class TrainResult:
    folder: Path
    losses: list[float] = field(repr=False)
    trainable_parameters: int
    fit: Fit = field(repr=False)


def parse_row(row: object) -> Example | Chat:
    """One JSONL row as an example; ValueError says what is wrong with it."""
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ValueError('"messages" must be a non-empty list of {"role": system|user|assistant, "content": str}')
        roles = [m["role"] for m in messages]
        if "assistant" not in roles[1:]:
            raise ValueError("no assistant turn after a first message: nothing to learn")
        return Chat(tuple((m["role"], m["content"]) for m in messages))
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        completion = row.get("completion", row.get("reply"))  # "reply": the demo data's older name
        if isinstance(completion, str):
            return Example(row["prompt"], completion)
    raise ValueError('expected {"prompt": str, "completion": str} or {"messages": [...]}')


def read_jsonl(path: str | Path, parse: Callable[[object], Any] = parse_row) -> list:
    """Examples from a JSONL file: one {"prompt", "completion"} or {"messages": [...]} object per line (or what
    `parse` takes; it raises ValueError for a bad row). Every bad row is reported (by line number, in one
    error), none is skipped."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    return _parsed(path, ((f"line {n}", line) for n, line in enumerate(lines, start=1) if line.strip()), parse,
                   json.loads)


def read_dataset_folder(path: str | Path, parse: Callable[[object], Any] = parse_row) -> list:
    """Examples from a Hugging Face `datasets` folder written by `save_to_disk` (one split), as `read_jsonl`
    reads a file; bad rows are reported by row number (from 1). The `datasets` library is optional
    (the `data` extra): only this reader needs it."""
    path = Path(path)
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise TrainError(f"{path} is a folder: reading a `datasets` folder needs the datasets library "
                         "(pip install datasets)") from None
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if not isinstance(data, Dataset):
        raise TrainError(f"{path} holds the splits {', '.join(data)}: give one split's folder, e.g. {path / 'train'}")
    # A table has every column in every row: a column a row does not use (e.g. "messages" in a prompt row) is None.
    rows = ((f"row {n}", {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(data, start=1))
    return _parsed(path, rows, parse, lambda row: row)


def read_rows(path: str | Path, parse: Callable[[object], Any] = parse_row) -> list:
    """Examples from a JSONL file or a `datasets` save_to_disk folder."""
    return read_dataset_folder(path, parse) if Path(path).is_dir() else read_jsonl(path, parse)


def _parsed(path: Path, rows: Iterator[tuple[str, Any]], parse: Callable[[object], Any],
            decode: Callable[[Any], object]) -> list:
    """Every row parsed, or one TrainError naming each bad row (`where` it is, and why)."""
    examples: list = []
    bad: list[str] = []
    for where, raw in rows:
        try:
            examples.append(parse(decode(raw)))
        except json.JSONDecodeError as e:
            bad.append(f"{where} (malformed JSON: {e.msg})")
        except ValueError as e:
            bad.append(f"{where} ({e})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise TrainError(f"{path}: {len(bad)} bad row(s), none used: {shown}")
    if not examples:
        raise TrainError(f"{path}: holds no examples")
    return examples


def dataset_info(path: Path, rows: int) -> dict[str, Any]:
    """What identifies a data set in a record: its name, sha256 (of a folder: of its files' names and
    contents, in order) and row count."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    else:
        digest.update(path.read_bytes())
    return {"file": path.name, "sha256": digest.hexdigest(), "rows": rows}


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> None:
    lines = [json.dumps({"prompt": e.prompt, "reply": e.reply}, ensure_ascii=False) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n")


def _turns(tokenizer, example: Example | Chat) -> list[TokenExample]:
    """One TokenExample per assistant turn: the conversation before it, rendered with the chat template and
    the generation prompt (as the server renders a request), then the reply and the end-of-turn token."""
    if isinstance(example, Example):
        messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.reply}]
    else:
        messages = [{"role": role, "content": content} for role, content in example.messages]
    eos = (tokenizer.eos_token_id,)
    return [TokenExample(chat_context(tokenizer, messages[:i]), text_ids(tokenizer, m["content"]) + eos)
            for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]


def chat_context(tokenizer, messages: list[dict[str, str]]) -> tuple[int, ...]:
    """The conversation so far with the chat template and the generation prompt, as the server renders it."""
    return tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def text_ids(tokenizer, text: str) -> tuple[int, ...]:
    """A reply's own tokens (no special tokens added)."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer, examples: Sequence[Example | Chat], max_len: int = 64,
                log: Callable[[str], None] | None = None) -> list[TokenExample]:
    """Tokenize with the model's chat template (as served); each reply ends with the end-of-turn token.

    Turns longer than `max_len` are dropped, never cut: a cut reply would teach the model
    to stop mid-sentence or never to reach a sign-off. `log` hears how many were dropped.
    """
    turns = [t for e in examples for t in _turns(tokenizer, e)]
    out = [t for t in turns if len(t.prompt_ids) + len(t.reply_ids) <= max_len]
    if not out:
        raise TrainError(f"no example fits in {max_len} tokens")
    if log and len(out) < len(turns):
        log(f"dropped {len(turns) - len(out)} of {len(turns)} examples longer than {max_len} tokens")
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
                          target_modules=list(spec.target_modules or LORA_TARGETS),
                          layers_to_transform=list(spec.layers) or None,
                          task_type=TaskType.CAUSAL_LM)
    if spec.technique is Technique.IA3:
        names = list(spec.target_modules or IA3_TARGETS)
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


def _mean_loss(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], examples: Sequence[TokenExample],
               batch_size: int, pad_id: int) -> float:
    """The loss over every reply token of `examples` (each batch weighted by its reply tokens)."""
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = _batch(examples[i: i + batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
            total += forward(batch).item() * n
            tokens += n
    return total / tokens


def fit(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.nn.Parameter],
        examples: Sequence[TokenExample], spec: TrainSpec, pad_id: int, log: Callable[[str], None] | None = None,
        *, val: Sequence[TokenExample] = (), on_step: Callable[[int], None] | None = None) -> Fit:
    """AdamW on `params`; batches drawn with a seeded generator, so a run is reproducible.

    A checkpoint (a copy of `params`) is taken every `spec.eval_every` steps and at the end, with the
    validation loss on `val` when given; the best one (lowest validation loss, else the latest) is left in
    `params`. Ctrl-C (KeyboardInterrupt, also from `on_step`, called after each step) stops the run there.
    """
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(spec.seed)
    every = spec.eval_every or max(1, spec.steps // 10)
    result = Fit([])
    best: tuple[float, list[torch.Tensor]] | None = None
    started = time.perf_counter()
    try:
        for step in range(1, spec.steps + 1):
            idx = torch.randint(len(examples), (min(spec.batch_size, len(examples)),), generator=gen).tolist()
            loss = forward(_batch([examples[i] for i in idx], pad_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())
            line = f"step {step}/{spec.steps} loss {result.losses[-1]:.4f}"
            if step % every == 0 or step == spec.steps:
                score = float(-step)  # without validation data the latest checkpoint is the best
                if val:
                    score = _mean_loss(forward, val, spec.batch_size, pad_id)
                    result.val_losses.append((step, score))
                    line += f" val {score:.4f}"
                if best is None or score < best[0]:
                    best = (score, [p.detach().clone() for p in params])
                    result.best_step = step
            if log and (step % 10 == 1 or step % every == 0 or step == spec.steps):
                log(f"{line} ({step / (time.perf_counter() - started):.1f} steps/s)")
            if on_step:
                on_step(step)
    except KeyboardInterrupt:
        result.interrupted = True
        if log:
            log(f"interrupted after {len(result.losses)} steps; keeping the checkpoint of step {result.best_step}")
    if best is None:
        raise TrainError(f"interrupted after {len(result.losses)} steps, before the first checkpoint "
                         f"(step {min(every, spec.steps)}): nothing saved")
    with torch.no_grad():
        for p, kept in zip(params, best[1]):
            p.copy_(kept)
    return result


def optimize(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.nn.Parameter],
             examples: Sequence[TokenExample], spec: TrainSpec, pad_id: int,
             log: Callable[[str], None] | None) -> list[float]:
    """`fit` without validation: the per-step losses (params end as trained)."""
    return fit(forward, params, examples, spec, pad_id, log).losses


class _Bottleneck:
    """Trainable bottleneck layers (AdapterHub math for pre-norm decoders), hooked in where the runtime serves
    them: the residual is the input of the block's norm, the block's output that of its output projection."""

    def __init__(self, model, spec: TrainSpec):
        preset = bottleneck_preset(spec.bottleneck_config)
        hidden = model.config.hidden_size
        if spec.reduction_factor < 1 or hidden // spec.reduction_factor < 1:
            raise TrainError(f"reduction factor {spec.reduction_factor} leaves no bottleneck of hidden size {hidden}")
        size = hidden // spec.reduction_factor
        self.config = BottleneckConfig(**preset, hidden_size=hidden,
                                       bottleneck_size=size)
        self.preset = spec.bottleneck_config
        modules = dict(model.named_modules())
        layers = sorted(int(m.group(1)) for m in (re.fullmatch(r"model\.layers\.(\d+)", n) for n in modules) if m)
        unknown = sorted(set(spec.layers) - set(layers))
        if unknown or not layers:
            raise TrainError(f"layers {unknown or 'any'} not in the base model (its layers: {layers})")
        like = next(model.parameters())
        self.params: dict[str, torch.nn.Parameter] = {}
        self._handles = []
        for i in spec.layers or layers:
            for location in self.config.locations:
                prefix = f"model.layers.{i}.{location}_adapter"
                weights = {
                    "down.weight": torch.randn(size, hidden) * 0.02, "down.bias": torch.zeros(size),
                    "up.weight": torch.zeros(hidden, size), "up.bias": torch.zeros(hidden),  # starts as the base
                }
                block = {k: torch.nn.Parameter(t.to(like.dtype)) for k, t in weights.items()}
                self.params.update({f"{prefix}.{k}": p for k, p in block.items()})
                norm, out = (modules[f"model.layers.{i}.{name}"] for name in BOTTLENECK_SITES[location])
                residual: list[torch.Tensor] = []
                self._handles.append(norm.register_forward_pre_hook(lambda _m, args, r=residual: r.append(args[0])))
                self._handles.append(out.register_forward_hook(
                    lambda _m, _i, h, r=residual, p=block: self._block(h, r.pop(), p)))

    def _block(self, h: torch.Tensor, r: torch.Tensor, p: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        """The block output the decoder layer then adds the residual `r` to."""
        cfg = self.config
        x = h + r if cfg.original_ln_before else h
        res = h if cfg.residual_before_ln else x
        act = ACTIVATIONS[cfg.non_linearity]
        s = torch.nn.functional.linear(act(torch.nn.functional.linear(x, p["down.weight"], p["down.bias"])),
                                       p["up.weight"], p["up.bias"]) + res
        return s if cfg.original_ln_after else s - r

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def save(self, folder: Path, base_model_id: str) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "source": {"trained_with": "hub train", "config": self.preset,
                                                      "base_model": base_model_id}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {name: p.detach().to(torch.float32).contiguous() for name, p in self.params.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def train_adapter(model, examples: Sequence[TokenExample], spec: TrainSpec, out: str | Path, *,
                  base_model_id: str, pad_id: int = 0, log: Callable[[str], None] | None = None,
                  val: Sequence[TokenExample] = (), on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train one adapter on a frozen base `model` and save the best checkpoint into `out` (see `fit`);
    the model is left as it was."""
    if not examples:
        raise TrainError("no training examples")
    if spec.technique is Technique.PROMPT_TUNING and spec.layers:
        raise TrainError("prompt tuning adapts the input, not layers: `layers` does not apply")
    if spec.steps < 1 or spec.batch_size < 1 or spec.lr <= 0 or spec.eval_every < 0:
        raise TrainError("steps and batch_size must be >= 1, lr > 0 and eval_every >= 0")
    out = Path(out)
    model.requires_grad_(False)
    torch.manual_seed(spec.seed)  # adapter initialisation

    def run(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: list[torch.nn.Parameter]) -> Fit:
        return fit(forward, params, examples, spec, pad_id, log, val=val, on_step=on_step)

    if spec.technique in (Technique.BITFIT, Technique.BOTTLENECK):
        hooked = (_BitFit(model, spec.target_modules or PROJECTIONS, spec.layers) if spec.technique is Technique.BITFIT
                  else _Bottleneck(model, spec))
        try:
            params = hooked.parameters()
            result = run(lambda b: model(**b).loss, params)
            hooked.save(out, base_model_id)
        finally:
            hooked.remove()
        return TrainResult(out, result.losses, sum(p.numel() for p in params), result)

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
        result = run(lambda b: peft_model(**b).loss, params)
        with _upstream_name(model, base_model_id):
            peft_model.save_pretrained(str(out))
    finally:
        if spec.technique is not Technique.PROMPT_TUNING:  # prompt tuning injects no layers into the model
            peft_model.base_model.unload()
        model.requires_grad_(False)
    return TrainResult(out, result.losses, sum(p.numel() for p in params), result)
