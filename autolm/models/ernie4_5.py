"""ERNIE 4.5 (baidu/ERNIE-4.5-0.3B-PT, -Base-PT: the dense ERNIE 4.5): Llama's pre-norm decoder layers of
grouped-query attention and a SiLU-gated MLP with RMSNorms, but RoPE over interleaved pairs (x0, x1), (x2, x3), ...
computed in fp32 (transformers repeat_interleaves the tables, as Cohere and GLM-4 do), one `use_bias` switch for
the biases of every projection (q/k/v/o and gate/up/down), head_dim 128 whatever the hidden size, and the LM head
tied to the embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import LLAMA_TP, CausalLM, DecoderModel


@dataclass(repr=False)
class Ernie4_5Config(PretrainedConfig):
    """transformers' Ernie4_5Config: its fields and defaults (ERNIE-4.5-0.3B's sizes, RoPE base 500000 where
    config.json names none, head_dim 128)."""

    model_type: ClassVar[str] = "ernie4_5"
    default_theta: ClassVar[float] = 500000.0
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("attention_dropout", "sliding_window")
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "use_bias")

    vocab_size: int = 103424
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 18
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    use_bias: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' ERNIE 4.5 builds a plain causal mask whatever the config says


class Ernie4_5DecoderLayer(nn.Module):
    def __init__(self, config: Ernie4_5Config, layer_idx: int):
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.use_bias
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=bias, rope_interleaved=True)  # fmt: skip
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Ernie4_5Model(DecoderModel):
    def __init__(self, config: Ernie4_5Config):
        super().__init__(config, Ernie4_5DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def gguf_write_config(m: dict[str, Any], c: Ernie4_5Config) -> None:
    """What llama.cpp's Ernie4_5Model writes: TextModel's keys with the head size as key/value length
    (transformers' config.json always has head_dim); no vocabulary size, no rope.dimension_count. llama.cpp's
    ernie4_5 reads optional q/k/v/o biases but none on the MLP, which `use_bias` also gives: refused."""
    if c.use_bias:
        raise ConfigError(
            "llama.cpp's 'ernie4_5' has no MLP biases: an ernie4_5 model with use_bias true cannot be written"
        )
    m.pop("vocab_size", None)
    m.pop("rope.dimension_count", None)


class Ernie4_5ForCausalLM(CausalLM):
    """transformers' Ernie4_5ForCausalLM."""

    config_class = Ernie4_5Config
    # llama.cpp's Ernie4_5Model (TextModel's tensor renaming, one to one): q/k not permuted (llama.cpp's ernie4_5
    # rotates interleaved pairs, as the checkpoint does), no output tensor where the head is tied; the head size
    # from attention.key_length, biases read off the tensors present
    gguf = GGUFLayout(
        "ernie4_5",
        config=(("attention.key_length", "head_dim"),),
        fixed=(("use_bias", False),),
        present=(("blk.0.attn_q.bias", "use_bias"),),
        write_config=gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP  # transformers' base_model_tp_plan for ERNIE 4.5
    _no_split_modules: ClassVar[list[str]] = ["Ernie4_5DecoderLayer"]

    def __init__(self, config: Ernie4_5Config):
        super().__init__(config, Ernie4_5Model(config))
