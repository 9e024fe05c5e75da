"""Generation over one Engine: prefill + decode with a KV cache, and continuous batching.

The batch's KV cache is kept left-padded: row i's real positions are the trailing ones of its
attention-mask row. Rows that join are prefilled together in their own forward (with their soft
prompts, if any), then their cache is merged by left-padding both caches to a common length; rows
that leave are dropped at once and all-padding columns trimmed. With `prefill_ahead`, a prefill may take
more pending rows than have room: those wait prefilled (their cache aside, their first token taken) and
join, with no forward of their own, in the step where rows leave. Position ids come from the mask,
so padding never shifts a row and a greedy fp32 sequence comes out the same alone or batched.

Every row reads its adapters in place from slots through index tensors the engine rebuilds per batch change
(Engine.batch_ops): a join, leave or cancel moves no adapter bytes, and each adapted module runs its ops once a
step over the whole batch.

A failure ends only the rows it touches (finish_reason "error", the exception in `Row.error`): a
row whose logits are not finite, or whose token cannot be taken, ends alone; a failed prefill ends only
the rows joining in it (their cache was never merged); a failed decode ends the running rows (they
share one cache), and the joining rows still join.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.engine import Engine
from runtime.errors import DamagedData
from runtime.kvcache import join_rows, keep_rows, pad_left, take_rows
from runtime.plan import RowPlan
from runtime.sampling import SamplingParams, TokenLogprob, generator_for, next_tokens, token_logprobs
from runtime.textstream import TextStream

__all__ = ["Batch", "NonFiniteLogits", "SamplingParams", "Row", "score"]

@dataclass
class Row:
    id: str
    prompt_ids: list[int]
    plan: RowPlan = field(default_factory=RowPlan)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, when sampling.logprobs asks
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None
    error: Exception | None = None  # why it ended, when finish_reason is "error"
    stop_string: bool = False  # finish_reason "stop" came from a stop string (False: from EOS)
    # A row with stop strings: where the batch decodes its output (one is made when None) to watch for them, so a
    # caller that streams the text takes the pieces `Batch.step` returns instead of decoding every token again.
    # The batch alone touches it until the row has finished.
    text: TextStream | None = None


class NonFiniteLogits(DamagedData):
    """A row's logits hold NaN or inf (its adapters' weights are broken or overflow): there is no token to
    choose or score from them. DamagedData: the numbers the request asked for are lost."""

    def __init__(self, plan: RowPlan, where: str):
        keys = [a.key for a in plan.adapters]
        who = f"adapter{'s' if len(keys) > 1 else ''} {', '.join(keys)}" if keys else "the base model"
        super().__init__(f"{who} produced non-finite logits {where}")


def visible_text(tokenizer, seq: Row) -> str:
    """The sequence's output text, cut before the first stop string it contains."""
    text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in seq.sampling.stop if s in text]
    return text[: min(cuts)] if cuts else text


def _eos_ids(engine: Engine) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(engine.model, "generation_config", None), engine.model.config, engine.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids


