"""Qwen 2: Llama with q/k/v biases; a sliding window only with use_sliding_window, on layers from
max_window_layers on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..nn import GGUFLayout
from .llama import LlamaConfig, LlamaForCausalLM


@dataclass(repr=False)
class Qwen2Config(LlamaConfig):
    model_type: ClassVar[str] = "qwen2"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "head_dim",
        "mlp_bias",
    )  # not in transformers' config: written when set
    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def layer_window(self, i: int) -> int | None:
        window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is not None:
            return window if self.layer_types[i] == "sliding_attention" else None
        return window if window is not None and i >= self.max_window_layers else None

    qkv_bias = property(lambda self: True)
    o_bias = property(lambda self: False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config
    gguf = GGUFLayout("qwen2", fixed=(("use_sliding_window", False),))
