"""Granite MoE (IBM's granite-3.0-1b-a400m, 3b-a800m, granite-3.1-*-a*m): Granite's four multipliers (embeddings,
residual branches, attention scale, logits) around a sparse mixture of experts in every layer, with no shared
expert. The router takes the top k of its logits and the softmax over those k, as gpt-oss's does (the same
weights as the softmax over all experts renormalised over the top k, which is how llama.cpp computes it).

transformers 5 holds the block as `block_sparse_moe` with a `router` (its `weight`) and stacked
`experts.gate_up_proj` (E, 2I, h; gate rows first, then up) and `experts.down_proj` (E, h, I): the model's names.
Checkpoints on the Hub (and transformers' save_pretrained) keep the original JetMoE-style names,
`block_sparse_moe.input_linear.weight`, `output_linear.weight` and `router.layer.weight`, in the same layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GGUFLayout, Rename, RMSNorm, Router, SparseMoeBlock
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM, DecoderModel
from .granite import GraniteConfig, GraniteForCausalLM, GraniteModel
from .mixtral import MOE_TP, validate_experts


@dataclass(repr=False)
class GraniteMoeConfig(GraniteConfig):
    """transformers' GraniteMoeConfig: Granite's fields (no mlp_bias, no head_dim) plus the experts;
    `intermediate_size` is each expert's."""

    model_type: ClassVar[str] = "granitemoe"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.num_local_experts) or self.num_local_experts < 1:
            raise ConfigError(f"{self.source}: num_local_experts must be a positive integer, found "
                              f"{self.num_local_experts!r}")  # fmt: skip
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)


class GraniteMoeDecoderLayer(nn.Module):
    """Pre-norm attention (scaled by attention_multiplier) and a pre-norm mixture of experts, each branch scaled
    by residual_multiplier before its residual add."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, n = config.hidden_size, config.rms_norm_eps, config.num_local_experts
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=config.attention_bias, scale=config.attention_multiplier)  # fmt: skip
        router = Router(h, n, config.num_experts_per_tok, order="topk_softmax")
        experts = Experts(n, h, config.intermediate_size, config.hidden_act)
        self.block_sparse_moe = SparseMoeBlock(router, experts, router_name="router")
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.residual_multiplier = float(config.residual_multiplier)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx) * self.residual_multiplier
        return x + self.block_sparse_moe(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteMoeModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


def _renamed(checkpoint: str, model: str) -> Rename:
    """A tensor of the block under the checkpoint's name and the model's, both ways (whole names only)."""
    checkpoint, model = f".block_sparse_moe.{checkpoint}", f".block_sparse_moe.{model}"
    return Rename(re.escape(checkpoint) + "$", model, re.escape(model) + "$", checkpoint)


class GraniteMoeForCausalLM(CausalLM):
    """transformers' GraniteMoeForCausalLM."""

    config_class = GraniteMoeConfig
    checkpoint_rules = CheckpointRules(
        [
            _renamed("input_linear.weight", "experts.gate_up_proj"),
            _renamed("output_linear.weight", "experts.down_proj"),
            _renamed("router.layer.weight", "router.weight"),
            GGUFExperts(),  # llama.cpp's ffn_gate_exps / ffn_up_exps (input_linear split) and ffn_down_exps
        ]
    )
    # llama.cpp's GraniteMoeModel converter: Granite's (Llama's q/k permutation, the multipliers as "scale" keys)
    # with the experts' counts, input_linear split into gate and up, router.layer as ffn_gate_inp
    gguf = GGUFLayout(
        "granitemoe",
        permute_qk=True,
        config=(
            *GraniteForCausalLM.gguf.config,
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
        ),
        layer=(
            ("ffn_gate_inp", "block_sparse_moe.router"),
            ("ffn_gate_exps", "block_sparse_moe.experts.gate_proj"),
            ("ffn_up_exps", "block_sparse_moe.experts.up_proj"),
            ("ffn_down_exps", "block_sparse_moe.experts.down_proj"),
        ),
        present=(("blk.0.attn_q.bias", "attention_bias"),),
    )
    # attention split as Llama's; the experts cut their own intermediate rows (nn.Experts.shard)
    tp_patterns: ClassVar[dict[str, str]] = MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["GraniteMoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    finish_logits = GraniteForCausalLM.finish_logits  # the logits divided by logits_scaling
