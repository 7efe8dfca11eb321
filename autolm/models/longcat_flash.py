"""Meituan LongCat-Flash: each decoder layer holds two attention + MLP sublayers and one mixture of experts that
reads the first sublayer's MLP input and joins the residual stream only at the layer's end (the "shortcut-connected
MoE"):

    x = x + self_attn[0](input_layernorm[0](x));  h = post_attention_layernorm[0](x)
    shortcut = mlp(h);  x = x + mlps[0](h)
    x = x + self_attn[1](input_layernorm[1](x));  x = x + mlps[1](post_attention_layernorm[1](x)) + shortcut

The attention is DeepSeek-V3's Multi-head Latent Attention (models.deepseek_v3; transformers builds it on
DeepseekV32Attention but deletes its indexer, so only the MLA part runs), always with the low-rank query and
interleaved RoPE pairs, and with LongCat's "LoRA scaling": the query times sqrt(hidden_size / q_lora_rank) and the
normed KV latent times sqrt(hidden_size / kv_lora_rank) before kv_b_proj. Neither q_b_proj nor kv_b_proj has a bias,
so autolm scales the two low-rank norms' outputs instead (`ScaledRMSNorm`). Sublayer j of decoder layer i is
attention layer 2 i + j: the KV cache holds two layers per decoder layer (transformers' num_hidden_layers is
2 * num_layers; autolm's config.num_hidden_layers counts the decoder layers, written as num_layers).

The router (`mlp.router`) takes a softmax in fp32 over n_routed_experts + zero_expert_num logits of
`router.classifier` (its bias, where `router_bias` makes one, is never added, as transformers), chooses the top
`moe_topk` by score + `e_score_correction_bias` and weights them by their plain scores times routed_scaling_factor,
never renormalised. Experts from n_routed_experts on are zero-computation experts: they return their input.
Checkpoints keep one gate/up/down tensor per expert; transformers also stores gate/up rows for the zero experts
(never used), so the stacked gate_up_proj has n_routed_experts + zero_expert_num entries and down_proj
n_routed_experts.

The compiled one-token graphs (one per decoder layer, one cache layer each) do not run it; the eager one-token
step and the torch.compile'd forward do. llama.cpp has no LongCat-Flash architecture: no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GatedMLP, Ignored, RMSNorm, Router, SparseMoeBlock
from .base import CausalLM, DecoderModel
from .deepseek_v3 import LORA_NORM_EPS, DeepseekV3Attention, DeepseekV3Config
from .qwen2_moe import QWEN_MOE_RULES

DEFAULT_THETA = 10000000.0  # transformers' default_theta for LongCat-Flash


@dataclass(repr=False)
class LongcatFlashConfig(PretrainedConfig):
    """transformers' LongcatFlashConfig: its fields and defaults. config.json's num_layers, ffn_hidden_size,
    expert_ffn_hidden_size and moe_topk read as num_hidden_layers (decoder layers), intermediate_size (the dense
    MLPs), moe_intermediate_size and num_experts_per_tok. head_dim is the RoPE tables' width and must equal
    qk_rope_head_dim; qk_head_dim is qk_nope_head_dim + qk_rope_head_dim (derived where null)."""

    model_type: ClassVar[str] = "longcat_flash"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "moe_intermediate_size": "expert_ffn_hidden_size",
        "num_experts_per_tok": "moe_topk",
    }
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "output_router_logits",
    )
    rope_interleave: ClassVar[bool] = True  # DeepSeek-V3's attention reads it: LongCat always turns pairs

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 64
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    intermediate_size: int = 12288
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    head_dim: int | None = 64
    v_head_dim: int = 128
    qk_head_dim: int | None = None
    num_experts_per_tok: int = 12
    n_routed_experts: int = 512
    output_router_logits: bool = False
    zero_expert_num: int = 256
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 6.0
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": DEFAULT_THETA}
    )

    # the score scale, as DeepSeek-V3's (qk_head_dim ** -0.5, YaRN's mscale_all_dim squared)
    attention_scale = DeepseekV3Config.attention_scale

    def __post_init__(self) -> None:
        if self.qk_head_dim is None and _is_int(self.qk_nope_head_dim) and _is_int(self.qk_rope_head_dim):
            self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """The base reading, with LongCat's default rope_theta (1e7) where config.json gives none."""
        given = d.get("rope_theta") is not None or "rope_theta" in (d.get("rope_parameters") or {})
        rope, spelling = super().read_rope(d, source)
        if not given:
            rope["rope_theta"] = DEFAULT_THETA
        return rope, spelling

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_local_experts(self) -> int:
        return self.n_routed_experts

    def validate(self) -> None:
        src, names = self.source, {**self.attribute_map}
        for name in ("num_hidden_layers", "intermediate_size", "moe_intermediate_size", "qk_rope_head_dim",
                     "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank", "n_routed_experts"):  # fmt: skip
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= 1 << 19:
                raise ConfigError(f"{src}: {names.get(name, name)} must be a positive integer, found {v!r}")
        z = self.zero_expert_num
        if z is not None and not (_is_int(z) and 0 <= z <= 1 << 12):
            raise ConfigError(f"{src}: zero_expert_num must be a non-negative integer or null, found {z!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"{src}: qk_rope_head_dim must be even (RoPE turns pairs), found {self.qk_rope_head_dim}"
            )
        if self.head_dim != self.qk_rope_head_dim:
            raise ConfigError(f"{src}: head_dim ({self.head_dim!r}) is the RoPE tables' width and must equal "
                              f"qk_rope_head_dim ({self.qk_rope_head_dim})")  # fmt: skip
        if self.qk_head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ConfigError(f"{src}: qk_head_dim ({self.qk_head_dim!r}) must be qk_nope_head_dim + "
                              f"qk_rope_head_dim ({self.qk_nope_head_dim + self.qk_rope_head_dim})")  # fmt: skip
        total, k = self.n_routed_experts + (z or 0), self.num_experts_per_tok
        if not _is_int(k) or not 0 < k <= total:
            raise ConfigError(f"{src}: moe_topk must be an integer in [1, {total}] (n_routed_experts + "
                              f"zero_expert_num), found {k!r}")  # fmt: skip
        r = self.routed_scaling_factor
        if not _is_number(r) or r <= 0:
            raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, found {r!r}")
        if not isinstance(self.extra.get("router_bias", False), bool):
            raise ConfigError(
                f"{src}: router_bias must be true or false, found {self.extra['router_bias']!r}"
            )
        super().validate()
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                              f"({self.num_attention_heads}): MLA gives every head its own keys and values")  # fmt: skip


