"""`hub eval` and `hub compare`: the completion loss (or perplexity, multiple-choice accuracy, exact match or
"contains" of greedy replies) of several registry versions and the bare base on one data file, in one batched
pass through the multi-adapter engine, in-process or on a running server (`--server`).

The data is read and tokenized as `hub train` reads it (hub/train.py), so a validation file scores the same
tokens here as during training. `hub eval` appends its results to each version's evaluation records
(hub/evals.py); `hub compare` records nothing.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import typer

from hub.artifact import ArtifactError
from hub.basemodel import BaseModelError
from hub.errors import HubError
from hub.evals import METRICS, better
from hub.registry import Registry, open_registry

if TYPE_CHECKING:  # hub.train imports torch: loaded when an evaluation starts, not when `hub` starts
    from hub.train import Example, TokenExample
    from runtime.eval_server import ServerScorer
    from runtime.evaluate import EngineScorer

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


def choice_parser(choices: tuple[str, ...]):
    """`--choices A,B,...`: each {"prompt", "completion"} row is a question over these choices, its completion
    the right one."""
    def parse(row: object) -> Question:
        example = parse_completion(row)
        if example.reply not in choices:
            raise ValueError(f"the completion {example.reply!r} is none of --choices {', '.join(choices)}")
        return Question(example.prompt, choices, choices.index(example.reply))
    return parse


def parse_completion(row: object) -> Example:
    """One row for a metric on generations: a prompt and the reply expected."""
    from hub.train import Example, parse_row

    example = parse_row(row)
    if not isinstance(example, Example):
        raise ValueError('exact_match and contains take {"prompt": str, "completion": str} rows')
    return example


@dataclass
class Outcome:
    """One version's (or the base's) result on one metric, with each example's own result for `hub compare`:
    {"loss"} per reply, {"choice", "right"} per question, {"reply", "hit"} per generated row."""

    ref: str
    metric: str
    value: float
    n: int
    examples: list[dict] = field(repr=False)

    def to_dict(self) -> dict:
        return {"ref": self.ref, "metric": self.metric, "value": self.value, "n": self.n}


class Evaluation:
    """Versions (and the base) made ready to evaluate once, in-process or on a server, for one metric after
    another: the registry manifests, the tokenizer, and a scorer keyed by ref (None: the base)."""

    def __init__(self, registry: Registry, refs: list[str], base_model: str | None, with_base: bool = True,
                 batch_size: int = 16, server: str | None = None, token_file: Path | None = None):
        from hub import basemodel

        self.registry = registry
        self.manifests = list({m.ref: m for m in (registry.resolve(ref) for ref in refs)}.values())  # once each
        self.keys: dict[str, str | None] = {BASE: None} if with_base else {}
        self.keys.update({m.ref: m.ref for m in self.manifests})
        bases = sorted({m.base_model.id for m in self.manifests if m.base_model.id is not None})
        self.server = server
        self.scorer: EngineScorer | ServerScorer
        if server is not None:
            self._connect(server, token_file, batch_size)
            return
        if base_model is None and len(bases) != 1:
            raise HubError(f"the versions were pushed for {', '.join(bases) or 'no named base model'}: "
                           "give --base-model")
        self._load(base_model or basemodel.embedded_name(bases[0]), batch_size)

    def _load(self, base_model: str, batch_size: int) -> None:
        from hub import basemodel
        from runtime.engine import Engine
        from runtime.evaluate import EngineScorer
        from runtime.plan import AdapterUse, RowPlan

        model, self.tokenizer = basemodel.load(base_model)
        engine = Engine(model, self.tokenizer)
        plans: dict[str | None, RowPlan] = {None: RowPlan()}
        for m in self.manifests:
            engine.load(m.ref, self.registry.read(m))
            plans[m.ref] = RowPlan((AdapterUse(m.ref),))
        self.scorer = EngineScorer(engine, plans, batch_size)
        self.base = {"id": basemodel.canonical_id(base_model),
                     "fingerprint": basemodel.architecture_fingerprint(basemodel.resolve(base_model))}

    def _connect(self, server: str, token_file: Path | None, batch_size: int) -> None:
        from transformers import AutoTokenizer

        from hub import basemodel
        from runtime.client import RuntimeClient, read_token
        from runtime.eval_server import ServerScorer

        client = RuntimeClient(server, token=read_token(token_file) if token_file else None)
        info = client.info()
        self.tokenizer = AutoTokenizer.from_pretrained(basemodel.resolve(basemodel.embedded_name(info.base_model_id)))
        self.scorer = ServerScorer(client, batch_size, {m.ref: m.sha256 for m in self.manifests})
        self.base = {"id": info.base_model_id, "fingerprint": info.architecture_fingerprint}

    def run(self, data: Path, metric: str, max_len: int = 256, max_new_tokens: int = 48,
            choices: tuple[str, ...] = ()) -> list[Outcome]:
        """One Outcome per key (the base first), from one pass over `data` that mixes every version per batch.
        `choices`: for accuracy, the choices of every question (rows then name the right one as completion)."""
        from hub.train import TrainError, encode_chat, parse_row, read_rows

        if metric not in METRICS:
            raise TrainError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if choices and (metric != "accuracy" or len(choices) < 2 or not all(choices)):
            raise TrainError("--choices takes two or more non-empty choices, with --metric accuracy")
        accuracy = choice_parser(choices) if choices else parse_question
        parser = {"accuracy": accuracy, "exact_match": parse_completion, "contains": parse_completion}
        rows = read_rows(data, parser.get(metric, parse_row))
        keys = list(self.keys.values())
        if metric == "accuracy":
            per_key = _accuracy(self.scorer, self.tokenizer, rows, keys)
        elif metric in GENERATED:
            per_key = _generated(self.scorer, self.tokenizer, rows, keys, metric, max_new_tokens)
        else:
            per_key = _loss(self.scorer, encode_chat(self.tokenizer, rows, max_len), keys, metric)
        return [Outcome(ref, metric, value, n, examples) for ref, (value, n, examples) in zip(self.keys, per_key)]

    def record(self, outcomes: list[Outcome], data: Path, settings: dict) -> int:
        """Append each version's outcome to its evaluation records (the base's value beside it); returns
        how many were written."""
        from hub import evals
        from hub.train import dataset_info, read_rows

        info = dataset_info(data, len(read_rows(data, json_row)))
        base = next((o.value for o in outcomes if o.ref == BASE), None)
        by_ref = {o.ref: o for o in outcomes}
        settings = {**settings, "greedy": True, "server": self.server}
        for m in self.manifests:
            o = by_ref[m.ref]
            evals.append(self.registry.root, m, [evals.new_record(m, o.metric, o.value, o.n, info, self.base,
                                                                  settings, base_value=base)])
        return len(self.manifests)


def json_row(row: object) -> object:
    """Any JSON value: rows are counted for the record, whatever their shape."""
    return row


def evaluate(registry: Registry, refs: list[str], data: Path, metric: str, base_model: str | None,
             with_base: bool = True, batch_size: int = 16, max_len: int = 256, max_new_tokens: int = 48) -> list[dict]:
    """One result per version (and the base first, unless `with_base` is off): ref, metric, value and n
    (reply tokens for loss and perplexity, rows otherwise). Records nothing."""
    run = Evaluation(registry, refs, base_model, with_base, batch_size)
    return [o.to_dict() for o in run.run(data, metric, max_len, max_new_tokens)]


Result = tuple[float, int, list[dict]]  # value, n, per-example results


def _loss(scorer, examples: list[TokenExample], keys: list, metric: str) -> list[Result]:
    """Per key: mean NLL of the reply tokens (or its exp), their count, each reply's mean NLL. Example-major
    order: each batch holds the rows of every version for a few examples."""
    scores = scorer.nll([(key, e.prompt_ids, e.reply_ids) for e in examples for key in keys])
    out = []
    for k in range(len(keys)):
        mine = scores[k::len(keys)]
        nll, n = (sum(x) for x in zip(*mine))
        value = nll / n if metric == "loss" else math.exp(nll / n)
        out.append((value, n, [{"loss": s / t} for s, t in mine]))
    return out


def _accuracy(scorer, tokenizer, questions: list[Question], keys: list) -> list[Result]:
    """Per key: the share of questions whose right choice has the highest log-likelihood, questions, each
    question's choice; as evaluation harnesses score multiple choice (summed log-likelihood of each choice's
    tokens)."""
    from hub.train import chat_context, text_ids

    items = [(key, chat_context(tokenizer, [{"role": "user", "content": q.prompt}]), text_ids(tokenizer, c))
             for q in questions for key in keys for c in q.choices]
    nll = iter(scorer.nll(items))
    picked: list[list[dict]] = [[] for _ in keys]
    for q in questions:
        for k in range(len(keys)):
            scores = [next(nll)[0] for _ in q.choices]
            choice = scores.index(min(scores))
            picked[k].append({"choice": choice, "right": choice == q.answer})
    return [(sum(p["right"] for p in rows) / len(questions), len(questions), rows) for rows in picked]


def _generated(scorer, tokenizer, rows: list[Example], keys: list, metric: str, max_new_tokens: int) -> list[Result]:
    """Per key: the share of greedy replies equal to / containing the expected one (stripped), rows, each reply."""
    from hub.train import chat_context

    prompts = [(key, chat_context(tokenizer, [{"role": "user", "content": e.prompt}])) for e in rows for key in keys]
    replies = iter(scorer.replies(prompts, max_new_tokens))
    got: list[list[dict]] = [[] for _ in keys]
    for e in rows:
        for k in range(len(keys)):
            reply, want = next(replies).strip(), e.reply.strip()
            got[k].append({"reply": reply, "hit": reply == want if metric == "exact_match" else want in reply})
    return [(sum(g["hit"] for g in replies_) / len(rows), len(rows), replies_) for replies_ in got]


DATA_OPT = typer.Option(..., "--data", help='JSONL, or a `datasets` save_to_disk folder: {"prompt", "completion"} '
                                             'or {"messages": [...]} rows.')
BASE_OPT = typer.Option(None, "--base-model", help="Default: the base the versions were pushed for.")
BATCH_OPT = typer.Option(16, "--batch-size", min=1, help="Rows per forward (of mixed versions); with --server: "
                                                         "requests in flight.")
MAX_LEN_OPT = typer.Option(256, "--max-len", min=2, help="Longer examples are dropped.")
NEW_TOKENS_OPT = typer.Option(48, "--max-new-tokens", min=1, help="exact_match, contains: reply length.")
SERVER_OPT = typer.Option(None, "--server", help="host:port of a running `hub serve` to evaluate on "
                                                 "(default: in-process).")
TOKEN_OPT = typer.Option(None, "--token-file", help="With --server: file whose first token is the bearer token.")
REGISTRY_OPT = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME).")


@contextmanager
def _one_line_errors() -> Iterator[None]:
    from hub.train import TrainError
    from runtime.client import RequestFailed

    try:
        yield
    except (TrainError, HubError, ArtifactError, BaseModelError, OSError, RequestFailed) as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None


def _unit(metric: str) -> str:
    return "tokens" if metric in ("loss", "perplexity") else "rows"


def eval_command(
    refs: list[str] = typer.Argument(..., help="Versions to evaluate (name, name@1.2.0, name@tag)."),
    data: Path = DATA_OPT,
    metric: str = typer.Option("loss", "--metric", help=(
        'loss or perplexity (on the completions); accuracy (rows {"prompt", "choices": [...], "answer": index}: '
        "the likeliest choice); exact_match or contains (greedy replies against the completion).")),
    base_model: str | None = BASE_OPT,
    no_base: bool = typer.Option(False, "--no-base", help="Leave the bare base model out."),
    batch_size: int = BATCH_OPT,
    max_len: int = MAX_LEN_OPT,
    max_new_tokens: int = NEW_TOKENS_OPT,
    choices: str | None = typer.Option(None, "--choices", help='accuracy: comma-separated choices shared by every '
                                                               'row; rows {"prompt", "completion": the right one}.'),
    server: str | None = SERVER_OPT,
    token_file: Path | None = TOKEN_OPT,
    no_record: bool = typer.Option(False, "--no-record", help="Do not append the results to the versions' "
                                                              "evaluation records."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Evaluate versions (and the bare base) on a data file in one batched pass; the results are appended to
    each version's evaluation records (`hub show`, `hub list --sort METRIC`)."""
    if base_model is not None and server is not None:
        typer.echo("error: --base-model does not apply with --server (the server's base is evaluated)", err=True)
        raise typer.Exit(1)
    with _one_line_errors():
        run = Evaluation(open_registry(registry), refs, base_model, not no_base, batch_size, server, token_file)
        shared = tuple(c.strip() for c in choices.split(",")) if choices is not None else ()
        outcomes = run.run(data, metric, max_len, max_new_tokens, shared)
        if not no_record:
            run.record(outcomes, data, {"max_len": max_len, "max_new_tokens": max_new_tokens,
                                        "choices": list(shared)})
    if as_json:
        typer.echo(json.dumps([o.to_dict() for o in outcomes], indent=1))
        return
    width = max(len(o.ref) for o in outcomes)
    for o in outcomes:
        typer.echo(f"{o.ref.ljust(width)}  {o.metric} {o.value:.4f}  ({o.n} {_unit(o.metric)})")


