"""FlexOlmo (AI2's FlexOlmo-7x7B-1T and its RT variant): OLMoE's layer (q/k norms over the whole projection, a top-k
mixture of experts in every layer: softmax over all experts in fp32, the top k, renormalised only with
`norm_topk_prob`) with OLMo 2's norm placement and arithmetic:

    x = x + post_attention_layernorm(self_attn(x))
    x = x + post_feedforward_layernorm(mlp(x))

no norm before the sublayers, every RMSNorm (the q/k norms and the final one too) multiplying its weight in fp32
before the cast back, as OLMo 2's; no clip_qkv; RoPE base 500000 where config.json names none. Checkpoints keep
one gate/up/down tensor per expert (`mlp.experts.3.gate_proj.weight`), as OLMoE's. llama.cpp has no FlexOlmo
architecture: no GGUF in or out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..nn import Attention, RMSNorm
from .base import CausalLM
from .mixtral import MixtralModel
from .olmo2 import Olmo2Config, Olmo2DecoderLayer
from .olmoe import OlmoeConfig, OlmoeDecoderLayer, OlmoeForCausalLM
from .qwen2_moe import QWEN_MOE_RULES


@dataclass(repr=False)
class FlexOlmoConfig(OlmoeConfig):
    """transformers' FlexOlmoConfig: OLMoE's fields (no clip_qkv) and FlexOlmo-7x7B's defaults."""

    model_type: ClassVar[str] = "flex_olmo"
    default_theta: ClassVar[float] = 500000.0
    absent_keys: ClassVar[tuple[str, ...]] = (*Olmo2Config.absent_keys, "clip_qkv")  # written when set

    vocab_size: int = 100352
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 100257
    num_experts_per_tok: int = 5
    num_experts: int = 7
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def validate_head_dim(self) -> None:
        """Any head_dim: FlexOlmo's q/k norms span num_heads * head_dim (OLMo 2's attention)."""


class FlexOlmoDecoderLayer(OlmoeDecoderLayer):
    """OLMoE's attention and experts, OLMo 2's norms: after each sublayer, before its residual add."""

    def __init__(self, config: FlexOlmoConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.post_feedforward_layernorm = self.norm(config, config.hidden_size)
        del self.input_layernorm  # as transformers' FlexOlmoDecoderLayer

    @staticmethod
    def norm(config: Any, dim: int) -> RMSNorm:
        return RMSNorm(dim, config.rms_norm_eps, weight_in_fp32=True)  # OLMo 2's arithmetic

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        """OLMo 2's attention: q/k norms over the whole projection, no clamp."""
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, qk_norm="full",
                         norm=lambda dim: self.norm(config, dim))  # fmt: skip

    forward = Olmo2DecoderLayer.forward  # x + post_attention_layernorm(self_attn(x)), then the same for mlp


class FlexOlmoForCausalLM(CausalLM):
    """transformers' FlexOlmoForCausalLM."""

    config_class = FlexOlmoConfig
    checkpoint_rules = QWEN_MOE_RULES  # per-expert gate/up/down tensors on disk, stacked in the model
    # as OLMoE's: q/k/v gathered whole on every rank for the whole-projection norms; the experts cut their own rows
    tp_patterns: ClassVar[dict[str, str]] = OlmoeForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["FlexOlmoDecoderLayer"]

    def __init__(self, config: FlexOlmoConfig):
        super().__init__(config, MixtralModel(config, FlexOlmoDecoderLayer))

    shard_heads = OlmoeForCausalLM.shard_heads  # every rank runs all heads: nothing to shard
