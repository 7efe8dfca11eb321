"""Gemma 4 unified's assistant (model_type gemma4_unified_assistant, transformers'
Gemma4UnifiedAssistantForCausalLM): Gemma 4's assistant (gemma4_assistant.py: the drafting step, the masks, the
centroid-masked head, generate(assistant_model=...) through generation.target_draft) over Gemma 4 unified's text
model (gemma4_unified.py). What differs is the config:

- text_config is a gemma4_unified_text config: its defaults (sliding_window 1024, max_position_embeddings 262144,
  use_bidirectional_attention "vision"), and no per-layer inputs or experts (config.json's keys for them kept,
  not run, as Gemma4UnifiedTextConfig keeps them);
- backbone_hidden_size defaults to 3840 (Gemma 4 unified's hidden size);
- transformers checks nothing more of its text_config (no validate_architecture), so neither does this; every
  layer must still read the target's keys and values (num_kv_shared_layers = num_hidden_layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .gemma2 import takes_hidden_activation
from .gemma4 import _takes_per_layer_keys
from .gemma4_assistant import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
from .gemma4_unified import Gemma4UnifiedTextConfig, Gemma4UnifiedTextModel


@_takes_per_layer_keys
@takes_hidden_activation
@dataclass(repr=False)
class Gemma4UnifiedAssistantConfig(Gemma4AssistantConfig, Gemma4UnifiedTextConfig):
    """transformers' Gemma4UnifiedAssistantConfig, read flat as Gemma4AssistantConfig: its text_config's fields
    with Gemma4UnifiedTextConfig's defaults, beside the assistant's own."""

    model_type: ClassVar[str] = "gemma4_unified_assistant"
    text_model_type: ClassVar[str] = "gemma4_unified_text"
    must_be: ClassVar[tuple[tuple[str, Any], ...]] = ()

    # Gemma4UnifiedTextConfig's defaults (the assistant's fields carry Gemma4TextConfig's)
    max_position_embeddings: int = 262_144
    sliding_window: int | None = 1024
    use_bidirectional_attention: str | None = "vision"
    hidden_size_per_layer_input: int | None = None
    backbone_hidden_size: int = 3840


class Gemma4UnifiedAssistantForCausalLM(Gemma4AssistantForCausalLM):
    """transformers' Gemma4UnifiedAssistantForCausalLM: Gemma 4's assistant over Gemma 4 unified's layers."""

    config_class = Gemma4UnifiedAssistantConfig
    body_class: ClassVar[type] = Gemma4UnifiedTextModel
    _no_split_modules: ClassVar[list[str]] = ["Gemma4UnifiedTextDecoderLayer"]