def compare_command(
    a: str = typer.Argument(..., metavar="A", help="A version (name, name@1.2.0, name@tag)."),
    b: str = typer.Argument(..., metavar="B", help="The version to compare it with."),
    data: Path = DATA_OPT,
    metrics: list[str] = typer.Option(["loss"], "--metric", help="Repeat for several: loss, perplexity, accuracy, "
                                                                 "exact_match, contains."),
    show: int = typer.Option(10, "--show", min=0, help="Most differing examples to print per metric."),
    base_model: str | None = BASE_OPT,
    batch_size: int = BATCH_OPT,
    max_len: int = MAX_LEN_OPT,
    max_new_tokens: int = NEW_TOKENS_OPT,
    server: str | None = SERVER_OPT,
    token_file: Path | None = TOKEN_OPT,
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Two versions side by side on one data file: each metric, then the examples where they differ (for
    loss: the largest differences; otherwise each example where the choice or the reply differs)."""
    with _one_line_errors():
        reg = open_registry(registry)
        if reg.resolve(a).ref == reg.resolve(b).ref:
            raise HubError(f"{a} and {b} are the same version: compare two different ones")
        run = Evaluation(reg, [a, b], base_model, False, batch_size, server, token_file)
        results = [run.run(data, m, max_len, max_new_tokens) for m in dict.fromkeys(metrics)]
    first, second = (o.ref for o in results[0])
    width = max(len(m) for m in metrics)
    typer.echo(f"{'METRIC'.ljust(width)}  {first}  {second}")
    for x, y in results:
        mark = first if better(x.metric, x.value, y.value) else second if better(x.metric, y.value, x.value) else "="
        typer.echo(f"{x.metric.ljust(width)}  {x.value:.4f}  {y.value:.4f}  (better: {mark})")
    for x, y in results:
        differing = _differences(x, y)
        typer.echo(f"\n{x.metric}: {len(differing)} of {len(x.examples)} examples differ" +
                   (f"; the {min(show, len(differing))} largest:" if x.metric in ("loss", "perplexity") and show
                    else ":" if differing and show else ""))
        for i, left, right in differing[:show]:
            typer.echo(f"  #{i}  {left}  |  {right}")


def _differences(x: Outcome, y: Outcome) -> list[tuple[int, str, str]]:
    """(example index, A's result, B's result) where they differ; for loss the largest differences first."""
    pairs = list(enumerate(zip(x.examples, y.examples), start=1))
    if x.metric in ("loss", "perplexity"):
        pairs.sort(key=lambda p: -abs(p[1][0]["loss"] - p[1][1]["loss"]))
        return [(i, f"{l['loss']:.4f}", f"{r['loss']:.4f}") for i, (l, r) in pairs if l["loss"] != r["loss"]]
    if x.metric == "accuracy":
        return [(i, f"choice {l['choice']}{' (right)' if l['right'] else ''}",
                 f"choice {r['choice']}{' (right)' if r['right'] else ''}") for i, (l, r) in pairs
                if l["choice"] != r["choice"]]
    return [(i, f"{'+' if l['hit'] else '-'} {json.dumps(l['reply'])}", f"{'+' if r['hit'] else '-'} "
             f"{json.dumps(r['reply'])}") for i, (l, r) in pairs if l["reply"] != r["reply"]]


def register(app: typer.Typer) -> None:
    """Mount `hub eval` and `hub compare` on the hub CLI."""
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
