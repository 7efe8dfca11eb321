"""MiMo-V2-Flash (Xiaomi): Llama's pre-norm layers; per layer (`layer_types`, by default full attention in the first
layer and every 6th, sliding-window attention elsewhere) GQA whose sliding layers have twice `num_key_value_heads`
KV heads and gpt-oss' per-head attention sinks (`self_attn.sinks`, the checkpoint's `attention_sink_bias`). Queries
and keys have `head_dim` (192) dimensions, values `v_head_dim` (128), scaled by `attention_value_scale` after the
projection; scores are scaled by head_dim ** -0.5. RoPE is partial (the first int(head_dim * partial_rotary_factor)
dimensions of each head, rotate-half) with a table per layer type (rope_parameters by layer type: theta 5e6 for
full, 1e4 for sliding layers; partial_rotary_factor 0.334 where a type gives none, as transformers).
`sliding_window` counts the current token (config.json's `sliding_window_size` is one less, as transformers reads
it). Values are zero-padded to the query/key width so the KV cache holds one width per layer; the output takes the
first v_head_dim.

Per layer (`mlp_layer_types`, by default one dense layer then the mixture) a dense gated MLP or DeepSeek V3's
mixture of `n_routed_experts` gated MLPs (sigmoid routing steered by `mlp.gate.e_score_correction_bias`, groups,
renormalised and scaled top k) without shared experts. Checkpoints keep one tensor per expert; the Hub's
next-token-prediction block (`model.mtp.*`) is not loaded, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GroupedRouter,
    Ignored,
    Linear,
    Rename,
    SparseMoeBlock,
)
from ..nn.rope import apply_rotary
from .base import CausalLM
from .glm4_moe import validate_grouped_moe
from .mixtral import MixtralDecoderLayer, MixtralModel
from .qwen2_moe import QWEN_MOE_RULES

_KINDS = ("full_attention", "sliding_attention")
_THETA = {"full_attention": 5_000_000.0, "sliding_attention": 10_000.0}
_PARTIAL = 0.334  # transformers' partial_rotary_factor where a layer type's RoPE parameters give none


@dataclass(repr=False)
class MiMoV2FlashConfig(PretrainedConfig):
    """transformers' MiMoV2FlashConfig: its fields and defaults (rope_parameters by layer type; layer_types and
    mlp_layer_types derived where absent; `num_local_experts` is transformers' alias of n_routed_experts)."""

    model_type: ClassVar[str] = "mimo_v2_flash"
    partial_rotary_default: ClassVar[bool] = True  # the default RoPE rotates only the partial dimensions
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "norm_topk_prob",
        "output_router_logits",
    )

    vocab_size: int = 152576
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 4
    head_dim: int | None = 192
    v_head_dim: int = 128
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 8
    output_router_logits: bool = False
    n_routed_experts: int = 256
    routed_scaling_factor: float | None = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    sliding_window: int | None = 129
    mlp_layer_types: list[str] | None = None
    attention_value_scale: float | None = 0.707
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {
            kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": _PARTIAL}
            for kind, theta in _THETA.items()
        }
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, as transformers keeps them (its default where config.json has none)."""
        given = d.get("rope_parameters")
        if given is None:
            return cls.__dataclass_fields__["rope_parameters"].default_factory(), "v5"
        if not isinstance(given, dict) or not all(isinstance(given.get(k), dict) for k in _KINDS):
            raise ConfigError(f"{source}: rope_parameters must hold an object for each of {_KINDS}, found "
                              f"{str(given)[:100]}")  # fmt: skip
        kinds = {}
        for kind in _KINDS:
            inner = {
                "rope_parameters": given[kind],
                "max_position_embeddings": d.get("max_position_embeddings"),
            }
            kinds[kind], _ = super().read_rope(inner, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n):
            self.layer_types = [_KINDS[i != 0 and (i + 1) % 6 != 0] for i in range(n)]
        if self.mlp_layer_types is None and _is_int(n):
            self.mlp_layer_types = ["dense"] * min(n, 1) + ["sparse"] * max(n - 1, 0)
        elif isinstance(self.mlp_layer_types, list) and _is_int(n) and 0 < n < len(self.mlp_layer_types):
            self.mlp_layer_types = self.mlp_layer_types[:n]
        if self.routed_scaling_factor is None:  # the Hub's config.json has null: transformers reads 1.0
            self.routed_scaling_factor = 1.0
        size = self.extra.get("sliding_window_size")
        if size is not None:  # the reference attends to sliding_window_size previous tokens and the query
            self.sliding_window = size + 1 if _is_int(size) else size
        super().__post_init__()

    num_local_experts = property(lambda self: self.n_routed_experts)  # transformers' alias
    first_k_dense_replace = property(lambda self: 0)  # validate_grouped_moe's; mlp_layer_types decides
    n_shared_experts = property(lambda self: 1)  # validate_grouped_moe's; there are none

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {
            k: {"partial_rotary_factor": _PARTIAL, **self.rope_parameters[k]} for k in set(self.layer_types)
        }

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_grouped_moe(self)
        v = self.v_head_dim
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{src}: v_head_dim must be a positive integer, found {v!r}")
        s = self.attention_value_scale
        if s is not None and not _is_number(s):
            raise ConfigError(f"{src}: attention_value_scale must be a number or null, found {s!r}")
        types = self.mlp_layer_types
        if (not isinstance(types, list) or len(types) != self.num_hidden_layers
                or any(t not in ("dense", "sparse") for t in types)):  # fmt: skip
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                              f"{self.num_hidden_layers} layers, found {types!r}")  # fmt: skip
        for kind, rope in self.rope_kinds().items():
            rotary = (
                int(self.head_dim * rope["partial_rotary_factor"])
                if _is_number(rope["partial_rotary_factor"])
                else 0
            )
            if rotary < 2 or rotary % 2 or rotary > self.head_dim:
                raise ConfigError(f"{src}: rope_parameters[{kind!r}].partial_rotary_factor must leave a positive even "
                                  f"number of rotary dimensions of head_dim {self.head_dim}, found "
                                  f"{rope['partial_rotary_factor']!r}")  # fmt: skip


class MiMoV2FlashAttention(Attention):
    """GQA with v_head_dim-wide values (scaled by attention_value_scale, zero-padded to the cache's width), partial
    RoPE from the layer type's table; sliding layers: twice the KV heads, a window and attention sinks."""

    def __init__(self, config: MiMoV2FlashConfig, layer_idx: int):
        swa = config.layer_types[layer_idx] == "sliding_attention"
        nkv = config.num_key_value_heads * (2 if swa else 1)
        self.v_dim, self.qk_dim = config.v_head_dim, config.head_dim  # read by make_projections
        super().__init__(config.hidden_size, config.num_attention_heads, nkv, config.head_dim, layer_idx,
                         bias=config.attention_bias, o_bias=False, window=config.layer_window(layer_idx),
                         rope=config.layer_rope(layer_idx), sinks=swa)  # fmt: skip
        self.head_dim = max(self.qk_dim, self.v_dim)  # the KV cache's width (the scaling stays qk's)
        scale = config.attention_value_scale
        self.v_scale = 1.0 if scale is None else float(scale)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd, vd = self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim
        self.q_proj = Linear(hidden, nh * hd, bias=bias)
        self.k_proj = Linear(hidden, nkv * hd, bias=bias)
        self.v_proj = Linear(hidden, nkv * vd, bias=bias)
        self.o_proj = Linear(nh * vd, hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, qd, vd, width = self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim, self.head_dim
        q, k, v = self.project(x)
        q = q.view(B, T, nh, qd).transpose(1, 2)
        k = k.view(B, T, nkv, qd).transpose(1, 2)
        v = (v * self.v_scale).view(B, T, nkv, vd).transpose(1, 2)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if width > qd:
            q, k = F.pad(q, (0, width - qd)), F.pad(k, (0, width - qd))
        if width > vd:
            v = F.pad(v, (0, width - vd))
        sinks = getattr(self, "sinks", None)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling, None, sinks)
        return self.o_proj(y[..., :vd].reshape(B, T, nh * vd))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.qk_dim}, v_head_dim={self.v_dim}"


