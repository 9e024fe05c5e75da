"""Completion log-likelihoods and greedy replies of many (plan, example) pairs, batched through the
multi-adapter engine.

Why: evaluating several adapters (and the bare base) on one data set is one pass here: the rows of one
batch may each apply a different adapter, where PEFT would evaluate the adapters one after another.
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
    """Per item: (the summed negative log-likelihood of its reply tokens, their count). Rows are left-padded,
    `batch_size` items per forward, in order, whatever plans they carry."""
    out: list[tuple[float, int]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        seqs = [list(i.prompt_ids) + list(i.reply_ids) for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs], device=engine.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=engine.device)
        logits, _ = engine.forward(ids, mask, [i.plan for i in batch], use_cache=False)
        for row, item in enumerate(batch):
            n = len(item.reply_ids)  # the logits at width-n-1 .. width-2 predict the reply's n tokens
            logprobs = torch.log_softmax(logits[row, width - n - 1: width - 1].float(), -1)
            out.append((-logprobs.gather(-1, ids[row, width - n:, None]).sum().item(), n))
    return out


def greedy_replies(engine: Engine, prompts: Sequence[tuple[RowPlan, Sequence[int]]], max_new_tokens: int,
                   max_rows: int = 32) -> list[str]:
    """Each prompt's greedy reply text (special tokens skipped), continuously batched: rows of different plans
    share every step."""
    batch = generate.Batch(engine, max_rows)
    seqs = [generate.Row(str(i), list(ids), plan, generate.SamplingParams(max_new_tokens=max_new_tokens))
            for i, (plan, ids) in enumerate(prompts)]
    for seq in seqs:
        batch.add(seq)
    while len(batch):
        batch.step()
    return [generate.visible_text(engine.tokenizer, seq) for seq in seqs]