class ScaledRMSNorm(RMSNorm):
    """RMSNorm whose output is multiplied by a constant (LongCat's MLA "LoRA scaling")."""

    def __init__(self, dim: int, eps: float, scale: float):
        super().__init__(dim, eps)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.6g}"


class LongcatFlashMLA(DeepseekV3Attention):
    """DeepSeek-V3's MLA with the query and the normed KV latent scaled by sqrt(hidden_size / rank): as the
    projections after them have no bias, the low-rank norms' outputs carry the scales."""

    def __init__(self, config: LongcatFlashConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.q_a_layernorm = ScaledRMSNorm(config.q_lora_rank, LORA_NORM_EPS, (h / config.q_lora_rank) ** 0.5)
        self.kv_a_layernorm = ScaledRMSNorm(
            config.kv_lora_rank, LORA_NORM_EPS, (h / config.kv_lora_rank) ** 0.5
        )


class RouterClassifier(nn.Module):
    """transformers' `router.classifier` weights (E, h) and optional bias, which the router reads (not a Linear:
    it is never quantized, and the bias is never added)."""

    def __init__(self, hidden: int, experts: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.bias = nn.Parameter(torch.empty(experts)) if bias else None


class LongcatFlashRouter(Router):
    """Softmax over the routed and zero-computation experts in fp32; the top k by score + e_score_correction_bias,
    weighted by their scores times routed_scaling_factor (fp32, not renormalised)."""

    def __init__(self, config: LongcatFlashConfig):
        nn.Module.__init__(self)
        experts = config.n_routed_experts + (config.zero_expert_num or 0)
        self.classifier = RouterClassifier(
            config.hidden_size, experts, config.extra.get("router_bias", False)
        )
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))
        self.top_k, self.num_experts = config.num_experts_per_tok, experts
        self.scaling = float(config.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.classifier.weight.float()).softmax(dim=-1)  # (N, E)
        ids = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        return ids, scores.gather(1, ids) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}"


