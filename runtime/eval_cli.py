"""`hub eval`: the completion loss (or perplexity, or multiple-choice accuracy) of several registry versions and
the bare base on one JSONL file, in one batched pass through the multi-adapter engine (in-process).

The data is read and tokenized as `hub train` reads it (hub/train.py), so a validation file scores the same
tokens here as during training.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hub.artifact import ArtifactError
from hub.basemodel import BaseModelError
from hub.errors import HubError
from hub.registry import Registry, open_registry

if TYPE_CHECKING:  # hub.train imports torch: loaded when an evaluation starts, not when `hub` starts
    from hub.train import Example, TokenExample

METRICS = ("loss", "perplexity", "accuracy", "exact_match", "contains")
GENERATED = ("exact_match", "contains")  # metrics on greedy replies
BASE = "(base)"


@dataclass(frozen=True)
class Question:
    """A multiple-choice row: the prompt, the candidate replies, the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int


def parse_question(row: object) -> Question:
    """One `--metric accuracy` row; ValueError says what is wrong with it."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("choices"), list):
        choices, answer = row["choices"], row.get("answer")
        if len(choices) >= 2 and all(isinstance(c, str) and c for c in choices) and isinstance(answer, int) \
                and not isinstance(answer, bool) and 0 <= answer < len(choices):
            return Question(row["prompt"], tuple(choices), answer)
    raise ValueError('expected {"prompt": str, "choices": [two or more non-empty str], '
                     '"answer": index of the right one}')


def parse_completion(row: object) -> Example:
    """One row for a metric on generations: a prompt and the reply expected."""
    from hub.train import Example, parse_row

    example = parse_row(row)
    if not isinstance(example, Example):
        raise ValueError('exact_match and contains take {"prompt": str, "completion": str} rows')
    return example


def evaluate(registry: Registry, refs: list[str], data: Path, metric: str, base_model: str | None,
             with_base: bool = True, batch_size: int = 16, max_len: int = 256, max_new_tokens: int = 48) -> list[dict]:
    """One result per version (and the base first, unless `with_base` is off): ref, metric, value and n
    (reply tokens for loss and perplexity, rows otherwise)."""
    from hub import basemodel
    from hub.train import TrainError, encode_chat, parse_row, read_jsonl
    from runtime.engine import Engine
    from runtime.plan import AdapterUse, RowPlan

    if metric not in METRICS:
        raise TrainError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    manifests = [registry.resolve(ref) for ref in refs]
    bases = sorted({m.base_model.id for m in manifests} - {None})
    if base_model is None and len(bases) != 1:
        raise HubError(f"the versions were pushed for {', '.join(bases) or 'no named base model'}: give --base-model")
    parser = {"accuracy": parse_question, "exact_match": parse_completion, "contains": parse_completion}
    rows = read_jsonl(data, parser.get(metric, parse_row))
    model, tokenizer = basemodel.load(base_model or basemodel.embedded_name(bases[0]))
    engine = Engine(model, tokenizer)
    plans = {BASE: RowPlan()} if with_base else {}
    for m in manifests:
        engine.load(m.ref, registry.read(m))
        plans[m.ref] = RowPlan((AdapterUse(m.ref),))
    if metric == "accuracy":
        values = _accuracy(engine, tokenizer, rows, list(plans.values()), batch_size)
    elif metric in GENERATED:
        values = _generated(engine, tokenizer, rows, list(plans.values()), metric, batch_size, max_new_tokens)
    else:
        values = _loss(engine, encode_chat(tokenizer, rows, max_len), list(plans.values()), batch_size)
        values = [(loss if metric == "loss" else math.exp(loss), n) for loss, n in values]
    return [{"ref": ref, "metric": metric, "value": value, "n": n} for ref, (value, n) in zip(plans, values)]


def _loss(engine, examples: list[TokenExample], plans: list, batch_size: int) -> list[tuple[float, int]]:
    """Per plan: (mean NLL of the reply tokens, their count). Example-major order: each batch holds the rows
    of every plan for a few examples."""
    from runtime.evaluate import Item, completion_nll

    items = [Item(plan, e.prompt_ids, e.reply_ids) for e in examples for plan in plans]
    scores = completion_nll(engine, items, batch_size)
    sums = [tuple(sum(x) for x in zip(*scores[k::len(plans)])) for k in range(len(plans))]
    return [(nll / n, n) for nll, n in sums]


def _accuracy(engine, tokenizer, questions: list[Question], plans: list, batch_size: int) -> list[tuple[float, int]]:
    """Per plan: (the share of questions whose right choice has the highest log-likelihood, questions), as
    evaluation harnesses score multiple choice (summed log-likelihood of each choice's tokens)."""
    from hub.train import chat_context, text_ids
    from runtime.evaluate import Item, completion_nll

    items = [Item(plan, chat_context(tokenizer, [{"role": "user", "content": q.prompt}]), text_ids(tokenizer, c))
             for q in questions for plan in plans for c in q.choices]
    nll = iter(completion_nll(engine, items, batch_size))
    right = [0] * len(plans)
    for q in questions:
        for k in range(len(plans)):
            scores = [next(nll)[0] for _ in q.choices]
            right[k] += scores.index(min(scores)) == q.answer
    return [(r / len(questions), len(questions)) for r in right]


def _generated(engine, tokenizer, rows: list[Example], plans: list, metric: str, batch_size: int,
               max_new_tokens: int) -> list[tuple[float, int]]:
    """Per plan: (the share of greedy replies equal to / containing the expected one, stripped; rows)."""
    from hub.train import chat_context
    from runtime.evaluate import greedy_replies

    prompts = [(plan, chat_context(tokenizer, [{"role": "user", "content": e.prompt}])) for e in rows for plan in plans]
    replies = iter(greedy_replies(engine, prompts, max_new_tokens, batch_size))
    hits = [0] * len(plans)
    for e in rows:
        for k in range(len(plans)):
            reply, want = next(replies).strip(), e.reply.strip()
            hits[k] += reply == want if metric == "exact_match" else want in reply
    return [(h / len(rows), len(rows)) for h in hits]


def eval_command(
    refs: list[str] = typer.Argument(..., help="Versions to evaluate (name, name@1.2.0, name@tag)."),
    data: Path = typer.Option(..., "--data", help='JSONL: {"prompt", "completion"} or {"messages": [...]} rows.'),
    metric: str = typer.Option("loss", "--metric", help=(
        'loss or perplexity (on the completions); accuracy (rows {"prompt", "choices": [...], "answer": index}: '
        "the likeliest choice); exact_match or contains (greedy replies against the completion).")),
    base_model: str | None = typer.Option(None, "--base-model", help="Default: the base the versions were pushed for."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the bare base model out."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward (of mixed versions)."),
    max_len: int = typer.Option(256, "--max-len", min=2, help="Longer examples are dropped."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="exact_match, contains: reply length."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME)."),
) -> None:
    """Evaluate versions (and the bare base) on a JSONL file in one batched pass."""
    from hub.train import TrainError

    try:
        results = evaluate(open_registry(registry), refs, data, metric, base_model, not no_base, batch_size, max_len,
                           max_new_tokens)
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
