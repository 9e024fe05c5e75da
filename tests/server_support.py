"""Fixtures and helpers for the server tests: a tiny Llama with a real (character-level) tokenizer,
PEFT adapters made for it and pushed into a temp registry, and a real server on a free localhost port.

The fixtures reach every test module through `pytest_plugins` in conftest.py; import the helpers by name.
HUB_TEST_DEVICE=cuda runs these servers (and the peers they are compared with) on a GPU; default cpu.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from helpers import save_bitfit_adapter, save_bottleneck_adapter, save_peft_adapter, tiny_llama

LORA_SCALE, BITFIT_SCALE = 0.06, 0.005
CONTEXT = 4096  # long enough that a request can outlive others without a timing assumption
DEVICE = os.environ.get("HUB_TEST_DEVICE", "cpu")  # where the served base (and each test's peer) runs
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}>{% endif %}")

# Requests' adapter arguments over every served technique and both composition modes, by name.
ADAPTER_MIXES = {
    "base": dict(adapters=[]),
    "lora0": dict(adapters=["lora0"]),
    "lora3": dict(adapters=["lora3"]),
    "ia3": dict(adapters=["ia3"]),
    "prompt_tuning": dict(adapters=["prompt-tuning"]),
    "bitfit": dict(adapters=["bitfit"]),
    "bottleneck": dict(adapters=["bottleneck"]),
    "stack": dict(adapters=[("lora0", 0.5), "ia3", "bitfit"]),
    "average": dict(adapters=["lora1", ("lora2", 3.0)], mode="average"),
}


def char_tokenizer():
    """A character-level fast tokenizer over the 128-token tiny vocabulary (printable ASCII + specials)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    for i in range(len(vocab), 128):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def device_bytes(engine, registry, name: str) -> int:
    """The bytes `name`'s current version takes on `engine`'s device: what an adapter memory budget counts."""
    from hub.artifact import read_adapter

    return engine.weights_bytes(read_adapter(registry.materialize(registry.resolve(name))))


@pytest.fixture(scope="session")
def served_base(tmp_path_factory) -> Path:
    """A tiny Llama (context 4096) and its tokenizer, saved as a local model folder. EOS's output row is zero:
    its logit is 0 where 127 random others compete, so greedy never ends a long stream early (the tests that
    hold adapters with one count on that)."""
    folder = tmp_path_factory.mktemp("served") / "base"
    model = tiny_llama(max_position_embeddings=CONTEXT)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def served_model(base: Path, device: str = DEVICE):
    """(model, tokenizer) loaded from the served base folder, as `hub serve --base-model FOLDER` loads them."""
    from hub import basemodel

    return basemodel.load(str(base), device=device)


@pytest.fixture(scope="session")
def served_adapters(served_base, tmp_path_factory) -> dict[str, Path]:
    """Adapter folders for served_base: four LoRAs (lora0..lora3), ia3, prompt_tuning, bitfit, bottleneck,
    and `foreign`: a LoRA made for a base with another vocabulary (same module shapes, other fingerprint)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("served-adapters")
    base = tiny_llama(max_position_embeddings=CONTEXT)
    out: dict[str, Path] = {}
    for i in range(4):
        out[f"lora{i}"] = save_peft_adapter(
            base, LoraConfig(r=4 * (i + 1), lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            root / f"lora{i}", seed=10 + i, scale=LORA_SCALE)
    out["ia3"] = save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]), root / "ia3")
    out["prompt_tuning"] = save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                                             root / "prompt_tuning")
    gen = torch.Generator().manual_seed(5)
    out["bitfit"] = save_bitfit_adapter(root / "bitfit", {
        f"model.layers.{i}.mlp.down_proj": BITFIT_SCALE * torch.randn(64, generator=gen) for i in range(2)})
    out["bottleneck"] = save_bottleneck_adapter(root / "bottleneck")
    other = tiny_llama(vocab_size=256)
    other.save_pretrained(root / "other-base")
    out["other_base"] = root / "other-base"
    out["foreign"] = save_peft_adapter(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), root / "foreign")
    _check_each_adapter_matters(base, {k: v for k, v in out.items() if k not in ("other_base", "foreign")})
    return out


def _check_each_adapter_matters(base, adapters: dict[str, Path]) -> None:
    """Each adapter's greedy tokens differ from the base's and between prompts, and are not one token repeated:
    an adapter that drowns the base emits the same token whatever the context, and then no test of context,
    position or KV cache can see an error in its rows."""
    import copy

    from hub.artifact import read_adapter
    from runtime.engine import Engine
    from runtime.plan import AdapterUse, RowPlan

    engine = Engine(copy.deepcopy(base), None)
    prompts = [[1, 40, 72, 77, 80, 15], [1, 55, 68, 70, 71, 33, 81, 90], [1, 45, 88, 13]]

    def greedy(plan: RowPlan, prompt: list[int], n: int = 8) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            ids = torch.tensor([prompt + out])
            out.append(int(engine.forward(ids, torch.ones_like(ids), [plan], use_cache=False, last_only=True)[0]
                           .reshape(-1, base.config.vocab_size)[-1].argmax()))
        return out

    plain = [greedy(RowPlan(), p) for p in prompts]
    for key, folder in adapters.items():
        engine.load(key, read_adapter(folder))
        outs = [greedy(RowPlan((AdapterUse(key),)), p) for p in prompts]
        assert all(o != b for o, b in zip(outs, plain)), f"{key}: greedy output equals the base's: {outs}"
        assert len({tuple(o) for o in outs}) == len(prompts), f"{key}: greedy output ignores the prompt: {outs}"
        assert all(len(set(o)) > 1 for o in outs), f"{key}: greedy output is one token repeated: {outs}"


@pytest.fixture
def registry(tmp_path, served_base, served_adapters):
    """A temp registry holding every served adapter as `<key>@1.0.0` (foreign: pushed against its own base)."""
    from hub.registry import Registry

    reg = Registry(tmp_path / "registry")
    for key, folder in served_adapters.items():
        if key == "other_base":
            continue
        base = served_adapters["other_base"] if key == "foreign" else served_base
        reg.push(folder, key.replace("_", "-"), "1.0.0", base_model=str(base))
    return reg


@pytest.fixture
def start_server(served_base, registry) -> Iterator[Callable]:
    """start_server(**ServerConfig fields) -> (server, client) on a free port; all stopped at teardown. `model`:
    the (model, tokenizer) to serve instead of the served base's as loaded (e.g. one a test edited)."""
    from runtime.client import RuntimeClient
    from runtime.server import RuntimeServer, ServerConfig

    started = []

    def start(token: str | None = None, tls_ca: Path | None = None, model: tuple | None = None, **fields):
        fields.setdefault("port", 0)
        fields.setdefault("device", DEVICE)
        model, tokenizer = model or served_model(served_base)
        config = ServerConfig(base_model=str(served_base), **fields)
        server = RuntimeServer(config, model=model, tokenizer=tokenizer, registry=registry).start()
        target = f"localhost:{server.port}" if tls_ca else server.address
        client = RuntimeClient(target, token=token, tls_ca=tls_ca, timeout=120)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop(grace=5)


@contextmanager
def frozen(server) -> Iterator[None]:
    """Hold the scheduler's loop between two steps (it runs a call that waits), so a test can line up
    requests deterministically; the loop resumes at exit."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait()

    thread = threading.Thread(target=server.scheduler.call, args=(hold,), daemon=True)
    thread.start()
    holding.wait()
    try:
        yield
    finally:
        release.set()
        thread.join()


def wait_until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Poll until condition() holds; fail naming `what` if it never does (a hang guard, not a timing check)."""
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)