class Batch:
    """Continuous-batching state: sequences join at the next step and leave at once.

    `prefill_ahead`: when rows have room and none wait prefilled, a prefill takes up to this many pending rows
    (at least those with room); the rest wait prefilled and take the places of rows that leave in the step they
    leave (a place is then never idle for a decode step, as it is while a replacement prefills). A forward reads
    all of the base's weights whatever its rows, so one prefill of many rows costs far less than one per
    leaver's replacement: evaluation, where nobody waits for a first token, sets it (runtime/evaluate.py).
    Serving keeps 0: a prompt is prefilled once it has room, and never waits behind others' prefills.
    """

    def __init__(self, engine: Engine, max_rows: int = 32, prefill_ahead: int = 0):
        self.engine = engine
        self.max_rows = max_rows
        self.prefill_ahead = prefill_ahead
        self._rows: list[Row] = []
        self._pending: list[Row] = []
        self._ready: list[Row] = []  # prefilled ahead of room, waiting to join; their rows in the cache of
        self._ready_at: list[int] = []  # their prefill, that cache and its mask:
        self._ready_cache: Any = None
        self._ready_mask: torch.Tensor | None = None
        self._generators: dict[str, torch.Generator] = {}
        self._texts: dict[str, TextStream] = {}  # the sequences with stop strings: their Row.text
        self._cache: Any = None  # the KV cache Engine.forward returned, while rows run
        self._mask: torch.Tensor | None = None  # (rows, cache length), while rows run
        self._eos = _eos_ids(engine)
        self.prefills = 0  # prefill forwards so far: each reads all of the base's weights, however few its rows

    def __len__(self) -> int:
        return len(self._rows) + len(self._ready) + len(self._pending)

    def add(self, seq: Row) -> None:
        """Queue a sequence; it is prefilled at the next step that has room."""
        if not seq.prompt_ids:
            raise ValueError(f"sequence {seq.id!r} has an empty prompt")
        seq.sampling.validate()
        if seq.sampling.stop and self.engine.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if any(s.id == seq.id for s in self._rows + self._ready + self._pending):
            raise ValueError(f"sequence id {seq.id!r} is already in the batch")
        self.engine.check([seq.plan])  # refuse an unknown adapter or bad plan now, not mid-batch
        self._generators[seq.id] = generator_for(seq.sampling)
        if seq.sampling.stop:  # watched a few tokens at a time, not by decoding the whole output every step
            if seq.text is None:
                seq.text = TextStream(self.engine.tokenizer, seq.sampling.stop)
            self._texts[seq.id] = seq.text
        self._pending.append(seq)

    @torch.inference_mode()  # the cache's tensors are inference tensors (Engine.forward), changed in place
    def remove(self, seq_id: str) -> None:
        """Drop a sequence now (finish_reason "cancelled"); unknown ids are ignored. One waiting prefilled is
        finished now and never joins."""
        for seq in self._ready:
            if seq.id == seq_id and seq.finish_reason is None:
                self._finish(seq, "cancelled")
                return
        for seq in self._pending:
            if seq.id == seq_id:
                self._pending.remove(seq)
                self._finish(seq, "cancelled")
                return
        for i, seq in enumerate(self._rows):
            if seq.id == seq_id:
                self._finish(seq, "cancelled")
                self._keep([j for j in range(len(self._rows)) if j != i])
                return

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, list[int], str | None]]:
        """One decode step for running rows and a prefill for joining ones: per sequence, its new tokens and, for
        one with stop strings, the text they settled (else None: nothing was decoded). A sequence that failed
        comes with no tokens and finish_reason "error", see the module docstring."""
        produced: list[tuple[Row, int | None, TokenLogprob | None]] = []
        results: list[tuple[Row, list[int], str | None]] = []
        if self._rows:
            try:
                produced += self._decode()
            except Exception as e:  # the cache may hold part of this step: every running row ends
                results += self._fail(self._rows, e)
                self._keep([])
        while len(self._rows) < self.max_rows and (self._ready or self._pending):
            room = self.max_rows - len(self._rows)
            if not self._ready:
                take = max(room, self.prefill_ahead)
                joining, self._pending = self._pending[:take], self._pending[take:]
                try:
                    logits, self._ready_cache, self._ready_mask = self._prefill(joining)
                except Exception as e:  # nothing of theirs is in the batch yet: the running rows go on
                    results += self._fail(joining, e)
                    break
                self._ready, self._ready_at = joining, list(range(len(joining)))
                produced += self._sample(joining, logits)
            self._join_ready()
        for seq, token, logprob in produced:
            try:
                results.append((seq, *self._accept(seq, token, logprob)))
            except Exception as e:  # e.g. its stop-string check: this row alone
                results += self._fail([seq], e)
        done = [i for i, seq in enumerate(self._rows) if seq.finish_reason is not None]
        if done:
            self._keep([i for i in range(len(self._rows)) if i not in done])
        self._join_ready()  # rows waiting prefilled take the places just left: they decode at the next step
        return results

    # -- internals ------------------------------------------------------------------------------

    def _fail(self, seqs: list[Row], error: Exception) -> list[tuple[Row, list[int], str | None]]:
        """End these sequences with `error`; each with no new tokens, as `step` reports them."""
        for seq in seqs:
            self._finish(seq, "error")
            seq.error = error
        return [(seq, [], None) for seq in seqs]

    def _sample(self, seqs: list[Row], logits: torch.Tensor) -> list[tuple[Row, int | None, TokenLogprob | None]]:
        params = [s.sampling for s in seqs]
        tokens = next_tokens(logits, params, [self._generators[s.id] for s in seqs])
        return list(zip(seqs, tokens, token_logprobs(logits, tokens, params)))

    def _decode(self) -> list[tuple[Row, int | None, TokenLogprob | None]]:
        device = self.engine.device
        ids = torch.tensor([[s.output_ids[-1]] for s in self._rows], device=device)
        mask = self._mask
        assert mask is not None, "running rows have a mask"
        self._mask = torch.cat([mask, mask.new_ones(len(self._rows), 1)], dim=1)
        logits, self._cache = self.engine.forward(ids, self._mask, [s.plan for s in self._rows], cache=self._cache,
                                                  last_only=True)
        return self._sample(self._rows, logits[:, -1])

    def _prefill(self, seqs: list[Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The joining rows' forward: their last logits, their cache and its attention mask (not merged yet)."""
        self.prefills += 1
        device = self.engine.device
        plans = [s.plan for s in seqs]
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.tensor([[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs],
                            device=device)
        logits, cache = self.engine.forward(ids, mask, plans, last_only=True)
        prompts = self.engine.prompt_lengths(plans)
        length = width + max(prompts)
        mask = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            mask[i, length - len(s.prompt_ids) - prompts[i]:] = 1
        return logits[:, -1], cache, mask

    def _join_ready(self) -> None:
        """Merge as many of the rows waiting prefilled as have room; one that finished while it waited (at its
        first token, or cancelled) never joins."""
        live = [(seq, at) for seq, at in zip(self._ready, self._ready_at) if seq.finish_reason is None]
        joining, rest = live[:self.max_rows - len(self._rows)], live[self.max_rows - len(self._rows):]
        cache, mask = self._ready_cache, self._ready_mask
        self._ready, self._ready_at = [seq for seq, _ in rest], [at for _, at in rest]
        if not rest:
            self._ready_cache = self._ready_mask = None
        if joining:
            assert mask is not None, "rows waiting prefilled have a mask"
            rows = [at for _, at in joining]
            self._merge([seq for seq, _ in joining], take_rows(cache, rows), mask[rows])

    def _merge(self, seqs: list[Row], cache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._rows, self._cache, self._mask = list(seqs), cache, mask
            return
        assert self._mask is not None, "running rows have a mask"
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            join_rows(old, new, width, self.max_rows)
        self._mask = torch.cat([pad_left(self._mask, width, 1), pad_left(mask, width, 1)])
        self._rows += seqs

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows; trim cache columns that are padding for every remaining row."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        assert self._mask is not None, "running rows have a mask"
        mask = self._mask[torch.tensor(keep, device=self._mask.device)]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every remaining row
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            keep_rows(layer, keep, start)

    def _accept(self, seq: Row, token: int | None, logprob: TokenLogprob | None = None
                ) -> tuple[list[int], str | None]:
        """Record a sampled token (None: the row's logits were not finite, it fails) and its logprob when
        asked; set finish_reason. Returns the tokens to report (EOS is not one) and, for a row with stop strings,
        the text they settled."""
        if token is None:
            raise NonFiniteLogits(seq.plan, f"at output token {len(seq.output_ids) + 1}")
        text = self._texts.get(seq.id)
        if token in self._eos:
            self._finish(seq, "stop")
            return [], None
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        piece = None
        if text is not None:
            piece = text.push([token])
            if text.stopped:
                seq.stop_string = True
                self._finish(seq, "stop")
                return [token], piece
        if len(seq.output_ids) >= seq.sampling.max_new_tokens:
            self._finish(seq, "length")
        return [token], piece

    def _finish(self, seq: Row, reason: str) -> None:
        seq.finish_reason = reason
        self._generators.pop(seq.id, None)
        self._texts.pop(seq.id, None)


def score(engine: Engine, token_ids: list[int], plan: RowPlan) -> list[float]:
    """Log-probability of each token given the ones before it, under `plan` (len(token_ids) - 1 values:
    the first token has no prediction)."""
    if len(token_ids) < 2:
        raise ValueError("score needs at least two tokens")
    ids = torch.tensor([token_ids], device=engine.device)
    logits, _ = engine.forward(ids, torch.ones_like(ids), [plan], use_cache=False)
    finite = torch.isfinite(logits[0, :-1]).all(-1)
    if not finite.all():
        raise NonFiniteLogits(plan, f"scoring token {int((~finite).nonzero()[0]) + 2}")
    logprobs = torch.log_softmax(logits[0, :-1].float(), -1)
    return logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
