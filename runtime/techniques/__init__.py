"""The techniques the runtime serves, as one explicit table.

To add one: implement `runtime.techniques.base.TechniqueImpl` in its own module and add an
instance here, keyed by its `hub.artifact.Technique`. The engine looks techniques up only here.
"""
from __future__ import annotations

from hub.artifact import Technique
from runtime.techniques.base import TechniqueImpl
from runtime.techniques.bitfit import BitFit
from runtime.techniques.bottleneck import Bottleneck
from runtime.techniques.ia3 import IA3
from runtime.techniques.lora import Lora
from runtime.techniques.prompt_tuning import PromptTuning

REGISTRY: dict[Technique, TechniqueImpl] = {
    Technique.LORA: Lora(),
    Technique.IA3: IA3(),
    Technique.BITFIT: BitFit(),
    Technique.PROMPT_TUNING: PromptTuning(),
    Technique.BOTTLENECK: Bottleneck(),
}
