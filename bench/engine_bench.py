"""Engine benchmark: 16 rows, each a different LoRA, on the default base model, against PEFT.

Measures in one run, as ratios to the base model alone: a prefill of rows x tokens, and one decode
step of the same rows on a cache of that length, for this engine's mixed batch, PEFT's mixed batch
(`adapter_names`) and PEFT one request at a time (prefill only). All three run the base's linear layers on the same kernels (runtime/cpu_linear.py:
oneDNN in float32 on a CPU), so the ratios are the adapters' cost. Configurations are interleaved
(A B C A B C ...) and each figure is the median of --repeats. Then: a batch mixing all five
techniques, a batch of mixed ranks (8/16/64), and the resident bytes per adapter.

    .venv/bin/python bench/engine_bench.py                 # CPU, fp32 (the issue's set-up)
    .venv/bin/python bench/engine_bench.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import atexit
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub import basemodel  # noqa: E402
from hub.artifact import read_adapter  # noqa: E402
from runtime.cpu_linear import route_linears  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_random(peft_model, folder: Path, seed: int) -> Path:
    """Give the PEFT model's adapter random, non-trivial weights and save it (PEFT's own format)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                p.copy_(1 + 0.05 * noise if "ia3_l" in name else 0.02 * noise)
    peft_model.save_pretrained(folder)
    return folder


def make_peft(base, config, folder: Path, seed: int) -> Path:
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), config)
    return save_random(model, folder, seed)


