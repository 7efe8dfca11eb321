"""Qwen 3: Qwen 2 without q/k/v biases by default, plus RMSNorm on queries and keys per head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..nn import GGUFLayout
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2Config


@dataclass(repr=False)
class Qwen3Config(Qwen2Config):
    model_type: ClassVar[str] = "qwen3"
    absent_keys: ClassVar[tuple[str, ...]] = ("mlp_bias",)  # not in transformers' config: written when set
    head_dim: int | None = 128

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    qk_norm = property(lambda self: True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    config_class = Qwen3Config
    gguf = GGUFLayout("qwen3")
