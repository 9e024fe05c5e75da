"""End to end: 32 concurrent gRPC clients, each with a different LoRA, against the same server with no
adapters and against PEFT generating the same prompts in one batch; and cold vs warm adapter TTFT.

Two shapes of LoRA, each measured the same way in the same run (LORA_SHAPES):
- "q,v": r=8 on q_proj and v_proj, what PEFT's `LoraConfig()` targets on Llama-family models and what
  the demo adapters use (1.8 MiB each in fp32);
- "all": r=8 on all seven projections, the heavy case (9.3 MiB each): every decode step reads each
  row's adapter, 300 MB for 32 of them next to the base's 540 MB, and that is what it costs on a CPU.
Set-up: per shape, CLIENTS + COLD random LoRAs (written in PEFT's format) are pushed into a temp
registry; a real `hub serve` subprocess serves the default base from it.
Configurations run interleaved REPEATS times, the order rotated every repeat (A B C D E, B C D E A, ...) so
that none always follows PEFT's long batch; throughput is the median over repeats, and each ratio the
median (and range) of the per-repeat ratios, mixed and reference measured minutes apart at most:
- "server, N distinct LoRAs": N client threads (one channel each) stream one request each, every
  request naming a different, already resident LoRA, greedy, NEW_TOKENS tokens;
- "server, no adapters": the same N requests on the same server with no adapter (the reference);
- "PEFT, one batch": the same N prompts left-padded into one batch, `generate(adapter_names=...)`
  over a PeftModel holding the N LoRAs, in this process while the server idles (PEFT's mixed batch).
Tokens/s = tokens generated / wall time (first request sent -> last token received). TTFT is measured
at the client (request sent -> first streamed token); for PEFT, the batch's first token (a streamer).
Cold vs warm: one client, otherwise idle server: a request names a LoRA that is not resident (read from
the registry, checked against the base, loaded), then the same request again (resident); medians over
COLD pairs. Requests ask for 2 tokens and the next one is sent at the previous one's first token, so it
overlaps that request's last decode step (cold loads share the cores with it, warm requests wait for it).

    .venv/bin/python bench/e2e_bench.py            # ~10 min on 2 cores
    .venv/bin/python bench/e2e_bench.py --quick    # a smoke run, not figures
    .venv/bin/python bench/e2e_bench.py --dtype bfloat16   # both sides in bf16 (make bench's e2e-bf16 part)
    .venv/bin/python bench/e2e_bench.py --peft-linears onednn   # PEFT's base on the server's fp32 CPU kernels
    python bench/e2e_bench.py --device cuda --dtype bfloat16 --base-model DIR   # on a GPU machine
    python bench/e2e_bench.py ... --no-peft        # the server alone (PEFT's mixed batch is most of a run's time)
    .venv/bin/python bench/e2e_bench.py --http     # HTTP mode: the clients over HTTP vs gRPC (see run_frontends)
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from common import lora_template, median, percentile, script_parser, setup_logging, table, write_random_lora
from scale_bench import Server

from hub import basemodel  # noqa: E402  (common puts the repo on sys.path)
from hub.architectures import PROJECTIONS  # noqa: E402
from runtime.cpu_linear import route_linears  # noqa: E402

TOPICS = ("a lighthouse", "a robot", "the sea", "a city at night", "a dragon", "a garden", "a train", "the moon",
          "a library", "a storm", "a violin", "a desert", "a bakery", "a glacier", "a detective", "a forest",
          "a spaceship", "a river", "a mountain", "a market", "a clock", "a painter", "a bridge", "a volcano",
          "an island", "a castle", "a festival", "a snowfall", "a tiger", "a circus", "a harbor", "a comet")

# Random LoRA weights ~ N(0, scale^2). At common.py's 0.02, r=8 on all 210 projections moves SmolLM2 far
# enough that some prompts end at once (EOS); 0.005 keeps every request generating all its tokens, so
# every configuration produces the same token count. The cost of a LoRA does not depend on its values.
LORA_SCALE = 0.005
LORA_SHAPES = {"q,v": ("q_proj", "v_proj"), "all": PROJECTIONS}
SHAPE_NAMES = {"q,v": "r=8 on q_proj, v_proj", "all": "r=8 on all 7 projections"}
PEFT_LINEARS = {"torch": "torch's own, as shipped", "onednn": "oneDNN, as the server's (runtime/cpu_linear.py)"}


@dataclass
class E2EConfig:
    base_model: str = basemodel.DEFAULT_BASE_MODEL
    clients: int = 32
    new_tokens: int = 32
    repeats: int = 5
    cold: int = 12  # cold/warm pairs; with half as many the all-projection ratio moved a lot between runs
    rank: int = 8
    shapes: tuple[str, ...] = tuple(LORA_SHAPES)
    dtype: str = "float32"  # of the base, in the server and in PEFT alike
    device: str = "cpu"  # likewise ("cuda" on a GPU machine)
    peft_linears: str = "torch"  # PEFT's base linears: "torch" as shipped, or "onednn" as the server runs its base
    peft: bool = True  # False: the server's configurations only (no PEFT models built, no ratio to PEFT)


def prompts(tokenizer, n: int) -> list[list[int]]:
    """Story openings the base model continues for well past 32 tokens (no early end-of-sequence)."""
    return [tokenizer(f"Here is a long story about {TOPICS[i % len(TOPICS)]}. Once upon a time,")["input_ids"]
            for i in range(n)]


def run_clients(address: str, jobs: list[tuple[list[int], str | None]], new_tokens: int) -> dict[str, Any]:
    """One gRPC client thread (own channel) per job, all started together; tokens/s and per-request TTFT."""
    from runtime.client import RuntimeClient

    clients = [RuntimeClient(address, timeout=900) for _ in jobs]
    for client in clients:
        client.wait_ready()

    def stream(i: int) -> Iterator[int]:
        ids, ref = jobs[i]
        for chunk in clients[i].generate_stream(token_ids=ids, adapters=[ref] if ref else [],
                                                max_new_tokens=new_tokens):
            yield len(chunk.token_ids)

    try:
        return _concurrently(len(jobs), stream)
    finally:
        for client in clients:
            client.close()


def run_http_clients(url: str, jobs: list[tuple[list[int], str | None]], new_tokens: int) -> dict[str, Any]:
    """As run_clients, over the OpenAI-compatible HTTP API: one HTTP client (own connection) per job streaming
    `/v1/completions` (SSE), the same token ids, adapter (as `model`), greedy, NEW_TOKENS tokens."""
    import httpx2 as httpx  # the HTTP client the openai SDK uses

    clients = [httpx.Client(timeout=900) for _ in jobs]
    for client in clients:  # the connection is open before the clock starts, as the gRPC channels are
        client.get(f"{url}/models").raise_for_status()

    def stream(i: int) -> Iterator[int]:
        ids, ref = jobs[i]
        body = {"model": ref or "base", "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True}
        with clients[i].stream("POST", f"{url}/completions", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if "adapters" in chunk:  # the opening chunk, sent before any token
                    continue
                yield 0 if chunk["choices"][0]["finish_reason"] else 1  # the closing chunk carries no token

    try:
        return _concurrently(len(jobs), stream)
    finally:
        for client in clients:
            client.close()


def _concurrently(n: int, stream: Callable[[int], Iterator[int]]) -> dict[str, Any]:
    """n threads, all started together, each draining stream(i) (the new tokens of each chunk it receives);
    tokens/s over the wall time (first request sent -> last token received) and per-request TTFT."""
    ttfts: list[float] = []
    tokens = [0] * n
    errors: list[str] = []
    go = threading.Barrier(n + 1)

    def one(i: int) -> None:
        go.wait()
        start = time.perf_counter()
        try:
            for count in stream(i):
                if count and tokens[i] == 0:
                    ttfts.append(time.perf_counter() - start)
                tokens[i] += count
        except Exception as e:  # reported in the table, never silently dropped
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall, "ttfts": ttfts,
            "errors": errors}


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def peft_batch(peft_model, tokenizer, ids: list[list[int]], names: list[str], new_tokens: int) -> dict[str, Any]:
    """PEFT's mixed batch: the prompts left-padded into one batch, each row its own adapter."""
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=peft_model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=peft_model.device)
    streamer = _FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, do_sample=False,
                                  max_new_tokens=new_tokens, pad_token_id=pad, streamer=streamer)
    if input_ids.is_cuda:  # the last step's kernels may still run
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    eos = tokenizer.eos_token_id
    tokens = sum(int(((row != pad) & (row != eos)).sum()) for row in out[:, width:])
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttfts": [streamer.at - start] * len(ids), "errors": []}