def bottleneck_folder(base, folder: Path, seed: int = 99, size: int = 64, locations: tuple[str, ...] = ("ffn",),
                      **options) -> Path | None:
    """A bottleneck adapter in our format (default: Pfeiffer, after the feed-forward block; `options`: other
    BottleneckConfig fields), random weights from `seed`, if the technique is served."""
    from hub.artifact import Technique
    from runtime.techniques import REGISTRY

    if Technique.BOTTLENECK not in REGISTRY:
        return None
    import json

    from safetensors.torch import save_file

    from hub.bottleneck_format import BottleneckConfig

    hidden = base.config.hidden_size
    folder.mkdir(parents=True, exist_ok=True)
    config = BottleneckConfig(locations=locations, non_linearity=options.pop("non_linearity", "relu"),
                              hidden_size=hidden, bottleneck_size=size, **options)
    (folder / "adapter_config.json").write_text(json.dumps(config.to_dict()))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(base.config.num_hidden_layers):
        for location in locations:
            p = f"model.layers.{i}.{location}_adapter"
            tensors.update({f"{p}.down.weight": 0.02 * torch.randn(size, hidden, generator=gen),
                            f"{p}.down.bias": torch.zeros(size),
                            f"{p}.up.weight": 0.02 * torch.randn(hidden, size, generator=gen),
                            f"{p}.up.bias": torch.zeros(hidden)})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def timed(fn, sync) -> float:
    """Seconds `fn` took, or the seconds it returns: one that times itself keeps its set-up off the clock."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result if isinstance(result, float) else time.perf_counter() - start


def interleaved(configs: dict[str, callable], repeats: int, sync) -> dict[str, float]:
    """Median seconds per configuration (see `timed`), running them A B C A B C ... after one warm-up each."""
    for fn in configs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    for name, t in medians.items():
        print(f"  {name:<38} {t * 1000:9.1f} ms   {t / medians[baseline]:5.2f}x")


def kv_cache_steps(engine: Engine, rows: int, context: int, repeats: int, device: str, sync, steps: int = 16) -> None:
    """Decode steps on a long cache with transformers' DynamicCache (each step a torch.cat of every layer's
    whole cache) and with the engine's own (runtime/kvcache.py: written in place); the same rows, no adapters.
    Then the same steps with continuous batching's churn: a row leaves (a quarter in) and a row with an 8-token
    prompt joins (half-way), through runtime/kvcache.py's keep_rows/join_rows, which concatenate and index for
    transformers' layers, as runtime/generate.py did before, and move rows inside the buffers for the engine's.
    Each run starts from the same prefilled keys and values, and the joining row's prefill, built before the
    clock starts."""
    from transformers import DynamicCache

    from runtime.kvcache import join_rows, keep_rows, new_cache, pad_left

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 40000, (rows, context + steps), generator=gen).to(device)
    prompt = ids[:1, :8]
    with torch.inference_mode():
        prefilled = engine.forward(ids[:, :context], torch.ones_like(ids[:, :context]), [RowPlan()] * rows,
                                   last_only=True)[1]
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in prefilled.layers]
        joining = engine.forward(prompt, torch.ones_like(prompt), [RowPlan()], last_only=True)[1]
    del prefilled

    def fresh(kind: str):
        if kind == "dynamic":
            return DynamicCache(ddp_cache_data=kv)
        cache = new_cache(engine.model)
        for layer, (k, v) in zip(cache.layers, kv):
            layer.update(k, v)
        return cache

    last: dict[str, torch.Tensor] = {}

    def run(kind: str, churn: bool) -> float:
        cache = fresh(kind)
        mask = torch.ones(rows, context, dtype=torch.long, device=device)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(steps):
                if churn and s == steps // 4:
                    keep = [r for r in range(mask.shape[0]) if r != 1]
                    mask = mask[keep]
                    for layer in cache.layers:
                        keep_rows(layer, keep, 0)
                if churn and s == steps // 2:
                    width = mask.shape[1]
                    for layer, new in zip(cache.layers, joining.layers):
                        join_rows(layer, new, width, rows)
                    mask = torch.cat([mask, pad_left(torch.ones_like(prompt), width, 1)])
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                n = mask.shape[0]
                logits, cache = engine.forward(ids[:n, context + s:context + s + 1], mask, [RowPlan()] * n,
                                               cache=cache, last_only=True)
        sync()
        last[kind] = logits.float()
        return (time.perf_counter() - start) / steps

    names = {"dynamic": "transformers DynamicCache (torch.cat)", "grow": "runtime/kvcache.py (in place)"}
    for churn, title in ((False, f"KV cache: decode step ({rows} rows on a {context}-token cache, {steps} steps, "
                                 "no adapters)"),
                         (True, f"KV cache, churn: the same {steps} steps, a row leaving after {steps // 4} and "
                                f"one joining after {steps // 2} (8-token prompt, prefilled off the clock)")):
        medians = interleaved({names[kind]: (lambda kind=kind: run(kind, churn)) for kind in names}, repeats, sync)
        report(title, medians, names["dynamic"])
        print(f"  max |logits difference| after {steps} steps: "
              f"{(last['grow'] - last['dynamic']).abs().max().item():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-context", type=int, default=512, help="cached tokens per row for the KV cache steps")
    ap.add_argument("--base-model", default=basemodel.DEFAULT_BASE_MODEL, help="name or local folder")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig
    from transformers import DynamicCache

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    base, _ = basemodel.load(args.base_model, dtype=args.dtype, device=args.device)
    route_linears(base)  # the kernels the engine gives its base, for the base and PEFT too: ratios measure adapters
    rows, tokens = args.rows, args.tokens
    print(f"engine_bench: {args.base_model} {args.dtype} on {args.device} "
          f"({torch.get_num_threads()} threads), {rows} rows x {tokens} tokens, "
          f"{rows} distinct LoRAs r=8 on {','.join(TARGETS)}, median of {args.repeats}")
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random adapters are scratch
    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    from peft import get_peft_model

    shaper = get_peft_model(copy.deepcopy(base).cpu().float(), lora_cfg)
    folders = [save_random(shaper, tmp / f"lora{i}", i) for i in range(rows)]
    del shaper

    engine = Engine(copy.deepcopy(base))
    for i, f in enumerate(folders):
        engine.load(f"lora{i}", read_adapter(f))
    peft = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="lora0").eval()
    for i, f in enumerate(folders[1:], 1):
        peft.load_adapter(f, adapter_name=f"lora{i}")
    names = [f"lora{i}" for i in range(rows)]
    plans = [RowPlan((AdapterUse(n),)) for n in names]

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (rows, tokens), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    step_ids = torch.randint(100, 40000, (rows, 1), generator=gen).to(args.device)
    step_mask = torch.ones(rows, tokens + 1, dtype=torch.long, device=args.device)
    positions = torch.full((rows, 1), tokens, device=args.device)

    with torch.inference_mode():
        def prefill_base():
            base(ids, attention_mask=mask)

        def prefill_engine():
            engine.forward(ids, mask, plans, use_cache=False)

        def prefill_peft_mixed():
            peft(ids, attention_mask=mask, adapter_names=names)

        def prefill_peft_each():
            for i, n in enumerate(names):
                peft.set_adapter(n)
                peft(ids[i:i + 1], attention_mask=mask[i:i + 1])

        medians = interleaved({"base model alone": prefill_base, "this engine, mixed batch": prefill_engine,
                               "PEFT mixed batch (adapter_names)": prefill_peft_mixed,
                               "PEFT one request at a time": prefill_peft_each}, args.repeats, sync)
        report(f"prefill ({rows} x {tokens} tokens)", medians, "base model alone")

        def cache_of(model_call):
            layers = model_call().cache.layers
            kv = [(layer.keys, layer.values) for layer in layers]
            return lambda: DynamicCache(ddp_cache_data=kv)

        base_cache = cache_of(lambda: base(ids, attention_mask=mask, use_cache=True))
        engine_cache = cache_of(lambda: type("O", (), {"cache": engine.forward(ids, mask, plans)[1]}))
        peft_cache = cache_of(lambda: peft(ids, attention_mask=mask, adapter_names=names, use_cache=True))
        steps = {
            "base model alone": lambda c=base_cache: base(step_ids, attention_mask=step_mask, position_ids=positions,
                                                          cache=c(), use_cache=True),
            "this engine, mixed batch": lambda c=engine_cache: engine.forward(step_ids, step_mask, plans, cache=c()),
            "PEFT mixed batch (adapter_names)": lambda c=peft_cache: peft(
                step_ids, attention_mask=step_mask, position_ids=positions, cache=c(), use_cache=True,
                adapter_names=names),
        }
        report(f"decode step ({rows} rows on a {tokens}-token cache)", interleaved(steps, args.repeats, sync),
               "base model alone")

        # -- all five techniques in one batch; mixed ranks ------------------------------------------
        plain = copy.deepcopy(base).cpu().float()
        extra = {
            "ia3": make_peft(plain, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                              feedforward_modules=["down_proj"]), tmp / "ia3", 101),
            "prompt": make_peft(plain, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16), tmp / "pt", 102),
            "r16": make_peft(plain, LoraConfig(r=16, target_modules=TARGETS), tmp / "r16", 103),
            "r64": make_peft(plain, LoraConfig(r=64, target_modules=TARGETS), tmp / "r64", 104),
        }
        from safetensors.torch import save_file
        import json

        (tmp / "bitfit").mkdir()
        bias_modules = [f"model.layers.{i}.mlp.down_proj" for i in range(base.config.num_hidden_layers)]
        (tmp / "bitfit" / "adapter_config.json").write_text(json.dumps({"adapter_type": "bitfit",
                                                                         "target_modules": bias_modules}))
        save_file({f"{m}.bias": 0.01 * torch.randn(base.config.hidden_size) for m in bias_modules},
                  str(tmp / "bitfit" / "adapter_model.safetensors"))
        extra["bitfit"] = tmp / "bitfit"
        bottleneck = bottleneck_folder(plain, tmp / "bottleneck")
        if bottleneck is not None:
            extra["bottleneck"] = bottleneck
        for key, folder in extra.items():
            engine.load(key, read_adapter(folder))
        five = ["lora0", "ia3", "bitfit", "prompt"] + (["bottleneck"] if bottleneck is not None else [])
        mixed_plans = [RowPlan((AdapterUse(five[i % len(five)]),)) for i in range(rows)]
        ranks = ["lora0", "r16", "r64"]
        rank_plans = [RowPlan((AdapterUse(ranks[i % 3]),)) for i in range(rows)]
        r64_plans = [RowPlan((AdapterUse("r64"),))] * rows
        medians = interleaved({
            "base model alone": prefill_base,
            "all techniques (" + "/".join(five) + ")": lambda: engine.forward(ids, mask, mixed_plans, use_cache=False),
            "ranks 8/16/64 mixed": lambda: engine.forward(ids, mask, rank_plans, use_cache=False),
            "rank 64 on every row": lambda: engine.forward(ids, mask, r64_plans, use_cache=False),
        }, args.repeats, sync)
        report(f"prefill, other mixes ({rows} x {tokens} tokens)", medians, "base model alone")

    kv_cache_steps(engine, rows, args.kv_context, args.repeats, args.device, sync)

    print("\nresident bytes per adapter")
    for key, size in engine.resident().items():
        if key in ("lora0", *extra):
            print(f"  {key:<12} {size / 2**20:8.2f} MiB")


if __name__ == "__main__":
    main()
