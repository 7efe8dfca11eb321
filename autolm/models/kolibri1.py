"""Kolibri-1 (Aleph-Alpha/Kolibri-1, model_type kolibri1): a mixture of experts in every layer, assembled in
transformers from other families' pieces:

- attention: EXAONE 4's (models.exaone4): per-head RMSNorm on queries and keys, no biases; local (sliding-window)
  and global layers as `layer_types` says (by default every 5th layer global), and where a window is configured
  the global layers use no RoPE ("global NoPE"), else every layer rotates;
- the decoder layer: GLM-4's (models.glm4) four RMSNorms, the attention and MoE outputs normed again before each
  residual add;
- the mixture: DeepSeek V3's block (routed experts plus `shared_experts`, one ungated gated MLP of
  `shared_expert_intermediate_size` every token passes) over Qwen 3 MoE's stacked experts, with a router of its
  own: the experts chosen by the top k of the fp32 logits + `e_score_correction_bias` (not of the sigmoid scores
  + it, as DeepSeek V3's), weighted by the sigmoid of their plain logits, renormalised only with
  `norm_topk_prob`; no groups, no scaling.

The config is Qwen 3 MoE's without its dense-MLP, window-switch and bias fields (transformers deletes
intermediate_size, use_sliding_window, decoder_sparse_step, mlp_only_layers, attention_bias, router_aux_loss_coef),
`num_experts` written as `num_local_experts`. Checkpoints (Aleph Alpha's, and transformers' save_pretrained) keep
one tensor per expert, the correction bias as `moe.router.expert_bias` and the two output norms as `post_attn_norm`
/ `post_ffn_norm`; the model holds transformers' names. llama.cpp has no Kolibri architecture: no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, GroupedRouter, Rename, RMSNorm, SparseMoeBlock
from .base import CausalLM, DecoderModel
from .exaone4 import Exaone4Config
from .glm4 import Glm4DecoderLayer
from .glm4_moe import GROUPED_MOE_TP
from .mixtral import validate_experts
from .qwen2_moe import QWEN_MOE_RULES

GLOBAL_EVERY = 5  # transformers' default layer_types: every 5th layer global


@dataclass(repr=False)
class Kolibri1Config(PretrainedConfig):
    """transformers' Kolibri1Config: its fields and defaults (Kolibri-1's sizes)."""

    model_type: ClassVar[str] = "kolibri1"
    absent_keys: ClassVar[tuple[str, ...]] = ("intermediate_size",)  # not in transformers' config
    attribute_map: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "norm_topk_prob",
                                              "output_router_logits")  # fmt: skip

    vocab_size: int = 128000
    hidden_size: int = 2560
    num_hidden_layers: int = 50
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    max_position_embeddings: int = 262144
    sliding_window: int | None = 513
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 6
    num_experts: int = 384
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:  # else the base validation names the key
            self.layer_types = [
                "sliding_attention" if (i + 1) % GLOBAL_EVERY else "full_attention" for i in range(n)
            ]
        super().__post_init__()

    layer_rope = Exaone4Config.layer_rope  # no RoPE on global layers where a window is configured
    num_local_experts = property(lambda self: self.num_experts)  # transformers' alias

    def validate(self) -> None:
        super().validate()
        src = self.source
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError(f"{src}: sliding_window must be a positive integer where layer_types has "
                              "sliding_attention layers, found null")  # fmt: skip
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        positive_ints(self, ("moe_intermediate_size", "shared_expert_intermediate_size"), 1 << 19)


class Kolibri1TopKRouter(GroupedRouter):
    """transformers' Kolibri1TopKRouter: fp32 logits; the top k of logits + e_score_correction_bias chosen, their
    sigmoid(logit) weights renormalised only with `normalize` (no epsilon); fp32 weights."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__(hidden, num_experts, top_k, normalize=normalize)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # (N, E)
        ids = torch.topk(logits + self.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        top = logits.gather(1, ids).sigmoid()
        if self.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return ids, top

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}"


def kolibri1_moe(config: Kolibri1Config) -> SparseMoeBlock:
    """The routed experts and the ungated shared experts (transformers' Kolibri1SparseMoeBlock)."""
    h, act = config.hidden_size, config.hidden_act
    router = Kolibri1TopKRouter(h, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob)
    experts = Experts(config.num_experts, h, config.moe_intermediate_size, act)
    shared = GatedMLP(h, config.shared_expert_intermediate_size, act)
    return SparseMoeBlock(router, experts, shared_experts=shared)


class Kolibri1DecoderLayer(Glm4DecoderLayer):
    """GLM-4's sandwich-normed layer (its forward) over EXAONE 4's attention and the mixture of experts."""

    def __init__(self, config: Kolibri1Config, layer_idx: int):
        nn.Module.__init__(self)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, window=config.layer_window(layer_idx),
                                   rope=config.layer_rope(layer_idx), qk_norm="head",
                                   norm=lambda dim: RMSNorm(dim, eps))  # fmt: skip
        self.mlp = kolibri1_moe(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)  # before the mixture, despite its name
        self.post_self_attn_layernorm = RMSNorm(h, eps)
        self.post_mlp_layernorm = RMSNorm(h, eps)


class Kolibri1Model(DecoderModel):
    def __init__(self, config: Kolibri1Config):
        super().__init__(config, Kolibri1DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


# transformers' conversion for kolibri1: Qwen 2 MoE's per-expert tensors stacked, three names of the checkpoint's own
KOLIBRI1_RULES = CheckpointRules(
    [
        Rename(r"\.moe\.router\.expert_bias$", ".mlp.gate.e_score_correction_bias",
               r"\.mlp\.gate\.e_score_correction_bias$", ".moe.router.expert_bias"),
        Rename(r"\.post_attn_norm\.", ".post_self_attn_layernorm.", r"\.post_self_attn_layernorm\.", ".post_attn_norm."),
        Rename(r"\.post_ffn_norm\.", ".post_mlp_layernorm.", r"\.post_mlp_layernorm\.", ".post_ffn_norm."),
        *QWEN_MOE_RULES.stacked,
    ]
)  # fmt: skip


class Kolibri1ForCausalLM(CausalLM):
    """transformers' Kolibri1ForCausalLM."""

    config_class = Kolibri1Config
    checkpoint_rules = KOLIBRI1_RULES
    # heads split as in Llama (the per-head q/k norms whole on every rank), the shared experts as Llama's MLP; the
    # routed experts cut their own intermediate rows
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Kolibri1DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: Any):
        super().__init__(config, Kolibri1Model(config))
