"""Mixtral: Mistral whose MLP is a sparse mixture of experts (each token's top-k of `num_local_experts` gated
MLPs, weighted by the renormalised softmax of the router's logits).

The decoder layer here is the one every mixture-of-experts family builds on (Qwen 2/3 MoE, gpt-oss): attention,
then a feed-forward block chosen per layer (`make_mlp`). Checkpoints on the Hub (and transformers'
save_pretrained) name the block `block_sparse_moe` and keep one w1/w2/w3 tensor per expert; the model holds
transformers 5's stacked `mlp.experts.gate_up_proj` (w1 and w3) and `mlp.experts.down_proj` (w2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GGUFLayout,
    Rename,
    RMSNorm,
    Router,
    SparseMoeBlock,
    Stacked,
)
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM, DecoderModel
from .mistral import MistralConfig

# llama.cpp's names for a mixture-of-experts layer's router and stacked experts (GGUFExperts joins the latter)
GGUF_EXPERTS = (
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.experts.gate_proj"),
    ("ffn_up_exps", "mlp.experts.up_proj"),
    ("ffn_down_exps", "mlp.experts.down_proj"),
)
# Attention and dense MLPs split as in Llama; the experts stay whole on every rank (see CausalLM.tp_plan).
MOE_TP = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}


@dataclass(repr=False)
class MixtralConfig(MistralConfig):
    """transformers' MixtralConfig."""

    model_type: ClassVar[str] = "mixtral"
    default_theta: ClassVar[float] = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    router_jitter_noise: float = 0.0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def validate(self) -> None:
        super().validate()
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        if not _is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise ConfigError(f"{self.source}: router_jitter_noise must be a number in [0, 1), found "
                              f"{self.router_jitter_noise!r}")  # fmt: skip


def validate_experts(config, experts: Any, top_k: Any) -> None:
    """ConfigError unless 0 < top_k <= experts, both integers."""
    if not _is_int(experts) or not 0 < experts <= 4096:
        raise ConfigError(
            f"{config.source}: the number of experts must be a positive integer, found {experts!r}"
        )
    if not _is_int(top_k) or not 0 < top_k <= experts:
        raise ConfigError(
            f"{config.source}: num_experts_per_tok must be an integer in [1, {experts}], found {top_k!r}"
        )


class MixtralDecoderLayer(nn.Module):
    """Pre-norm attention, then a pre-norm feed-forward block (`make_mlp`)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.self_attn = self.make_attention(config, layer_idx)
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = self.norm(config, config.hidden_size)
        self.post_attention_layernorm = self.norm(config, config.hidden_size)

    @staticmethod
    def norm(config: Any, dim: int) -> nn.Module:
        return RMSNorm(dim, config.rms_norm_eps)

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.qkv_bias, o_bias=config.o_bias, window=config.layer_window(layer_idx),
                         qk_norm="head" if config.qk_norm else None,
                         norm=lambda dim: self.norm(config, dim))  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        router = Router(
            config.hidden_size, config.num_local_experts, config.num_experts_per_tok, keep_fp32=True
        )
        experts = Experts(
            config.num_local_experts, config.hidden_size, config.intermediate_size, config.hidden_act
        )
        return SparseMoeBlock(router, experts, jitter_noise=config.router_jitter_noise)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MixtralModel(DecoderModel):
    def __init__(self, config: Any, layer_cls: type[nn.Module] = MixtralDecoderLayer):
        super().__init__(config, layer_cls, layer_cls.norm(config, config.hidden_size))


def _gguf_write_config(m: dict[str, Any], c: Any) -> None:
    """llama.cpp's LlamaModel writes no sliding window (its "llama" runs none)."""
    m.pop("attention.sliding_window", None)


class MixtralForCausalLM(CausalLM):
    """transformers' MixtralForCausalLM."""

    config_class = MixtralConfig
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"\.block_sparse_moe\.", ".mlp.", r"\.mlp\.", ".block_sparse_moe."),
            Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
            Stacked("down_proj", ("w2.weight",)),
            GGUFExperts(),
        ]
    )
    # llama.cpp writes Mixtral as "llama" with experts (models.gguf_families tells them apart by expert_count)
    gguf = GGUFLayout(
        "llama",
        permute_qk=True,
        config=(("expert_count", "num_local_experts"), ("expert_used_count", "num_experts_per_tok")),
        layer=GGUF_EXPERTS,
        write_config=_gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["MixtralDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config))
