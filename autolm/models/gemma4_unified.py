"""Gemma 4 unified's text model (model_type gemma4_unified_text; gemma4_unified: the encoder-free image-text
checkpoints' language model): Gemma 4's (gemma4.py) without per-layer input embeddings or experts. The layers,
attention (own head size and KV heads on full layers, attention_k_eq_v, KV sharing, double-wide MLPs), norms,
proportional RoPE, layer_scalar and soft-capped logits are Gemma 4's; what differs is the config:

- transformers' Gemma4UnifiedTextConfig has no hidden_size_per_layer_input, vocab_size_per_layer_input,
  enable_moe_block, num_experts, top_k_experts or moe_intermediate_size: its model never reads them, so a
  config.json that gives them keeps them (written back as given) and they switch nothing on here either;
- its defaults: sliding_window 1024, max_position_embeddings 262144, use_bidirectional_attention "vision" (text
  stays causal; "all" is refused, as for Gemma 4).

The image-text checkpoints (Gemma4UnifiedForConditionalGeneration) hold no vision or audio tower: their
vision_embedder / embed_vision / embed_audio tensors are skipped. llama.cpp's converter writes the model as its
"gemma4" architecture (Gemma4UnifiedModel: Gemma4Model's file, plus the tokenizer's suppress_tokens), which reads
back as Gemma 4's text model (the same arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..nn import CheckpointRules, Ignored
from .gemma2 import takes_hidden_activation
from .gemma4 import (
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    Gemma4TextDecoderLayer,
    Gemma4TextModel,
    _takes_per_layer_keys,
)
from .image_text import TextFirstConfig

# Gemma 4's fields that transformers' unified config does not have, and the values that leave them off
_UNUSED = {
    "hidden_size_per_layer_input": None,
    "vocab_size_per_layer_input": 262_144,
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}


@_takes_per_layer_keys
@takes_hidden_activation
@dataclass(repr=False)
class Gemma4UnifiedTextConfig(Gemma4TextConfig):
    """transformers' Gemma4UnifiedTextConfig: Gemma4TextConfig's fields and defaults but those of per-layer inputs
    and experts (_UNUSED: kept in `extra` where config.json gives them, not run), with its own defaults."""

    model_type: ClassVar[str] = "gemma4_unified_text"
    absent_keys: ClassVar[tuple[str, ...]] = (*Gemma4TextConfig.absent_keys, *_UNUSED)

    max_position_embeddings: int = 262_144
    sliding_window: int | None = 1024
    use_bidirectional_attention: str | None = "vision"
    hidden_size_per_layer_input: int | None = None

    def __post_init__(self) -> None:
        for name, off in _UNUSED.items():
            value = getattr(self, name)
            if value != off:  # transformers' unified model never reads it
                self.extra[name] = value
                setattr(self, name, off)
        super().__post_init__()


class Gemma4UnifiedConfig(TextFirstConfig):
    """transformers' Gemma4UnifiedConfig (the encoder-free image-text checkpoints), read as Gemma4Config is: its
    language model's text_config, saved as the text model."""

    model_type: ClassVar[str] = "gemma4_unified"
    text_class: ClassVar[type] = Gemma4UnifiedTextConfig


class Gemma4UnifiedTextDecoderLayer(Gemma4TextDecoderLayer):
    """Gemma 4's layer under transformers' name for it (the unit device maps keep whole); the config gives it
    neither per-layer inputs nor experts."""


class Gemma4UnifiedTextModel(Gemma4TextModel):
    layer_class: ClassVar[type] = Gemma4UnifiedTextDecoderLayer


class Gemma4UnifiedForCausalLM(Gemma4ForCausalLM):
    """transformers' Gemma4UnifiedForCausalLM (model_type gemma4_unified_text), and the language model of
    Gemma4UnifiedForConditionalGeneration (gemma4_unified), saved as the text model."""

    config_class = Gemma4UnifiedTextConfig
    body_class: ClassVar[type] = Gemma4UnifiedTextModel
    # the image-text checkpoints: Gemma 4's rules, and the vision embedder as transformers saves it
    checkpoint_rules = CheckpointRules(
        [*Gemma4ForCausalLM.checkpoint_rules.rules, Ignored(r"(model\.)?vision_embedder\..+")]
    )
    _no_split_modules: ClassVar[list[str]] = ["Gemma4UnifiedTextDecoderLayer"]
