"""Ministral (Ministral-8B-Instruct-2410, model_type ministral): Mistral's layer (no biases, GQA, RoPE) with a
sliding window by layer: layer_types names each layer "sliding_attention" (the window of sliding_window) or
"full_attention". Where config.json gives no layer_types, every layer slides when sliding_window is set and none
does otherwise (written back as transformers derives it). head_dim null means hidden_size / num_attention_heads.

GGUF: llama.cpp's converter has no class for MinistralForCausalLM (the released Ministral-8B files name
MistralForCausalLM and convert as plain "llama", which autolm reads as Llama), and its llama graph has no sliding
window: this family has no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .mistral import MistralConfig, MistralForCausalLM


@dataclass(repr=False)
class MinistralConfig(MistralConfig):
    """transformers' MinistralConfig."""

    model_type: ClassVar[str] = "ministral"
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        self._head_dim_given = self.head_dim is not None
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.__dict__.get("_head_dim_given", True):
            out["head_dim"] = None  # as transformers keeps it: derived from the sizes where used
        return out


class MinistralForCausalLM(MistralForCausalLM):
    """transformers' MinistralForCausalLM."""

    config_class = MinistralConfig
    gguf = None
