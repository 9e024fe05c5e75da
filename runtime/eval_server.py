"""Evaluation against a running server: the same scoring and greedy replies as `runtime.evaluate.EngineScorer`,
through the gRPC Score and Generate calls.

Why: a served base is often the one that matters (its dtype, its device, its registry); the requests are
sent concurrently so the server's scheduler batches the rows of different versions together, as the
in-process pass does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from hub.errors import HubError
from runtime.client import RuntimeClient


class ServerScorer:
    """Scoring and greedy replies by version ref (None: the bare base) from a server; `workers` requests
    in flight at once. `sha256` (ref -> artifact sha256) is what the local registry holds: a server that
    serves other content under a ref fails the evaluation, which would otherwise be recorded on the wrong
    version."""

    def __init__(self, client: RuntimeClient, workers: int, sha256: dict[str, str]):
        self.client, self.workers, self.sha256 = client, workers, sha256

    def _check(self, ref: str | None, reply) -> None:
        served = reply.adapters[0].sha256 if ref and reply.adapters else None
        if ref and served != self.sha256[ref]:
            raise HubError(f"the server serves {ref} with sha256 {str(served)[:12]}, the registry holds "
                           f"{self.sha256[ref][:12]}: evaluate against the server's registry")

    def _each(self, fn, items: Sequence) -> list:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, items))

    def nll(self, items: Sequence[tuple[str | None, Sequence[int], Sequence[int]]]) -> list[tuple[float, int]]:
        """Per (ref, prompt ids, reply ids): the reply's summed negative log-likelihood and its length."""
        def one(item: tuple[str | None, Sequence[int], Sequence[int]]) -> tuple[float, int]:
            ref, prompt, reply = item
            scored = self.client.score(token_ids=[*prompt, *reply], adapters=[ref] if ref else [])
            self._check(ref, scored)
            return -sum(scored.logprobs[len(scored.logprobs) - len(reply):]), len(reply)
        return self._each(one, items)

    def replies(self, prompts: Sequence[tuple[str | None, Sequence[int]]], max_new_tokens: int) -> list[str]:
        """Per (ref, prompt ids): the greedy reply text."""
        def one(item: tuple[str | None, Sequence[int]]) -> str:
            ref, ids = item
            reply = self.client.generate(token_ids=list(ids), adapters=[ref] if ref else [], temperature=0.0,
                                         max_new_tokens=max_new_tokens)
            self._check(ref, reply)
            return reply.text
        return self._each(one, prompts)
