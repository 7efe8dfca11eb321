"""Helium (Kyutai's Helium-1 2B): Llama's pre-norm decoder layers of grouped-query attention with a SiLU-gated MLP,
but

- RoPE on interleaved pairs (x0, x1), (x2, x3), ... (transformers' Helium rotate_half), not on the two halves;
- RMSNorm multiplying its weight in fp32 before the cast back (OLMo 2's arithmetic), epsilon 1e-8 by default;
- head_dim a config field (128), the attention scaled by head_dim ** -0.5; o_proj maps hidden_size to hidden_size
  (so num_attention_heads * head_dim must equal hidden_size) and never has a bias, while q/k/v have one where
  `attention_bias`; the MLP has biases where `mlp_bias`;
- RoPE base 100000 where config.json gives none.

llama.cpp has no Helium architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import Attention, GatedMLP, RMSNorm
from .base import LLAMA_TP, CausalLM, DecoderModel
from .llama import LlamaConfig


@dataclass(repr=False)
class HeliumConfig(LlamaConfig):
    """transformers' HeliumConfig: its fields and defaults (Helium-1 2B's sizes)."""

    model_type: ClassVar[str] = "helium"
    default_theta: ClassVar[float] = 100000.0

    vocab_size: int = 48000
    hidden_size: int = 2560
    intermediate_size: int = 7040
    num_hidden_layers: int = 24
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 20
    head_dim: int | None = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-8
    pad_token_id: int | None = 3
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 100000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    @property
    def o_bias(self) -> bool:
        return False

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Helium builds a plain causal mask whatever the config says

    def validate(self) -> None:
        super().validate()
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                f"{self.source}: head_dim ({self.head_dim}) times num_attention_heads ({self.num_attention_heads}) "
                f"must equal hidden_size ({self.hidden_size}): Helium's o_proj maps hidden_size to hidden_size"
            )


class HeliumDecoderLayer(nn.Module):
    def __init__(self, config: HeliumConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            o_bias=False,
            rope_interleaved=True,
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps, weight_in_fp32=True)
        self.post_attention_layernorm = RMSNorm(h, eps, weight_in_fp32=True)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class HeliumModel(DecoderModel):
    def __init__(self, config: HeliumConfig):
        super().__init__(
            config, HeliumDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        )


class HeliumForCausalLM(CausalLM):
    """transformers' HeliumForCausalLM."""

    config_class = HeliumConfig
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP  # transformers' base_model_tp_plan: Llama's
    _no_split_modules: ClassVar[list[str]] = ["HeliumDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, HeliumModel(config))
