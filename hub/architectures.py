"""The module names of the decoder architectures served, in one table that the engine, the trainer and the
bottleneck format read (a new architecture is added here, not in each technique).

The names are those of transformers' Llama-family decoder layers (Llama, Mistral, Qwen2, Gemma2 name their
projections and norms alike). LoRA's sibling groups are matched by module name alone, whatever the model
type: a name means the same input in every model that has it. Bottleneck adapters depend on where the
layer places its norms, so they are served only on the model types listed for them.
"""
from __future__ import annotations

# A decoder layer's linear projections: what `hub train` hooks for BitFit when no modules are named.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's default targets for these models, used by `hub train` when no modules are named.
LORA_TARGETS = ("q_proj", "v_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
# IA3 scales these modules' input (PEFT's feedforward_modules), the others' output.
FEEDFORWARD = ("down_proj",)

# Sibling modules that models call with the same input tensor: their LoRA A projections can run as one.
# (w1, w3: the gate and up projections of Mixtral-style experts.)
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"w1", "w3"})

# Bottleneck adapters: the model types whose decoder layers call the adapter layer without a LayerNorm
# (pre-norm: residual + block output), the only placement the runtime computes (the `adapters` library's
# own list for this placement) ...
BOTTLENECK_MODEL_TYPES = ("llama", "mistral")
# ... and per location, (module whose input is the block's residual, module whose output is the block's output).
BOTTLENECK_SITES = {"attention": ("input_layernorm", "self_attn.o_proj"),
                    "ffn": ("post_attention_layernorm", "mlp.down_proj")}

# The model types whose module shapes `hub push` reads from config.json alone (hub/base_layout.py), without
# importing transformers: Llama-family decoders whose modules are model.embed_tokens, model.layers.<i> holding
# self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, and lm_head; each with the class of its decoder layers
# as transformers names it. Any other model type is built by transformers on the meta device, as before.
CONFIG_LAYOUTS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