class MiMoV2FlashDecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention, then a pre-norm dense MLP or mixture without shared experts (`mlp_layer_types`)."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return MiMoV2FlashAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.intermediate_size, act)
        router = GroupedRouter(h, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                               topk_group=config.topk_group, normalize=config.norm_topk_prob,
                               scaling=float(config.routed_scaling_factor))  # fmt: skip
        return SparseMoeBlock(router, Experts(config.n_routed_experts, h, config.moe_intermediate_size, act))


class MiMoV2FlashForCausalLM(CausalLM):
    """transformers' MiMoV2FlashForCausalLM."""

    config_class = MiMoV2FlashConfig
    checkpoint_rules = CheckpointRules(
        [
            Rename(
                r"\.self_attn\.attention_sink_bias$",
                ".self_attn.sinks",
                r"\.self_attn\.sinks$",
                ".self_attn.attention_sink_bias",
            ),
            *QWEN_MOE_RULES.rules,
            Ignored(r"model\.mtp\..+"),  # the Hub's next-token-prediction block, not run
        ]
    )
    # no tensor-parallel plan: the sliding layers' KV heads and sinks would need their own split
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["MiMoV2FlashDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: MiMoV2FlashConfig):
        super().__init__(config, MixtralModel(config, MiMoV2FlashDecoderLayer))
