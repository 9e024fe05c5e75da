"""Prompt tuning: a per-row soft prompt placed before the row's tokens (the engine does the placing:
rows are left-padded to the longest prompt, with attention mask and position ids so each row's
result equals its result alone). A stack of prompts concatenates them in order; soft prompts cannot
be weighted, so each must apply with weight 1 after the mode's rule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING


from hub.artifact import Adapter, Technique
from hub.checkpoint import PROMPT_SITE, check_fits, module_tensors
from runtime.techniques.base import Resident, TechniqueImpl, Use, nbytes_of, to_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class PromptTuning(TechniqueImpl):
    technique = Technique.PROMPT_TUNING

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident:
        check_fits(adapter, model)
        prompt = to_device(module_tensors(adapter)[PROMPT_SITE], next(model.parameters()))["prompt_embeddings"]
        return Resident(key, self.technique, {}, nbytes_of([prompt]), adapter.config, prompt=prompt)

    def check_plan(self, uses_of_row: list[Use], mode: str) -> None:
        for use in uses_of_row:
            if use.weight != 1.0:
                raise ValueError(f"prompt-tuning adapter {use.resident.key!r} applies with weight {use.weight:g} "
                                 f"in {mode} mode; soft prompts are concatenated, not weighted (use weight 1, stack)")