def cold_and_warm(address: str, ids: list[int], refs: list[str]) -> dict[str, list[float]]:
    """TTFT of a request naming a non-resident adapter, then of the same request again (resident)."""
    from runtime.client import RuntimeClient

    out: dict[str, list[float]] = {"cold": [], "warm": []}
    with RuntimeClient(address, timeout=900) as client:
        for ref in refs:
            for kind in ("cold", "warm"):
                start = time.perf_counter()
                for chunk in client.generate_stream(token_ids=ids, adapters=[ref], max_new_tokens=2):
                    if chunk.token_ids or chunk.finish_reason:
                        out[kind].append(time.perf_counter() - start)
                        break
    return out


def run_e2e(config: E2EConfig, log=print) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        return _run(config, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(config: E2EConfig, workdir: Path, log) -> dict[str, Any]:
    from hub.registry import Registry
    from runtime.client import RuntimeClient

    model, tokenizer = basemodel.load(config.base_model, dtype=config.dtype, device=config.device)
    if config.peft_linears == "onednn":
        route_linears(model)  # PEFT's copies of the base get the server's kernels: only adapter handling differs
    registry = Registry(workdir / "registry")
    ids = prompts(tokenizer, config.clients)
    names = [f"a{i:02d}" for i in range(config.clients)]
    sets = {shape: _lora_set(model, registry, workdir / shape.replace(",", ""), shape, config, log)
            for shape in config.shapes}
    server = Server(["--base-model", config.base_model, "--port", "0", "--registry", str(registry.root),
                     "--max-batch-size", str(config.clients), "--grace", "10", "--dtype", config.dtype,
                     "--device", config.device],
                    workdir / "server.log", 600)
    try:
        with RuntimeClient(server.address, timeout=900) as client:
            for served, _, _ in sets.values():  # the mixed configurations measure serving, not loading
                for ref in served:
                    client.load_adapter(ref)
        configs: dict[str, Any] = {}
        for shape, (served, _, _) in sets.items():
            configs[f"server, {config.clients} distinct LoRAs ({shape})"] = \
                lambda served=served: run_clients(server.address, list(zip(ids, served)), config.new_tokens)
        configs["server, no adapters"] = lambda: run_clients(server.address, [(r, None) for r in ids],
                                                             config.new_tokens)
        for shape, (_, _, peft_model) in sets.items() if config.peft else ():
            configs[f"PEFT, one batch, adapter_names ({shape})"] = \
                lambda peft_model=peft_model: peft_batch(peft_model, tokenizer, ids, names, config.new_tokens)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for name, fn in configs.items():  # warm-up, not measured
            log(f"e2e: warm-up, {name}: {fn()['tokens_per_s']:.1f} tok/s")
        order = list(configs)
        for r in range(config.repeats):
            for name in order[r % len(order):] + order[:r % len(order)]:
                runs[name].append(configs[name]())
                log(f"e2e: repeat {r + 1}/{config.repeats}, {name}: {runs[name][-1]['tokens_per_s']:.1f} tok/s")
        cold = {shape: cold_and_warm(server.address, ids[0], cold_refs) for shape, (_, cold_refs, _) in sets.items()}
    finally:
        exit_code = server.stop()
    result = {"config": {**vars(config), "shapes": list(config.shapes)}, "runs": runs, "cold_warm": cold,
              "server_exit_code": exit_code}
    result["table"] = render(config, result)
    log(result["table"])
    return result


def run_frontends(config: E2EConfig, log=print) -> dict[str, Any]:
    """HTTP mode: CLIENTS concurrent streaming clients, each naming its own resident LoRA (r=8 on q_proj,
    v_proj: the frontend's cost does not depend on the adapter's shape), over HTTP and over gRPC against one
    server, interleaved REPEATS times (the order swapped every repeat)."""
    from hub.registry import Registry
    from runtime.client import RuntimeClient

    workdir = Path(tempfile.mkdtemp(prefix="bench-frontends-"))
    try:
        model, tokenizer = basemodel.load(config.base_model, dtype=config.dtype, device=config.device)
        registry = Registry(workdir / "registry")
        ids = prompts(tokenizer, config.clients)
        served, _, _ = _lora_set(model, registry, workdir / "qv", "q,v", replace(config, cold=0, peft=False), log)
        del model
        server = Server(["--base-model", config.base_model, "--port", "0", "--http-port", "0", "--registry",
                         str(registry.root), "--max-batch-size", str(config.clients), "--grace", "10", "--dtype",
                         config.dtype, "--device", config.device], workdir / "server.log", 600)
        try:
            with RuntimeClient(server.address, timeout=900) as client:
                for ref in served:
                    client.load_adapter(ref)
            jobs = list(zip(ids, served))
            configs = {"gRPC": lambda: run_clients(server.address, jobs, config.new_tokens),
                       "HTTP": lambda: run_http_clients(server.http, jobs, config.new_tokens)}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
            for name, fn in configs.items():  # warm-up, not measured
                log(f"frontends: warm-up, {name}: {fn()['tokens_per_s']:.1f} tok/s")
            for r in range(config.repeats):
                for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                    runs[name].append(configs[name]())
                    log(f"frontends: repeat {r + 1}/{config.repeats}, {name}: "
                        f"{runs[name][-1]['tokens_per_s']:.1f} tok/s")
        finally:
            exit_code = server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"config": {**vars(config), "shapes": ["q,v"]}, "runs": runs, "server_exit_code": exit_code}
    result["table"] = render_frontends(config, runs)
    log(result["table"])
    return result


