"""Flint (Recursive's Flint): Qwen 3 MoE's layers with gpt-oss' RMSNorm (the weight multiplied in fp32) and
attention sinks, and a mixture routed by sigmoid scores with an ungated shared expert.

Attention: grouped-query attention with per-head q/k RMSNorms (before RoPE) and a learned sink logit per head
(`self_attn.sinks`, the Hub's `self_attn.softmax_offset`). Layers are full attention or sliding-window per
`layer_types` (by default full on the first two layers, every fourth layer from layer 1 and the last one), and only
the sliding-window layers are rotary: full-attention layers have no positional encoding at all. `sliding_window`
must be a positive integer (transformers refuses null).

Feed-forward: a dense gated MLP in `mlp_only_layers` (by default layers 0 and 1; or where `decoder_sparse_step`
skips a layer), elsewhere `num_experts` gated MLPs chosen by the top `num_experts_per_tok` sigmoids of the router's
fp32 logits (no correction bias), renormalised where `norm_topk_prob`, plus `shared_expert` (a gated MLP of
shared_expert_intermediate_size) that every token passes, unweighted (Qwen 2 MoE gates its shared expert; Flint does
not). The router's weight and the sinks stay in fp32 under a half-precision dtype, as transformers keeps them.
Checkpoints keep one gate/up/down tensor per expert (Qwen MoE's rules). llama.cpp has no Flint architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, Rename, Router, SparseMoeBlock
from .base import LLAMA_TP, CausalLM
from .gpt_oss import GptOssDecoderLayer
from .granite_swa import SinkShardedAttention
from .mixtral import MixtralModel
from .qwen2_moe import QWEN_MOE_RULES, QwenMoeConfig
from .qwen3_moe import Qwen3MoeDecoderLayer


@dataclass(repr=False)
class FlintConfig(QwenMoeConfig):
    """transformers' FlintConfig: Qwen 2 MoE's fields without use_sliding_window, max_window_layers and qkv_bias
    (not written unless set), with head_dim and attention_bias; layer_types and mlp_only_layers derived as
    transformers derives them where config.json gives none."""

    model_type: ClassVar[str] = "flint"
    absent_keys: ClassVar[tuple[str, ...]] = ("max_window_layers", "mlp_bias", "use_sliding_window")
    vocab_size: int = 150144
    intermediate_size: int = 6144
    num_hidden_layers: int = 49
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    max_position_embeddings: int = 262144
    sliding_window: int | None = 513
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 1024
    num_experts_per_tok: int = 6
    num_experts: int = 256
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0005

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n):
            self.layer_types = [
                "full_attention" if i < 2 or i % 4 == 1 or i == n - 1 else "sliding_attention"
                for i in range(n)
            ]
        if self.mlp_only_layers is None:
            self.mlp_only_layers = [0, 1]
        super().__post_init__()

    qk_norm = property(lambda self: True)

    def validate(self) -> None:
        w = self.sliding_window
        if not _is_int(w) or w < 1:
            raise ConfigError(f"{self.source}: sliding_window must be a positive integer, found {w!r}")
        super().validate()


class FlintRouter(Router):
    """transformers' FlintTopKRouter: the logits in fp32 (whatever the weight's dtype), the top k of their sigmoids,
    renormalised where `normalize`; the weights stay fp32."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__(hidden, num_experts, top_k, normalize=normalize, keep_fp32=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        top, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top


class FlintSparseMoeBlock(SparseMoeBlock):
    """Router (`gate`) + stacked experts + `shared_expert`, added in full (no shared_expert_gate)."""

    def __init__(self, router: Router, experts: Experts, shared_expert: nn.Module):
        super().__init__(router, experts)
        self.shared_expert = shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        y = self.experts(flat, *self.gate(flat))
        return (y + self.shared_expert(flat)).view(B, T, h)


class FlintDecoderLayer(Qwen3MoeDecoderLayer):
    """Pre-norm attention with sinks (RoPE on the sliding-window layers only), then a pre-norm dense MLP or the
    mixture; gpt-oss' RMSNorm everywhere, the q/k norms too."""

    norm = staticmethod(GptOssDecoderLayer.norm)

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        window = config.layer_window(layer_idx)
        return SinkShardedAttention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, window=window,
                         rope=None if window is None else "default", qk_norm="head",
                         norm=lambda dim: self.norm(config, dim), sinks=True)  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act, n = config.hidden_size, config.hidden_act, config.num_experts
        if not config.sparse(layer_idx):
            return GatedMLP(h, config.intermediate_size, act)
        router = FlintRouter(h, n, config.num_experts_per_tok, config.norm_topk_prob)
        experts = Experts(n, h, config.moe_intermediate_size, act)
        return FlintSparseMoeBlock(router, experts, GatedMLP(h, config.shared_expert_intermediate_size, act))


class FlintForCausalLM(CausalLM):
    """transformers' FlintForCausalLM."""

    config_class = FlintConfig
    # per-expert tensors stacked; the checkpoint's softmax_offset is the model's sinks (transformers' conversion mapping,
    # which save_pretrained reverses)
    checkpoint_rules = CheckpointRules(
        [
            *QWEN_MOE_RULES.rules,
            Rename(
                r"\.self_attn\.softmax_offset$",
                ".self_attn.sinks",
                r"\.self_attn\.sinks$",
                ".self_attn.softmax_offset",
            ),
        ]
    )
    # transformers' plan splits the MLPs only: the dense MLP's and the shared expert's gate/up column-parallel, down
    # row-parallel, each expert's intermediate rows cut (Experts.shard). Here the heads are split too (q/k/v
    # column-, o row-parallel, the sinks cut by head: SinkShardedAttention; the per-head q/k norms and the router whole)
    tp_patterns: ClassVar[dict[str, str]] = {
        **LLAMA_TP,
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["FlintDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["gate.weight", "sinks"]  # as transformers

    def __init__(self, config: FlintConfig):
        super().__init__(config, MixtralModel(config, FlintDecoderLayer))
