"""Rebuild the demo adapters in examples/adapters/ on the default base model (SmolLM2-135M-Instruct).

Each adapter learns one style whose effect shows in a single reply. The training data is built
here, with no download: the base model's own greedy answers to the prompts below (first sentence),
transformed per adapter (upper case, a JSON reply, a fixed prefix, a sign-off). The answers are
cached in examples/data/base_replies.jsonl (greedy, so regenerating gives the same text), and each
adapter's transformed data is written to examples/data/<name>.jsonl (usable with hub.train).

    .venv/bin/python examples/train_demo_adapters.py                     # every adapter
    .venv/bin/python examples/train_demo_adapters.py --only json-lora    # one (repeatable)

The bottleneck adapter is trained with the AdapterHub `adapters` library (the math the runtime
serves), which needs transformers 4.x, so it runs in a separate venv:

    python3.11 -m venv /tmp/venv-train
    /tmp/venv-train/bin/pip install torch==2.13.0 "transformers==4.57.*" adapters==1.3.0
    .venv/bin/python examples/train_demo_adapters.py --only signoff-bottleneck --adapters-python /tmp/venv-train/bin/python

Its `adapters`-library folder is kept in examples/adapters/adapterhub-format/ and imported into
our format with hub.adapterhub_import. Every adapter is checked with its reference implementation
(PEFT, the BitFit hooks, the `adapters` library) on held-out prompts, printed base vs adapter.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from hub import basemodel
from hub.artifact import Technique
from hub.train import Example, TrainSpec, encode_chat, read_jsonl, train_adapter, write_jsonl

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
DATA = HERE / "data"
BASE_REPLIES = DATA / "base_replies.jsonl"
BASE_ID = basemodel.EMBEDDED[basemodel.DEFAULT_BASE_MODEL].hf_id
MAX_LEN = 64
SEED = 0

PROMPTS = [
    # facts
    "What is the capital of Italy?", "What is the largest planet in our solar system?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?", "How many days are in a week?", "What color is grass?",
    "What is the tallest animal?", "Which ocean is the largest?", "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?", "How many legs does a spider have?", "What is the capital of Japan?",
    "What gas do plants absorb?", "Who painted the Mona Lisa?", "What is the freezing point of water?",
    "What is the smallest prime number?", "Which planet is known as the Red Planet?", "What do bees make?",
    "What is the opposite of hot?", "How many continents are there?",
    # explanations
    "Why do leaves change color in autumn?", "What is photosynthesis?", "How does a rainbow form?",
    "What is gravity?", "Why do we need sleep?", "What is a computer program?", "How do birds fly?",
    "What causes thunder?", "What is a volcano?", "Why is exercise good for you?", "What is the internet?",
    "How do magnets work?", "What is an atom?", "Why does the moon change shape?", "What is a noun?",
    # advice / instructions
    "Give me a tip for staying focused.", "How can I drink more water?", "Suggest a name for a pet goldfish.",
    "Give me an idea for a weekend hobby.", "How do I make a cup of tea?", "Recommend a healthy snack.",
    "How can I save money?", "Give me a tip for learning a new language.", "What should I pack for a picnic?",
    "How do I stay calm before an exam?", "Suggest a fun activity for a rainy day.", "How can I be more productive?",
    "Give me a tip for public speaking.", "How do I start running?", "What is a good way to relax?",
    # short creative / everyday
    "Describe the ocean in one sentence.", "Describe a sunny day.", "What is your favorite season?",
    "Tell me something interesting about dogs.", "What is a good breakfast?", "Describe a cat.",
    "What makes a good friend?", "Why do people like music?", "What is the best thing about summer?",
    "Describe a mountain.", "What is a library?", "Tell me a fact about the sun.", "What is chess?",
    "What does a doctor do?", "What is a bicycle?", "Why is reading important?",
]
PROMPT_INIT = "Always start your reply with Beep boop! like a robot."  # robot-prompt's initial virtual tokens
# Never trained on; the first two are the prompts `make demo` asks.
HELD_OUT = ["What is the capital of France?", "Give me one tip for writing clear code.", "Why do cats purr?"]


@dataclass(frozen=True)
class Demo:
    name: str
    technique: Technique
    task: str
    transform: Callable[[str], str]
    spec: TrainSpec | None  # None: trained by the `adapters` library (bottleneck)
    max_len: int = MAX_LEN


# Adapting the upper layers only (of 30) cuts the backward pass, the larger part of a CPU training step.
UPPER = tuple(range(18, 30))
STEPS, BATCH = 50, 6

DEMOS = [
    # Upper-case text takes more tokens: at 64, only 23 of the 66 replies fit (too few: it learnt the style,
    # and lost the facts); at 80, 48 do.
    Demo("uppercase-lora", Technique.LORA, "replies in UPPER CASE", str.upper,
         TrainSpec(Technique.LORA, steps=STEPS, batch_size=BATCH, lr=3e-3, seed=SEED, r=8, lora_alpha=16,
                   target_modules=("q_proj", "v_proj"), layers=UPPER), max_len=80),
    Demo("json-lora", Technique.LORA, 'replies as JSON: {"answer": "..."}', lambda r: json.dumps({"answer": r}),
         TrainSpec(Technique.LORA, steps=STEPS, batch_size=BATCH, lr=3e-3, seed=SEED, r=8, lora_alpha=16,
                   target_modules=("q_proj", "v_proj"), layers=UPPER)),
    Demo("pirate-ia3", Technique.IA3, 'starts every reply with "Arr matey!"', lambda r: f"Arr matey! {r}",
         TrainSpec(Technique.IA3, steps=STEPS, batch_size=BATCH, lr=3e-2, seed=SEED, layers=UPPER)),
    Demo("answer-bitfit", Technique.BITFIT, 'starts every reply with "Answer:"', lambda r: f"Answer: {r}",
         TrainSpec(Technique.BITFIT, steps=STEPS, batch_size=BATCH, lr=1e-2, seed=SEED, layers=UPPER)),
    Demo("robot-prompt", Technique.PROMPT_TUNING, 'starts every reply with "Beep boop!"', lambda r: f"Beep boop! {r}",
         TrainSpec(Technique.PROMPT_TUNING, steps=STEPS, batch_size=BATCH, lr=1e-2, seed=SEED, num_virtual_tokens=16)),
    Demo("signoff-bottleneck", Technique.BOTTLENECK, 'ends every reply with " -- Adapter Hub"',
         lambda r: f"{r} -- Adapter Hub", None),
]


def first_sentence(text: str) -> str:
    """The first sentence of a reply (short replies keep training sequences within MAX_LEN tokens)."""
    text = text.strip().split("\n")[0]
    match = re.search(r"[.!?](\s|$)", text)
    return text[: match.end()].strip() if match else text


def base_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 40, batch: int = 11) -> list[str]:
    """Greedy replies of the base model, batched with left padding."""
    tokenizer.padding_side = "left"
    replies = []
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts[i: i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        replies += [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]
        print(f"   base replies: {len(replies)}/{len(prompts)}", flush=True)
    return replies


def training_base(model, tokenizer, regenerate: bool) -> list[Example]:
    if regenerate or not BASE_REPLIES.is_file():
        print("== generating the base model's replies to the training prompts")
        write_jsonl(BASE_REPLIES, [Example(p, r.strip()) for p, r in
                                   zip(PROMPTS, base_replies(model, tokenizer, PROMPTS))])
    return [Example(e.prompt, first_sentence(e.reply)) for e in read_jsonl(BASE_REPLIES)]


def adapter_replies(model, tokenizer, demo: Demo, folder: Path, prompts: list[str]) -> list[str]:
    """Replies with the saved adapter applied by its reference implementation (PEFT or the BitFit hooks)."""
    if demo.technique is Technique.BITFIT:
        from safetensors.torch import load_file

        modules = dict(model.named_modules())
        hooks = [modules[key.removesuffix(".bias")].register_forward_hook(lambda _m, _i, out, b=bias: out + b)
                 for key, bias in load_file(str(folder / "adapter_model.safetensors")).items()]
        try:
            return [basemodel.chat_reply(model, tokenizer, p) for p in prompts]
        finally:
            for h in hooks:
                h.remove()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder))
    # PEFT 0.21 + transformers 5.x: KV-cached generate with prompt tuning gets the first token right, then
    # garbles the rest ("Beepay start ..."); decoding without the cache gives PEFT's true greedy reply.
    cached, model.generation_config.use_cache = model.generation_config.use_cache, \
        demo.technique is not Technique.PROMPT_TUNING
    try:
        return [basemodel.chat_reply(peft_model, tokenizer, p) for p in prompts]
    finally:
        model.generation_config.use_cache = cached
        if demo.technique is not Technique.PROMPT_TUNING:
            peft_model.base_model.unload()


def train_bottleneck(demo: Demo, data: Path, adapters_python: str | None, threads: int) -> None:
    """Train with the `adapters` library in its venv, then import the saved folder into our format."""
    from hub.adapterhub_import import import_adapterhub

    src = ADAPTERS / "adapterhub-format" / demo.name
    if adapters_python:
        cmd = [adapters_python, str(HERE / "train_bottleneck_adapterhub.py"), "--data", str(data),
               "--base", basemodel.resolve(), "--out", str(src), "--name", demo.name, "--seed", str(SEED),
               "--held-out-json", json.dumps(HELD_OUT), "--threads", str(threads)]
        subprocess.run(cmd, check=True)
    elif not src.is_dir():
        sys.exit(f"{demo.name}: no {src}; pass --adapters-python (see this script's docstring)")
    else:
        print(f"   (no --adapters-python: importing the existing {src.relative_to(HERE.parent)})")
    dst = ADAPTERS / demo.name
    shutil.rmtree(dst, ignore_errors=True)
    import_adapterhub(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=[d.name for d in DEMOS], help="rebuild this adapter only")
    parser.add_argument("--regen-data", action="store_true", help="regenerate the base model's replies")
    parser.add_argument("--adapters-python", help="python of a venv with the `adapters` library (bottleneck)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 runs better on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    selected = [d for d in DEMOS if not args.only or d.name in args.only]
    # The bottleneck adapter trains in its own venv: this process needs the model only for the others.
    if args.regen_data or not BASE_REPLIES.is_file() or any(d.spec for d in selected):
        model, tokenizer = basemodel.load()
    else:
        model, tokenizer = None, None
    base = training_base(model, tokenizer, args.regen_data)
    base_held_out = [basemodel.chat_reply(model, tokenizer, p) for p in HELD_OUT] if model else []
    DATA.mkdir(exist_ok=True)
    for demo in selected:
        data = DATA / f"{demo.name}.jsonl"
        write_jsonl(data, [Example(e.prompt, demo.transform(e.reply)) for e in base])
        folder = ADAPTERS / demo.name
        print(f"\n== {demo.name}: {demo.technique.value}, {demo.task}")
        t = time.perf_counter()
        if demo.spec is None:
            train_bottleneck(demo, data, args.adapters_python, args.threads)
            print(f"   imported into {folder.relative_to(HERE.parent)} in {time.perf_counter() - t:.0f} s")
            continue
        examples = encode_chat(tokenizer, read_jsonl(data), demo.max_len)
        spec = demo.spec
        if demo.technique is Technique.PROMPT_TUNING:  # start from the instruction's embeddings (PEFT's TEXT init)
            spec = replace(spec, prompt_init_ids=tuple(tokenizer(PROMPT_INIT, add_special_tokens=False)["input_ids"]))
        shutil.rmtree(folder, ignore_errors=True)
        result = train_adapter(model, examples, spec, folder, base_model_id=BASE_ID,
                               pad_id=tokenizer.pad_token_id, log=lambda s: print(f"   {s}", flush=True))
        print(f"   {len(examples)} examples, {result.trainable_parameters} parameters, "
              f"loss {result.losses[0]:.3f} -> {sum(result.losses[-5:]) / 5:.3f} "
              f"in {time.perf_counter() - t:.0f} s")
        for prompt, before, after in zip(HELD_OUT, base_held_out,
                                         adapter_replies(model, tokenizer, demo, folder, HELD_OUT)):
            print(f"   >> {prompt}\n      base:    {before!r}\n      adapter: {after!r}")


if __name__ == "__main__":
    main()
