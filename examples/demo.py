"""`make demo`: the registry and the runtime on the default base model, with the demo adapters.

1. `hub list` on the repository's own registry (the demo adapters ship in examples/adapters/),
   then `hub pull` them into the local registry ($HUB_HOME), every file's sha256 checked.
2. `hub serve` on a free localhost port (the default base model, fp32, CPU).
3. The same prompt answered by the base and by each adapter (sent together: they share batch steps).
4. One request stacking two adapters; one per-request TIES merge of two LoRAs.
   One adapter asked through the OpenAI-compatible HTTP API with the `openai` SDK (`--http-port`).
5. One batch in which every row uses a different adapter, timed beside the same batch on the base alone.
6. `hub eval --server`: each adapter's greedy replies to held-out prompts checked for each style's marker
   (one pass per marker, every adapter and the base in it); the results become evaluation records.
7. SIGTERM: the server finishes what is in flight and exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUB = [sys.executable, "-m", "hub"]
PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 32
HELD_OUT = [PROMPT, "Give me one tip for writing clear code.", "Why do cats purr?"]  # not in the training data
MARKERS = {"pirate-ia3": "Arr matey!", "robot-prompt": "Beep boop!", "answer-bitfit": "Answer:",
           "json-lora": '{"answer"'}  # what each adapter's replies start with


def say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def hub(*args: str) -> str:
    """Run a `hub` command as a user would; stop the demo with its one-line error if it fails."""
    print(f"$ hub {' '.join(args)}", flush=True)
    out = subprocess.run([*HUB, *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"demo: `hub {' '.join(args)}` failed: {out.stderr.strip()}")
    return out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show(label: str, reply) -> None:
    used = ", ".join(f"{a.ref} ({a.sha256[:10]})" for a in reply.adapters) or "none"
    print(f"-- {label}   [adapters: {used}]")
    print("   " + reply.text.strip().replace("\n", "\n   "), flush=True)


def openai_sdk(port: int, ref: str) -> None:
    """One adapter through the OpenAI-compatible HTTP API, as any `openai` SDK user would ask it."""
    from openai import OpenAI

    say(f"the same server over HTTP with the `openai` SDK: model={ref!r}")
    with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600) as sdk:
        reply = sdk.chat.completions.create(model=ref, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=MAX_NEW_TOKENS, temperature=0)
    used = ", ".join(f"{a['ref']} ({a['sha256'][:10]})" for a in reply.model_extra["adapters"])
    print(f"-- {reply.model} over HTTP   [adapters: {used}; {reply.usage.completion_tokens} tokens]")
    print("   " + (reply.choices[0].message.content or "").strip().replace("\n", "\n   "), flush=True)


def main() -> None:
    from runtime.client import RuntimeClient
    from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

    say("the repository's registry (registry.json): the demo adapters")
    print(hub("list", "--registry", "."), end="")
    demo = json.loads(hub("list", "--registry", ".", "--json"))
    refs = [f"{m['name']}@{m['version']}" for m in demo]
    say(f"pull them into the local registry ({os.environ.get('HUB_HOME', '~/.cache/adapterhub')})")
    for ref in refs:
        hub("pull", ref, "--from", str(REPO))
    techniques = {f"{m['name']}@{m['version']}": m["technique"] for m in demo}

    port, http_port = free_port(), free_port()
    say(f"start `hub serve` on 127.0.0.1:{port}, HTTP API on 127.0.0.1:{http_port} (default base model, fp32, CPU)")
    server = subprocess.Popen([*HUB, "serve", "--port", str(port), "--http-port", str(http_port), "--max-batch-size",
                               "32", "--log-format", "off"], cwd=REPO)  # the demo prints its own account of each request
    try:
        with RuntimeClient(f"127.0.0.1:{port}", timeout=600) as client:
            client.wait_ready(timeout=300)
            while client.health() != "SERVING":
                time.sleep(0.2)
            info = client.info()
            print(f"   serving {info.base_model_id} ({info.dtype} on {info.device}); techniques: "
                  f"{', '.join(info.techniques)}", flush=True)

            def ask(adapters, prompt: str = PROMPT, **kw):
                return client.generate(prompt, chat=True, adapters=adapters, max_new_tokens=MAX_NEW_TOKENS, **kw)

            say(f"one prompt, the base and each adapter, sent together: {PROMPT!r}")
            with ThreadPoolExecutor(len(refs) + 1) as pool:
                replies = list(pool.map(ask, [[]] + [[r] for r in refs]))
            show("base model", replies[0])
            for ref, reply in zip(refs, replies[1:]):
                show(f"{ref} ({techniques[ref]})", reply)

            loras = [r for r in refs if techniques[r] == "lora"]
            others = [r for r in refs if techniques[r] != "lora"]
            if loras and others:
                pair = [loras[0], others[0]]
                say(f"stacking two adapters in one request: {pair[0]} + {pair[1]}")
                show(" + ".join(pair), ask(pair))
            if len(loras) >= 2:
                say(f"a per-request TIES merge (on the full deltas: ties_svd) of {loras[0]} and {loras[1]}"
                    " (built once, cached, served)")
                merge = pb.MergeOptions(method="ties_svd", density=0.5, majority_sign="total")
                show("ties_svd merge", ask([(loras[0], 1.0), (loras[1], 1.0)], mode="merge", merge=merge))

            openai_sdk(http_port, refs[0])

            prompts = ["Name a primary colour.", "What is 2 + 2?", "Say hello to a friend.", "Name a fruit.",
                       "What do bees make?", "Name a planet.", "What is ice made of?", "Name a big animal."]
            rows = [(prompts[i % len(prompts)], [refs[i % len(refs)]]) for i in range(max(8, len(refs)))]
            tokens = 16
            say(f"one batch of {len(rows)} requests, each row a different adapter, vs the same batch on the base alone")

            def batch(with_adapters: bool) -> float:
                start = time.perf_counter()
                with ThreadPoolExecutor(len(rows)) as pool:
                    list(pool.map(lambda r: client.generate(r[0], chat=True, adapters=r[1] if with_adapters else [],
                                                           max_new_tokens=tokens), rows))
                return time.perf_counter() - start

            base_s, mixed_s = batch(False), batch(True)
            print(f"   base alone: {base_s:.2f} s   mixed adapters: {mixed_s:.2f} s   ratio {mixed_s / base_s:.2f}x "
                  f"({len(rows)} rows x {tokens} new tokens, one run on this machine)", flush=True)
            print(hub("adapters", "--server", f"127.0.0.1:{port}"), end="")
            evaluate(refs, f"127.0.0.1:{port}")
    finally:
        say("SIGTERM: finish in-flight work, exit 0")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        print(f"   hub serve exited with {code}")
    if code != 0:
        sys.exit(code)


def evaluate(refs: list[str], server: str) -> None:
    """Which adapters' greedy replies contain each style's marker, on prompts held out of training."""
    import tempfile

    say("hub eval on the server: share of held-out replies containing each style's marker "
        "(recorded on each version: hub show, hub list --sort contains)")
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, marker in MARKERS.items():
            data = Path(tmp) / f"{name}.jsonl"
            data.write_text("".join(json.dumps({"prompt": p, "completion": marker}) + "\n" for p in HELD_OUT))
            results = json.loads(hub("eval", *refs, "--data", str(data), "--metric", "contains", "--max-new-tokens",
                                     "12", "--server", server, "--json"))
            for r in results:
                table.setdefault(r["ref"], {})[marker] = r["value"]
    width = max(len(ref) for ref in table)
    print("   " + " " * width + "".join(f"  {m:>10}" for m in MARKERS.values()))
    for ref, row in table.items():
        print("   " + ref.ljust(width) + "".join(f"  {row[m]:>10.2f}" for m in MARKERS.values()), flush=True)


if __name__ == "__main__":
    main()
