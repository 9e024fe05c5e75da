"""The sampler's distribution against transformers' logits warpers, computed independently for the same logits."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from runtime.sampling import SamplingParams, next_tokens

DRAWS = 20_000
VOCAB = 32


def reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities as transformers' sampling computes them: temperature, then top-k, then top-p."""
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return torch.softmax(scores[0], -1)


def drawn(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Frequencies of DRAWS seeded draws, all rows in one next_tokens call."""
    gen = torch.Generator().manual_seed(params.seed)
    tokens = next_tokens(logits.expand(DRAWS, -1), [params] * DRAWS, [gen] * DRAWS)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).double() / DRAWS


@pytest.mark.slow  # many draws per case
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.5, seed=1),
    SamplingParams(temperature=0.8, top_k=6, seed=3),
    SamplingParams(temperature=1.2, top_p=0.6, seed=4),
    SamplingParams(temperature=0.7, top_k=10, top_p=0.8, seed=5),
], ids=["t0.5", "topk6", "topp0.6", "topk10-topp0.8"])
def test_sampling_matches_an_independent_computation(params):
    """Nothing outside the allowed set is drawn, and the total-variation distance to the reference is within
    sampling noise (about 0.01 at 20k draws); a temperature multiplied in, or a top-p or top-k left out,
    moves it by 0.1 or more for these logits."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 2
    expected = reference(logits, params).double()
    got = drawn(logits, params)
    allowed = expected > 0
    assert int(allowed.sum()) < VOCAB or (params.top_k == 0 and params.top_p == 1)
    assert got[~allowed].sum() == 0, f"drew tokens outside the allowed set: {torch.nonzero(got * ~allowed).flatten().tolist()}"
    tv = 0.5 * float((got - expected).abs().sum())
    assert tv < 0.03, f"total-variation distance {tv:.3f} from the reference distribution"
