"""Completion log-likelihoods and greedy replies of many (plan, example) pairs, batched through the
multi-adapter engine.

Why: evaluating several adapters (and the bare base) on one data set is one pass here: the rows of one
batch may each apply a different adapter, where PEFT would evaluate the adapters one after another.
`EngineScorer` offers these by version ref, as `runtime.eval_server.ServerScorer` does against a server.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from runtime import generate
from runtime.engine import Engine
from runtime.plan import RowPlan


@dataclass(frozen=True)
class Item:
    """One example under one plan: the loss is taken on `reply_ids`, given `prompt_ids`."""

    plan: RowPlan
    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]


def completion_nll(engine: Engine, items: Sequence[Item], batch_size: int = 16) -> list[tuple[float, int]]:
    """Per item, in the given order: (the summed negative log-likelihood of its reply tokens, their count).

    A batch costs its rows times its width, and the engine makes that its longest soft prompt plus its
    longest row of tokens; so the items are batched by soft-prompt length, then longest first, `batch_size` to
    a forward whatever plans they carry: rows of like length share a batch and little is padding. Only the
    positions that predict a reply token go through the vocabulary projection, a fifth of a small model's
    weights (runtime/engine.py `keep_last`).
    """
    plans = list(dict.fromkeys(i.plan for i in items))
    soft = dict(zip(plans, engine.prompt_lengths(plans))) if plans else {}
    order = sorted(range(len(items)), key=lambda k: (-soft[items[k].plan], -len(items[k].prompt_ids)
                                                     - len(items[k].reply_ids), -len(items[k].reply_ids)))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    for start in range(0, len(order), batch_size):
        batch = [items[k] for k in order[start: start + batch_size]]
        seqs = [list(i.prompt_ids) + list(i.reply_ids) for i in batch]
        width = max(len(s) for s in seqs)
        keep = max(len(i.reply_ids) for i in batch) + 1  # a row's last n + 1 positions, less its last, predict its reply
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=engine.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=engine.device)
        logits, _ = engine.forward(ids, mask, [i.plan for i in batch], use_cache=False, keep_last=keep)
        for row, (k, item) in enumerate(zip(order[start: start + batch_size], batch)):
            n = len(item.reply_ids)  # the kept logits at keep-n-1 .. keep-2 predict the reply's n tokens
            logprobs = torch.log_softmax(logits[row, keep - n - 1: keep - 1].float(), -1)
            out[k] = (-logprobs.gather(-1, ids[row, width - n:, None]).sum().item(), n)
    return out


def greedy_replies(engine: Engine, prompts: Sequence[tuple[RowPlan, Sequence[int]]], max_new_tokens: int,
                   max_rows: int = 32) -> list[str]:
    """Each prompt's greedy reply text (special tokens skipped), continuously batched: rows of different plans
    share every step.

    Nobody waits for a first token here, so rows are prefilled `max_rows` at a time ahead of room
    (`Batch.prefill_ahead`) rather than one forward per leaver's replacement: every forward reads all of the
    base's weights, which costs more than a few rows' tokens. They are queued by soft-prompt length, then
    prompt length, so those prefilled together pad little; a row's reply does not depend on its neighbours.
    """
    batch = generate.Batch(engine, max_rows, prefill_ahead=max_rows)
    seqs = [generate.Row(str(i), list(ids), plan, generate.SamplingParams(max_new_tokens=max_new_tokens))
            for i, (plan, ids) in enumerate(prompts)]
    plans = list(dict.fromkeys(plan for plan, _ in prompts))
    soft = dict(zip(plans, engine.prompt_lengths(plans))) if plans else {}
    for seq in sorted(seqs, key=lambda s: (soft[s.plan], len(s.prompt_ids))):
        batch.add(seq)
    while len(batch):
        batch.step()
    return [generate.visible_text(engine.tokenizer, seq) for seq in seqs]


class EngineScorer:
    """Scoring and greedy replies by version ref (None: the bare base) through an in-process engine."""

    def __init__(self, engine: Engine, plans: dict[str | None, RowPlan], batch_size: int):
        self.engine, self.plans, self.batch_size = engine, plans, batch_size

    def nll(self, items: Sequence[tuple[str | None, Sequence[int], Sequence[int]]]) -> list[tuple[float, int]]:
        """Per (ref, prompt ids, reply ids): the reply's summed negative log-likelihood and its length."""
        return completion_nll(self.engine, [Item(self.plans[ref], tuple(p), tuple(r)) for ref, p, r in items],
                              self.batch_size)

    def replies(self, prompts: Sequence[tuple[str | None, Sequence[int]]], max_new_tokens: int) -> list[str]:
        """Per (ref, prompt ids): the greedy reply text."""
        return greedy_replies(self.engine, [(self.plans[ref], ids) for ref, ids in prompts], max_new_tokens,
                              self.batch_size)
