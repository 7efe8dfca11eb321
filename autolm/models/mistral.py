"""Mistral: Llama with a sliding window (when set) on every layer and no biases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..nn import GGUFLayout
from .llama import LlamaConfig, LlamaForCausalLM


@dataclass(repr=False)
class MistralConfig(LlamaConfig):
    model_type: ClassVar[str] = "mistral"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096

    def layer_window(self, i: int) -> int | None:
        return super().layer_window(i) if self.layer_types is not None else self.sliding_window

    qkv_bias = property(lambda self: False)
    o_bias = property(lambda self: False)


class MistralForCausalLM(LlamaForCausalLM):
    config_class = MistralConfig
    gguf = GGUFLayout("mistral", permute_qk=True)
