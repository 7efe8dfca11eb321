"""DeepSeek-V2 (DeepSeek-V2, V2-Lite, V2.5, DeepSeek-Coder-V2 and its Lite): DeepSeek-V3's layers (models.deepseek_v3:
Multi-head Latent Attention, a dense MLP below `first_k_dense_replace`, then routed experts plus `shared_experts`)
with three differences.

RoPE always turns interleaved pairs: transformers multiplies (x0 + i x1, x2 + i x3, ...) by complex exponentials,
which is DeepSeek-V3's rope_interleave (pairs de-interleaved into rotate-half order, the same for q and k).

The router (`mlp.gate`, DeepseekV2TopkRouter) takes a softmax over the experts in fp32 and keeps the top
`num_experts_per_tok` probabilities, times `routed_scaling_factor`, never renormalised: transformers ignores
`norm_topk_prob`. With topk_method "group_limited_greedy" only the `topk_group` of `n_group` groups with the
highest single probability compete ("greedy" ignores the groups).

The dense MLPs and the shared experts have biases where `mlp_bias` says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, Router, SparseMoeBlock
from .base import CausalLM
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3Config, DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v3 import _gguf_config as _v3_gguf_config
from .deepseek_v3 import _gguf_write_config as _v3_gguf_write_config
from .mixtral import MixtralDecoderLayer, MixtralModel
from .qwen2_moe import QWEN_MOE_RULES

TOPK_METHODS = ("greedy", "group_limited_greedy")
SOFTMAX_GATING, SIGMOID_GATING = 1, 2  # llama.cpp's expert_gating_func values


@dataclass(repr=False)
class DeepseekV2Config(DeepseekV3Config):
    """transformers' DeepseekV2Config: its fields and defaults, but for num_experts_per_tok (transformers' null,
    which no model runs: DeepSeek-V2's 6). `rope_interleave` is always true (not written); n_group / topk_group
    may be null where topk_method is "greedy"; `moe_layer_freq` (DeepSeek's own config.json) must be 1, the only
    spacing transformers builds."""

    model_type: ClassVar[str] = "deepseek_v2"
    bool_fields: ClassVar[tuple[str, ...]] = (*DeepseekV3Config.bool_fields, "mlp_bias")

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int = 2
    n_routed_experts: int = 64
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = "greedy"
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        self.rope_interleave = True  # transformers' complex-number RoPE
        super().__post_init__()

    @property
    def grouped(self) -> bool:
        """Whether routing is limited to topk_group of n_group groups."""
        return self.topk_method == "group_limited_greedy"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("rope_interleave")
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers")  # DeepSeek-V3's, not transformers' DeepSeek-V2's
        return out

    def validate(self) -> None:
        src = self.source
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"{src}: topk_method must be one of {TOPK_METHODS}, found {self.topk_method!r}")
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if (v is not None or self.grouped) and not (_is_int(v) and 0 < v <= 1 << 12):
                raise ConfigError(f"{src}: {name} must be a positive integer"
                                  f"{'' if self.grouped else ' or null'}, found {v!r}")  # fmt: skip
        freq = self.extra.get("moe_layer_freq", 1)
        if freq != 1:
            raise ConfigError(f"{src}: moe_layer_freq must be 1 (experts in every layer from first_k_dense_replace "
                              f"on, as transformers builds DeepSeek-V2), found {freq!r}")  # fmt: skip
        groups = self.n_group, self.topk_group
        if not self.grouped:  # DeepSeek-V3's checks, with the one group greedy routing sees
            self.n_group = self.topk_group = 1
        try:
            super().validate()
        finally:
            self.n_group, self.topk_group = groups


class DeepseekV2TopkRouter(Router):
    """transformers' DeepseekV2TopkRouter: softmax probabilities in fp32, the top k (among the best `topk_group`
    groups by their highest probability when `n_group` is set), times `scaling`; the weights stay fp32."""

    def __init__(self, config: DeepseekV2Config):
        c = config
        super().__init__(
            c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, normalize=False, keep_fp32=True
        )
        self.n_group, self.topk_group = (c.n_group, c.topk_group) if c.grouped else (1, 1)
        self.scaling = float(c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # (N, E)
        if self.n_group > 1:
            grouped = probs.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.amax(dim=-1)  # (N, groups)
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0)
            probs = grouped.masked_fill(keep.unsqueeze(-1) == 0, 0.0).view(-1, self.num_experts)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        return ids, top * self.scaling

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, groups {self.topk_group} of {self.n_group}"


class DeepseekV2DecoderLayer(MixtralDecoderLayer):
    """Pre-norm MLA, then a pre-norm dense MLP (layers below first_k_dense_replace) or mixture of experts."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return DeepseekV3Attention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act, bias = config.hidden_size, config.hidden_act, config.mlp_bias
        if layer_idx < config.first_k_dense_replace:
            return GatedMLP(h, config.intermediate_size, act, bias=bias)
        experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act, bias=bias)
        return SparseMoeBlock(DeepseekV2TopkRouter(config), experts, shared_experts=shared)