class ZeroComputeExperts(Experts):
    """Stacked experts whose ids from `num_routed` on return their input (zero-computation experts). gate_up_proj
    holds every id's rows (transformers' layout: the zero experts' are never read), down_proj the routed ones'."""

    def __init__(self, config: LongcatFlashConfig):
        n, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        super().__init__(n + (config.zero_expert_num or 0), h, i, config.hidden_act)
        self.num_routed = n
        self.down_proj = nn.Parameter(torch.empty(n, h, i))

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """A zero expert's output: its input (under tensor parallelism on rank 0 only, as the ranks' sum)."""
        return x if self.tp is None or self.tp[0] == 0 else torch.zeros_like(x)

    def expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        if isinstance(e, int):
            return self.identity(x) if e >= self.num_routed else super().expert(x, e)
        y = super().expert(x, e.clamp(max=self.num_routed - 1))  # each row's own expert (a compiled graph)
        return torch.where((e >= self.num_routed).unsqueeze(-1), self.identity(x), y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.num_experts - self.num_routed} of them zero-computation"


class LongcatFlashDecoderLayer(nn.Module):
    """Two pre-norm attention + MLP sublayers (attention layers 2 i and 2 i + 1) and the shortcut-connected MoE
    (see the module docstring)."""

    def __init__(self, config: LongcatFlashConfig, layer_idx: int):
        super().__init__()
        h, eps, act = config.hidden_size, config.rms_norm_eps, config.hidden_act
        experts = ZeroComputeExperts(config)
        self.mlp = SparseMoeBlock(LongcatFlashRouter(config), experts, router_name="router")
        self.self_attn = nn.ModuleList(LongcatFlashMLA(config, 2 * layer_idx + j) for j in range(2))
        self.mlps = nn.ModuleList(GatedMLP(h, config.intermediate_size, act) for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(h, eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(h, eps) for _ in range(2))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn[0](self.input_layernorm[0](x), ctx)
        h = self.post_attention_layernorm[0](x)
        shortcut = self.mlp(h)
        x = x + self.mlps[0](h)
        x = x + self.self_attn[1](self.input_layernorm[1](x), ctx)
        return x + self.mlps[1](self.post_attention_layernorm[1](x)) + shortcut


class LongcatFlashForCausalLM(CausalLM):
    """transformers' LongcatFlashForCausalLM."""

    config_class = LongcatFlashConfig
    # one tensor per expert on disk (the zero experts' gate/up rows too); the multi-token prediction module some
    # checkpoints carry (model.mtp.*) is skipped, as transformers skips it
    checkpoint_rules = CheckpointRules([*QWEN_MOE_RULES.rules, Ignored(r"model\.mtp\..*")])
    # transformers' plan: each MLA's query (q_b_proj, or q_proj without a low rank) and kv_b_proj column-parallel,
    # o_proj row-parallel (the low-rank projections and their norms whole), the two dense MLPs' gate/up column-, down
    # row-parallel, each routed expert's intermediate rows cut (Experts.shard; the zero experts' identity added once)
    tp_patterns: ClassVar[dict[str, str]] = {
        **{f"layers.*.self_attn.*.{p}": "colwise" for p in ("q_proj", "q_b_proj", "kv_b_proj")},
        "layers.*.self_attn.*.o_proj": "rowwise",
        **{f"layers.*.mlps.*.{p}": s for p, s in (("gate_proj", "colwise"), ("up_proj", "colwise"),
                                                   ("down_proj", "rowwise"))},
    }  # fmt: skip
    # one compiled graph per decoder layer reads one cache layer; LongCat's layers write two
    compiled_graphs: ClassVar[bool] = False
    _no_split_modules: ClassVar[list[str]] = ["LongcatFlashDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["router.classifier"]  # as transformers

    def __init__(self, config: LongcatFlashConfig):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, LongcatFlashDecoderLayer, norm))

    def attention_shapes(self) -> list[tuple[int, int]]:
        """Two cache layers per decoder layer: (heads, padded head width) of each of its attention sublayers."""
        return [(a.num_kv_heads, a.head_dim) for layer in self.model.layers for a in layer.self_attn]

    def layer_devices(self) -> list[torch.device]:
        return [d for d in super().layer_devices() for _ in range(2)]
