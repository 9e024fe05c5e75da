"""Row isolation: a row's output depends only on its own adapters, whatever another row's adapter holds.

An adapter whose values are NaN, or finite but so large (1e30) that activations overflow to inf, shares
batches with base rows and rows of healthy adapters, over every technique and every LoRA kernel path.
Each healthy row must come out bit-for-bit as in the same batch with that adapter healthy, and a row
whose own logits are not finite ends with an error, never with made-up tokens.
The poisoned values are written into the engine's prepared tensors (Engine.prepare, then install), so
these tests do not depend on the finiteness checks artifacts get at push, pull and load.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator

import pytest
import torch
from conftest import save_peft_adapter, tiny_llama
from peft import LoraConfig

from hub.artifact import read_adapter
from runtime.engine import Engine
from runtime.plan import AdapterUse, RowPlan

ROWS = [[5, 9, 17, 33, 4, 81, 12], [7, 7, 100, 3], [44, 12, 90, 61, 70, 8, 19], [15, 16], [101, 6, 55]]
# finite but overflowing: 1e30 overflows a row's activations past its own x @ A, 3e38 already there
POISONS = {"nan": float("nan"), "huge": 1e30, "max": 3e38}


def plan(*keys: str, mode: str = "stack") -> RowPlan:
    return RowPlan(tuple(AdapterUse(k) for k in keys), mode)


def tensors_of(payload: Any) -> Iterator[torch.Tensor]:
    """Every tensor a technique's prepared payload holds (tensors, tuples, dataclasses such as LoraSite/Block)."""
    if isinstance(payload, torch.Tensor):
        yield payload
    elif isinstance(payload, (tuple, list)):
        for item in payload:
            yield from tensors_of(item)
    elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        for f in dataclasses.fields(payload):
            yield from tensors_of(getattr(payload, f.name))


@pytest.fixture(scope="module")
def folders(technique_adapters, tmp_path_factory) -> dict[str, Any]:
    """The per-technique adapters, plus a LoRA of another rank on the same modules (a second rank bucket)."""
    lora8 = save_peft_adapter(tiny_llama(), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              tmp_path_factory.mktemp("iso") / "lora8", seed=7)
    return {**technique_adapters, "lora8": lora8}


class Poisonable:
    """An engine serving healthy adapters ("lora", "lora8", and `technique` as "good"), plus `technique`'s
    adapter as "bad", whose values `poison` overwrites in place (and re-installs, so no compiled copy stays)."""

    def __init__(self, folders: dict[str, Any], technique: str):
        self.engine = Engine(tiny_llama())
        for key, folder in {"lora": folders["lora"], "lora8": folders["lora8"], "good": folders[technique]}.items():
            self.engine.load(key, read_adapter(folder))
        self.bad = self.engine.prepare("bad", read_adapter(folders[technique]))
        self.engine.install(self.bad)

    def poison(self, value: float) -> None:
        targets = [*tensors_of(list(self.bad.sites.values())), *tensors_of(self.bad.prompt)]
        assert targets
        for t in targets:
            t.fill_(value)
        self.engine.install(self.bad)

    def logits(self, plans: list[RowPlan], segments: list[int] | None = None) -> list[torch.Tensor]:
        """Each row's logits over its own (left-padded) tokens, from one forward."""
        rows = ROWS[:len(plans)]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out, _ = self.engine.forward(ids, mask, plans, segments=segments)
        return [out[i, width - len(r):] for i, r in enumerate(rows)]


TECHNIQUES = ["lora", "ia3", "bitfit", "prompt_tuning", "bottleneck"]
# Batch layouts (row plans, segments) around the "bad" adapter. For LoRA they reach every kernel: "bad" alone
# at its modules (one adapter, rows selected), with a second adapter of its rank (one bucket, gathered rows;
# every row in order: the batched matmul over all rows and the shared q/v projection), with another rank
# (two buckets), stacked or averaged with another adapter in one row, and in a batch of two segments.
LAYOUTS = {
    "beside base rows": ([plan(), plan("bad"), plan()], None),
    "first, then base": ([plan("bad"), plan(), plan()], None),
    "beside its healthy twin": ([plan(), plan("bad"), plan("good")], None),
    "every row its own adapter": ([plan("bad"), plan("good")], None),
    "beside another rank": ([plan("lora8"), plan("bad"), plan()], None),
    "stacked in one row": ([plan("good", "bad"), plan("good"), plan(), plan("lora8")], None),
    "averaged in one row": ([plan("bad", "good", mode="average"), plan("good"), plan("lora")], None),
    "two segments": ([plan("bad"), plan(), plan("good"), plan("lora8"), plan()], [2, 3]),
    "twin segments": ([plan("bad"), plan(), plan("bad"), plan()], [2, 2]),
}


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_healthy_rows_never_see_a_broken_adapter_in_their_batch(folders, technique, poison):
    served = Poisonable(folders, technique)
    layouts = {name: layout for name, layout in LAYOUTS.items()
               if not (technique == "prompt_tuning" and name == "averaged in one row")}  # soft prompts: weight 1 only
    before = {name: served.logits(plans, segments) for name, (plans, segments) in layouts.items()}
    served.poison(POISONS[poison])
    for name, (plans, segments) in layouts.items():
        after = served.logits(plans, segments)
        broken = 0
        for row, p in enumerate(plans):
            if any(u.key == "bad" for u in p.adapters):
                broken += not torch.isfinite(after[row]).all()
                continue
            assert torch.equal(after[row], before[name][row]), (name, row)
        assert broken or poison != "nan", name  # NaN values always reach their own rows' logits


def test_a_row_alone_equals_its_row_beside_a_broken_adapter(folders):
    """The same rows without the broken row's company (a separate forward): equal to float rounding."""
    served = Poisonable(folders, "lora")
    served.poison(float("nan"))
    together = served.logits([plan(), plan("bad"), plan("good")])
    for row, p in [(0, plan()), (2, plan("good"))]:
        alone, _ = served.engine.forward(torch.tensor([ROWS[row]]), torch.ones(1, len(ROWS[row]), dtype=torch.long),
                                         [p])
        assert (together[row] - alone[0]).abs().max() <= 1e-5