# ---- GGUF: llama.cpp's DeepseekV2Model converter (arch "deepseek2", DeepSeek-V3's layout) -------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3's reading (models.deepseek_v3._gguf_config) for a softmax-routed file: no gating function or
    softmax; groups only where the file names them (they limit the routing: group_limited_greedy); the expert
    count read here (not a layout key, which would claim every deepseek2 file for this family)."""
    gating = get("expert_gating_func")
    if gating not in (None, SOFTMAX_GATING):
        raise ConfigError(
            f"expert_gating_func {gating!r}: DeepSeek-V2 routes with the softmax ({SOFTMAX_GATING})"
        )
    if get("expert_weights_norm"):
        raise ConfigError("expert_weights_norm: llama.cpp renormalises the chosen experts' weights; DeepSeek-V2 "
                          "(transformers' norm_topk_prob is ignored) does not")  # fmt: skip
    _v3_gguf_config(d, lambda key, *a: SIGMOID_GATING if key == "expert_gating_func" else get(key, *a))
    d["n_routed_experts"] = get("expert_count")
    d["n_group"], d["topk_group"] = get("expert_group_count"), get("expert_group_used_count")
    n, used = d["n_group"], d["topk_group"]
    limited = _is_int(n) and _is_int(used) and used < n
    d["topk_method"] = "group_limited_greedy" if limited else "greedy"


def _gguf_write_config(m: dict[str, Any], c: DeepseekV2Config) -> None:
    """DeepSeek-V3's keys (models.deepseek_v3._gguf_write_config), the expert count, the softmax gating function
    where config.json names it (scoring_func, as the converter). Refused: what llama.cpp's routing does otherwise:
    groups that limit the choice (llama.cpp ranks a group by its two best scores' sum, DeepSeek-V2 by the best;
    greedy routing ignores them, llama.cpp does not), norm_topk_prob (llama.cpp would renormalise)."""
    if c.extra.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"scoring_func {c.extra['scoring_func']!r}: DeepSeek-V2 routes with the softmax")
    if c.norm_topk_prob:
        raise ConfigError("norm_topk_prob: llama.cpp's deepseek2 would renormalise the chosen experts' weights, "
                          "which DeepSeek-V2 does not")  # fmt: skip
    if _is_int(c.n_group) and _is_int(c.topk_group) and c.topk_group < c.n_group:
        raise ConfigError(f"n_group {c.n_group} / topk_group {c.topk_group} ({c.topk_method}): llama.cpp's deepseek2 "
                          "ranks the groups by their two best scores' sum, DeepSeek-V2 by the best one or not at all")  # fmt: skip
    _v3_gguf_write_config(m, c)
    m["expert_count"] = c.n_routed_experts
    if c.extra.get("scoring_func") == "softmax":
        m["expert_gating_func"] = SOFTMAX_GATING


def _gguf_layout():
    """DeepSeek-V3's layout without the expert count (read in _gguf_config) and the router's correction bias;
    no MLP biases in llama.cpp's deepseek2."""
    v3 = DeepseekV3ForCausalLM.gguf
    return dataclasses.replace(
        v3,
        config=tuple(kv for kv in v3.config if kv[0] != "expert_count"),
        layer=tuple(kv for kv in v3.layer if kv[0] != "exp_probs_b"),
        fixed=(*v3.fixed, ("mlp_bias", False)),
        derive=_gguf_config,
        write_config=_gguf_write_config,
        claim=None,
    )


class DeepseekV2ForCausalLM(CausalLM):
    """transformers' DeepseekV2ForCausalLM."""

    config_class = DeepseekV2Config
    # one tensor per expert on disk (Qwen MoE's rules); llama.cpp's attn_k_b / attn_v_b assembled (GGUFMla)
    checkpoint_rules = CheckpointRules([*QWEN_MOE_RULES.rules, GGUFMla()])
    # llama.cpp's DeepseekV2Model converter: DeepSeek-V3's names and keys (deepseek2 files without a gating
    # function, or with the softmax's, load as this family; DeepSeek-V3's carry the sigmoid's)
    gguf = _gguf_layout()
    # transformers' plan, as DeepSeek-V3's (models.deepseek_v3)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["DeepseekV2DecoderLayer"]

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config, MixtralModel(config, DeepseekV2DecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
