"""Arcee (arcee-ai's AFM-4.5B, AFM-4.5B-Base): Llama's pre-norm decoder layers of grouped-query attention with RoPE
(YaRN in the released config) and RMSNorm, but a plain, non-gated MLP `down_proj(relu2(up_proj(x)))`, relu2 being
the squared ReLU. Biases on q/k/v/o where `attention_bias`, on the MLP where `mlp_bias`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn import ACTIVATIONS, MLP, Attention, GGUFLayout, RMSNorm
from .base import LLAMA_TP, CausalLM, DecoderModel
from .llama import LlamaConfig


@dataclass(repr=False)
class ArceeConfig(LlamaConfig):
    """transformers' ArceeConfig: its fields and defaults (AFM-4.5B's sizes, the squared ReLU)."""

    model_type: ClassVar[str] = "arcee"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("max_window_layers", "sliding_window", "use_sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 32000
    hidden_size: int = 2560
    intermediate_size: int = 18432
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "relu2"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Arcee builds a plain causal mask whatever the config says


class ArceeDecoderLayer(nn.Module):
    def __init__(self, config: ArceeConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
        )
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class ArceeModel(DecoderModel):
    def __init__(self, config: ArceeConfig):
        super().__init__(config, ArceeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class ArceeForCausalLM(CausalLM):
    """transformers' ArceeForCausalLM."""

    config_class = ArceeConfig
    # llama.cpp's converter (ArceeModel, a LlamaModel): Llama's keys (vocabulary size, rope.dimension_count, the
    # head size as key/value length) and YaRN's type, factor and original context length; q/k rows permuted as
    # Llama's; up_proj / down_proj as ffn_up / ffn_down (no ffn_gate); llama.cpp's arcee reads no biases
    gguf = GGUFLayout("arcee", permute_qk=True)
    # transformers' base_model_tp_plan: attention as Llama's, up_proj split by output features, down_proj by input
    tp_patterns: ClassVar[dict[str, str]] = {k: v for k, v in LLAMA_TP.items() if "gate_proj" not in k}
    _no_split_modules: ClassVar[list[str]] = ["ArceeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, ArceeModel(config))