def render_frontends(config: E2EConfig, runs: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for name, rs in runs.items():
        ttfts = [t for r in rs for t in r["ttfts"]]
        rows.append([name, f"{median(r['tokens_per_s'] for r in rs):.1f} tok/s", f"{median(r['tokens'] for r in rs):.0f}",
                     f"{percentile(ttfts, 50) * 1000:.0f} ms", f"{percentile(ttfts, 95) * 1000:.0f} ms",
                     str(sum(len(r["errors"]) for r in rs))])
    ttft_ratios = [percentile(h["ttfts"], 50) / percentile(g["ttfts"], 50) for h, g in zip(runs["HTTP"], runs["gRPC"])]
    title = (f"Frontends: {config.clients} concurrent streaming clients, each its own LoRA ({SHAPE_NAMES['q,v']}), "
             f"{config.new_tokens} new tokens each, {config.base_model} {config.dtype} on {config.device} "
             f"(median of {config.repeats}, interleaved)")
    lines = [title] + ["  " + line for line in table(["frontend", "throughput", "tokens", "TTFT p50", "TTFT p95",
                                                      "errors"], rows).splitlines()]
    lines.append(f"HTTP / gRPC, per-repeat ratios, median [min-max]: throughput {paired(runs['HTTP'], runs['gRPC'])} "
                 f"(target >= 0.95x), TTFT p50 {median(ttft_ratios):.2f}x [{min(ttft_ratios):.2f}-"
                 f"{max(ttft_ratios):.2f}] (target <= 1.1x)")
    return "\n".join(lines)


def _lora_set(model, registry, folder: Path, shape: str, config: E2EConfig, log) -> tuple[list[str], list[str], Any]:
    """CLIENTS + COLD random LoRAs of one shape pushed to the registry: (served refs, cold refs, PEFT model
    holding the served ones as a00, a01, ...)."""
    from peft import PeftModel

    total = config.clients + config.cold
    log(f"e2e: writing and pushing {total} random LoRAs ({SHAPE_NAMES[shape]})")
    lora_config, shapes = lora_template(model, folder / "template", targets=LORA_SHAPES[shape], r=config.rank)
    folders = [write_random_lora(folder / f"lora{i:02d}", lora_config, shapes, seed=i, scale=LORA_SCALE)
               for i in range(total)]
    tag = shape.replace(",", "")
    refs = [registry.push(f, f"e2e-{tag}-{i:02d}", "1.0.0", base_model=config.base_model).ref
            for i, f in enumerate(folders)]
    if not config.peft:
        return refs[:config.clients], refs[config.clients:], None
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="a00")
    for i in range(1, config.clients):
        peft_model.load_adapter(str(folders[i]), adapter_name=f"a{i:02d}")
    return refs[:config.clients], refs[config.clients:], peft_model.eval()


def paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """Tokens/s ratios of two configurations repeat by repeat: 'median [min-max]'."""
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, reference)]
    return f"{median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def render(config: E2EConfig, result: dict[str, Any]) -> str:
    runs = result["runs"]
    rate = {name: median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    base = rate["server, no adapters"]
    rows = []
    for name, rs in runs.items():
        ttfts = [t for r in rs for t in r["ttfts"]]
        errors = sum(len(r["errors"]) for r in rs)
        rows.append([name, f"{rate[name]:.1f} tok/s", f"{median(r['tokens'] for r in rs):.0f}",
                     f"{percentile(ttfts, 50) * 1000:.0f} ms", f"{percentile(ttfts, 95) * 1000:.0f} ms",
                     f"{rate[name] / base:.2f}x", str(errors)])
    title = (f"End to end: {config.clients} concurrent gRPC clients, {config.new_tokens} new tokens each, "
             f"{config.base_model} {config.dtype} on {config.device} (median of {config.repeats}, interleaved; "
             + (f"PEFT's base linears: {PEFT_LINEARS[config.peft_linears]})" if config.peft else "PEFT not run)"))
    lines = [title] + ["  " + line for line in table(["configuration", "throughput", "tokens", "TTFT p50",
                                                      "TTFT p95", "vs no adapters", "errors"], rows).splitlines()]
    for shape in config.shapes:
        mixed = runs[f"server, {config.clients} distinct LoRAs ({shape})"]
        vs_base = paired(mixed, runs["server, no adapters"])
        peft = runs.get(f"PEFT, one batch, adapter_names ({shape})")
        vs_peft = f"{paired(mixed, peft)} PEFT's mixed batch (target >= 3x)" if peft else "PEFT not run (--no-peft)"
        lines += ["", f"LoRAs {shape} ({SHAPE_NAMES[shape]}), per-repeat ratios, median [min-max]: mixed-adapter "
                      f"throughput {vs_base} the no-adapter server (target >= 0.85x), {vs_peft}"]
    if not config.cold:  # --cold 0: the cold/warm measurement was not asked for
        return "\n".join(lines)
    cold_rows, verdicts = [], []
    for shape, measured in result["cold_warm"].items():
        cold, warm = median(measured["cold"]), median(measured["warm"])
        cold_rows += [[f"{shape}: warm (resident)", f"{warm * 1000:.0f} ms"],
                      [f"{shape}: cold (registry -> device)", f"{cold * 1000:.0f} ms"],
                      [f"{shape}: cold / warm", f"{cold / warm:.2f}x"]]
        verdicts.append(f"{shape} {'met' if cold <= 1.5 * warm else 'NOT met'}")
    lines += ["", f"Cold vs warm adapter TTFT (one client, otherwise idle server, median of {config.cold})",
              "  " + "\n  ".join(table(["adapter", "TTFT"], cold_rows).splitlines()),
              f"Target: cold within 1.5x warm: {', '.join(verdicts)}"]
    return "\n".join(lines)


def main() -> None:
    defaults = E2EConfig()

    def add(ap) -> None:
        for name in ("clients", "new_tokens", "repeats", "cold", "rank"):
            ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
        ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults.dtype,
                        help="the base's dtype, in the server and in PEFT")
        ap.add_argument("--device", default=defaults.device, help="cpu or cuda, in the server and in PEFT")
        ap.add_argument("--peft-linears", choices=tuple(PEFT_LINEARS), default=defaults.peft_linears,
                        help="PEFT's base linear layers: torch's own (as users run PEFT) or oneDNN like the server's")
        ap.add_argument("--no-peft", action="store_true", help="the server's configurations only (no PEFT batch)")
        ap.add_argument("--http", action="store_true",
                        help="HTTP mode: the same streaming clients over HTTP and over gRPC, against one server")

    args = script_parser(__doc__, add).parse_args()
    setup_logging()
    config = E2EConfig(base_model=args.base_model, clients=args.clients, new_tokens=args.new_tokens,
                       repeats=args.repeats, cold=args.cold, rank=args.rank, dtype=args.dtype,
                       device=args.device, peft_linears=args.peft_linears, peft=not args.no_peft)
    if args.quick:
        config.clients, config.new_tokens, config.repeats, config.cold, config.shapes = 4, 8, 1, 2, ("q,v",)
    if args.http:
        run_frontends(config)
    else:
        run_e2e(config)


if __name__ == "__main__":
    main()
