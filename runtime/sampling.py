"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a per-request seed.

Sampling runs on the CPU in float32 with each sequence's own torch.Generator, so a seeded request
draws the same tokens on CPU or CUDA and whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model's distribution at its position (the logits it was
    chosen from, before temperature, top-k and top-p), and the likeliest tokens there as (id, logprob)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest tokens'

    def validate(self) -> None:
        """ValueError naming the first bad field."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")


def generator_for(params: SamplingParams) -> torch.Generator:
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> list[int | None]:
    """One token per row from last-position logits (rows, vocab); None for a row whose logits are not all
    finite (no token can be chosen from them: argmax of NaN is token 0, and multinomial raises). The greedy
    rows take two reductions, their max (with its first index, argmax's token; NaN and inf come out as the max)
    and their min (for -inf), where an elementwise finiteness test would write and read a mask as large as the
    logits every step; the sampled rows' logits come to the CPU in one copy: on a GPU, one transfer each
    instead of one per row."""
    tokens: list[int | None] = [None] * len(params)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]  # all greedy (the usual case): no copy
        best, picks = rows.max(-1)
        picks = torch.where(torch.isfinite(best) & torch.isfinite(rows.amin(-1)), picks, -1)
        for i, token in zip(greedy, picks.tolist()):
            tokens[i] = token if token >= 0 else None
    if sampled:
        scores = logits[sampled].detach().float().cpu()
        finite = torch.isfinite(scores).all(-1).tolist()
        for row, i in enumerate(sampled):
            if finite[row]:
                tokens[i] = _sample(scores[row], params[i], generators[i])
    return tokens


def _sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row's finite float32 CPU logits (vocab,), at temperature > 0. The largest score is
    subtracted before dividing by the temperature, so the best token scores 0 and the others at most 0 (or
    -inf) at any temperature; in float64, where every positive Python float is a positive temperature
    (5e-324 is 0 in float32). At such tiny temperatures only the best tokens keep any probability."""
    scores = (scores.double() - scores.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, -1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        scores[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: list[int | None], params: list[SamplingParams]
                   ) -> list[TokenLogprob | None]:
    """Per row, the chosen token's TokenLogprob from the same last-position logits (rows, vocab) it was chosen
    from; None for rows that did not ask (or got no token). One log_softmax and one top-k over the rows that
    asked, so rows that did not ask cost nothing."""
    out: list[TokenLogprob | None] = [None] * len(params)
    asking = [i for i, p in enumerate(params) if p.logprobs is not None and tokens[i] is not None]
    if not asking:
        return out
    rows = logits if len(asking) == len(params) else logits[asking]
    logprobs = torch.log_softmax(rows.float(), -1)
    chosen = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in asking], device=rows.device)).squeeze(-1)
    k = max(n for i in asking if (n := params[i].logprobs) is not None)  # every asking row has a count
    top = logprobs.topk(k, -1) if k else None
    chosen_values = chosen.tolist()
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    for row, i in enumerate(asking):
        kept = params[i].logprobs
        pairs = tuple(zip(top_ids[row][:kept], top_values[row][:kept])) if kept else ()
        out[i] = TokenLogprob(chosen_values[row], pairs)
    return out
