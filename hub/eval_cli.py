"""`hub eval`: the completion loss (or perplexity) of several registry versions and the bare base on one
JSONL file, in one batched pass through the multi-adapter engine (in-process).

The data is read and tokenized as `hub train` reads it (hub/train.py), so a validation file scores the same
tokens here as during training.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from hub.artifact import ArtifactError
from hub.basemodel import BaseModelError
from hub.errors import HubError
from hub.registry import Registry, open_registry
from hub.train import TrainError

METRICS = ("loss", "perplexity")
BASE = "(base)"


def evaluate(registry: Registry, refs: list[str], data: Path, metric: str, base_model: str | None,
             with_base: bool = True, batch_size: int = 16, max_len: int = 256) -> list[dict]:
    """One result per version (and the base first, unless `with_base` is off): ref, metric, value, n (tokens)."""
    from hub import basemodel
    from hub.train import encode_chat, read_jsonl
    from runtime.engine import Engine
    from runtime.evaluate import Item, completion_nll
    from runtime.plan import AdapterUse, RowPlan

    if metric not in METRICS:
        raise TrainError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    manifests = [registry.resolve(ref) for ref in refs]
    bases = sorted({m.base_model.id for m in manifests} - {None})
    if base_model is None and len(bases) != 1:
        raise HubError(f"the versions were pushed for {', '.join(bases) or 'no named base model'}: give --base-model")
    rows = read_jsonl(data)
    model, tokenizer = basemodel.load(base_model or basemodel.embedded_name(bases[0]))
    examples = encode_chat(tokenizer, rows, max_len)
    engine = Engine(model, tokenizer)
    plans = {BASE: RowPlan()} if with_base else {}
    for m in manifests:
        engine.load(m.ref, registry.read(m))
        plans[m.ref] = RowPlan((AdapterUse(m.ref),))
    # example-major order: each batch holds the rows of every version for a few examples
    items = [Item(plan, e.prompt_ids, e.reply_ids) for e in examples for plan in plans.values()]
    scores = completion_nll(engine, items, batch_size)
    results = []
    for k, ref in enumerate(plans):
        nll, n = (sum(x) for x in zip(*scores[k::len(plans)]))
        loss = nll / n
        results.append({"ref": ref, "metric": metric, "value": loss if metric == "loss" else math.exp(loss), "n": n})
    return results


def eval_command(
    refs: list[str] = typer.Argument(..., help="Versions to evaluate (name, name@1.2.0, name@tag)."),
    data: Path = typer.Option(..., "--data", help='JSONL: {"prompt", "completion"} or {"messages": [...]} rows.'),
    metric: str = typer.Option("loss", "--metric", help="loss or perplexity (on the completions)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Default: the base the versions were pushed for."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the bare base model out."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward (of mixed versions)."),
    max_len: int = typer.Option(256, "--max-len", min=2, help="Longer examples are dropped."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME)."),
) -> None:
    """Evaluate versions (and the bare base) on a JSONL file in one batched pass."""
    try:
        results = evaluate(open_registry(registry), refs, data, metric, base_model, not no_base, batch_size, max_len)
    except (TrainError, HubError, ArtifactError, BaseModelError, OSError) as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(results, indent=1))
        return
    width = max(len(r["ref"]) for r in results)
    for r in results:
        typer.echo(f"{r['ref'].ljust(width)}  {r['metric']} {r['value']:.4f}  ({r['n']} tokens)")


def register(app: typer.Typer) -> None:
    """Mount `hub eval` on the hub CLI."""
    app.command("eval")(eval_command)
