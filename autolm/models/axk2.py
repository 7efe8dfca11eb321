"""A.X-K2 (SK Telecom: A.X-K2, A.X-K2-Light): DeepSeek-V3.2's indexed Multi-head Latent Attention (models.deepseek_v32:
the lightning indexer keeps the top `index_topk` keys of each query) in A.X-K1's layers (models.axk1: dense or mixture
by `mlp_layer_types`, derived from `first_k_dense_replace` / `moe_layer_freq` where absent), with these changes:

- the query's low rank feeds both halves of one projection: q_compressed = q_a_proj(x), q_resid =
  q_a_layernorm(q_compressed), and `q_gate_proj`([q_resid | q_compressed]) gives per head the query (qk_head_dim)
  and an output gate (v_head_dim): the heads' output times sigmoid(gate) in fp32 before `o_proj`. The indexer reads
  q_resid, as DeepSeek-V3.2's.
- `input_layernorm` (every layer) and `post_attention_layernorm` (mixture layers; a plain RMSNorm on dense ones) are
  gated RMSNorms: y = norm(x), y * sigmoid(mlp.fc2(silu(mlp.fc1(y)))) in fp32, a low-rank (`gated_norm_rank`) gate.
- routing is DeepSeek-V3's sigmoid routing, grouped only where `n_group` / `topk_group` are set (A.X-K2-Light: both
  null, every expert a candidate); the groups not kept score 0 (not -inf) in the choice, as the reference does.

The released files name the query projection `self_attn.q_b_proj` and the gates' projections `W_down` / `W_up`
(transformers renames them while loading, back while saving; so does autolm) and keep one tensor per expert.
llama.cpp has no A.X-K2 architecture: no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GatedMLP, GroupedRouter, Linear, Rename, RMSNorm, SparseMoeBlock
from .axk1 import AXK1Config
from .deepseek_v32 import (
    DeepseekV32Attention,
    DeepseekV32Config,
    DeepseekV32DecoderLayer,
    DeepseekV32ForCausalLM,
    IndexedCausalLM,
)
from .mixtral import MixtralModel
from .qwen2_moe import QWEN_MOE_RULES
from .qwen4_exp_qsa import MaskedContext


@dataclass(repr=False)
class AXK2Config(AXK1Config, DeepseekV32Config):
    """transformers' AXK2Config: DeepSeek-V3.2's fields (the indexer's) with A.X-K1's mlp_layer_types derivation,
    A.X-K2-Light's sizes, `gated_norm_rank`, and n_group / topk_group null by default (no groups)."""

    model_type: ClassVar[str] = "axk2"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "sliding_window",
        "rope_interleave",
        "first_k_dense_replace",
        "mlp_bias",
    )

    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 5120
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 128
    q_lora_rank: int | None = 384
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    qk_nope_head_dim: int = 64
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 163691
    eos_token_id: int | list[int] | None = 163691
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 16
    gated_norm_rank: int = 16

    def validate(self) -> None:
        src, grouped = self.source, self.n_group is not None
        if grouped != (self.topk_group is not None):
            raise ConfigError(f"{src}: n_group and topk_group must be set together (both null: no groups), found "
                              f"n_group {self.n_group!r}, topk_group {self.topk_group!r}")  # fmt: skip
        if not _is_int(self.gated_norm_rank) or not 0 < self.gated_norm_rank <= 1 << 17:
            raise ConfigError(
                f"{src}: gated_norm_rank must be a positive integer, found {self.gated_norm_rank!r}"
            )
        if grouped:
            return super().validate()
        self.n_group = self.topk_group = 1  # no groups: DeepSeek-V3's checks as one group, which routes alike
        try:
            super().validate()
        finally:
            self.n_group = self.topk_group = None


class AXK2Router(GroupedRouter):
    """transformers' AXK2TopkRouter: DeepSeek-V3's sigmoid routing, its groups only where n_group is set, the groups
    not kept scoring 0 in the choice (the weights fp32, times routed_scaling_factor)."""

    def __init__(self, config: AXK2Config):
        grouped = config.n_group is not None
        super().__init__(config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                         n_group=config.n_group if grouped else 1, topk_group=config.topk_group if grouped else 1,
                         normalize=config.norm_topk_prob, scaling=float(config.routed_scaling_factor))  # fmt: skip
        self.grouped = grouped

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.nn.functional.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.grouped:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, groups)
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0)
            choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, 0.0).view(-1, self.num_experts)
        ids = torch.topk(choice, self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        if self.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, top * self.scaling


class AXK2GateMLP(nn.Module):
    """fc2(silu(fc1(x))): the gated norm's low-rank gate (transformers' CLIPMLP names)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.fc1 = Linear(hidden, rank, bias=False)
        self.fc2 = Linear(rank, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.silu(self.fc1(x)))


class AXK2GatedRMSNorm(nn.Module):
    """y = norm(x); y * sigmoid(mlp(y)) in fp32, cast back."""

    def __init__(self, config: AXK2Config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = AXK2GateMLP(config.hidden_size, config.gated_norm_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y * torch.sigmoid(self.mlp(y).float())).to(y.dtype)


class AXK2Attention(DeepseekV32Attention):
    """DeepSeek-V3.2's indexed latent attention with the fused query and output gate (module docstring)."""

    def __init__(self, config: AXK2Config, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        del self.q_b_proj
        self.q_gate_proj = Linear(
            2 * config.q_lora_rank, self.num_heads * (self.qk_dim + self.v_dim), bias=False
        )

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        compressed = self.q_a_proj(x)
        resid = self.q_a_layernorm(compressed)
        qg = self.q_gate_proj(torch.cat((resid, compressed), dim=-1)).view(B, T, self.num_heads, -1)
        q, g = qg.split((self.qk_dim, self.v_dim), dim=-1)
        y = self.heads(x, q.reshape(B, T, -1), MaskedContext(ctx, self.indexer(x, resid, ctx)))
        return self.o_proj((y * torch.sigmoid(g.reshape(B, T, -1).float())).to(y.dtype))


class AXK2DecoderLayer(DeepseekV32DecoderLayer):
    """Gated pre-norm indexed MLA, then a (gated, for the mixture) pre-norm dense MLP or mixture."""

    def __init__(self, config: AXK2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.input_layernorm = AXK2GatedRMSNorm(config)
        if isinstance(self.mlp, SparseMoeBlock):
            self.post_attention_layernorm = AXK2GatedRMSNorm(config)

    def make_attention(self, config: AXK2Config, layer_idx: int) -> nn.Module:
        return AXK2Attention(config, layer_idx, config.num_hidden_layers + layer_idx)

    def make_mlp(self, config: AXK2Config, layer_idx: int) -> nn.Module:
        h, act, inter = config.hidden_size, config.hidden_act, config.moe_intermediate_size
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.intermediate_size, act)
        experts = Experts(config.n_routed_experts, h, inter, act)
        shared = GatedMLP(h, inter * config.n_shared_experts, act)
        return SparseMoeBlock(AXK2Router(config), experts, shared_experts=shared)


class AXK2ForCausalLM(IndexedCausalLM):
    """transformers' AXK2ForCausalLM."""

    config_class = AXK2Config
    # per-expert tensors stacked; the released names of the fused query projection and the gates' low rank
    checkpoint_rules = CheckpointRules(
        [
            *QWEN_MOE_RULES.rules,
            Rename(r"\.self_attn\.q_b_proj\.", ".self_attn.q_gate_proj.", r"\.self_attn\.q_gate_proj\.",
                   ".self_attn.q_b_proj."),
            Rename(r"_layernorm\.W_down\.", "_layernorm.mlp.fc1.", r"_layernorm\.mlp\.fc1\.", "_layernorm.W_down."),
            Rename(r"_layernorm\.W_up\.", "_layernorm.mlp.fc2.", r"_layernorm\.mlp\.fc2\.", "_layernorm.W_up."),
        ]
    )  # fmt: skip
    # DeepSeek-V3's plan, the fused query and gate column-parallel (its rows are per head: [query | gate] of each);
    # the low ranks, the indexer, the gated norms and the router whole
    tp_patterns: ClassVar[dict[str, str]] = {
        **{
            k: v
            for k, v in DeepseekV32ForCausalLM.tp_patterns.items()
            if not k.endswith((".q_proj", ".q_b_proj"))
        },
        "layers.*.self_attn.q_gate_proj": "colwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["AXK2DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: AXK2Config):
        super().__init__(config, MixtralModel(config, AXK2DecoderLayer))
