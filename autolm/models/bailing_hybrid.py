"""Ling 3.0 (transformers' bailing_hybrid: inclusionAI/Ling-3.0-Flash): Kimi Linear's hybrid (models.kimi_linear)
of KDA layers and DeepSeek-V3's Multi-head Latent Attention, by `layer_types` (by default the last layer of every
`layer_group_size` is "full_attention", the others "linear_attention"), each followed by a dense gated MLP or
DeepSeek-V3's mixture, by `mlp_layer_types` ("dense" below `first_k_dense_replace` by default, else "sparse").

- MLA (full-attention layers): DeepSeek-V3's with a plain q_proj (no low-rank query), RoPE over interleaved pairs
  of the rope parts (rope_theta 6e6), and a sigmoid gate per head, sigmoid(g_proj(x)), on each head's output
  before o_proj.
- KDA (linear-attention layers): Kimi Linear's layer (separate q/k/v projections, the short SiLU conv, the delta
  rule with L2-normed q/k and a decay per key channel, each head's output RMS-normed and gated) with one
  projection where Kimi has two: the forget gate's input f_proj(x) + dt_bias, and the output gate g_proj(x). The
  log decay is kda_lower_bound * sigmoid(exp(A_log[h]) * g) where `kda_safe_gate`, else -exp(A_log[h]) *
  softplus(g) (GLM-5.3-Flash's forget gate, models.glm5_next_layers). Its heads are the attention heads, of
  config.json's `head_dim` (transformers' `linear_head_dim`; `head_dim` itself is then qk_rope_head_dim, as
  DeepSeek-V3's config sets it, and written so).
- The mixture: grouped sigmoid routing with the e_score_correction_bias, the top k renormalised and scaled by
  routed_scaling_factor, plus shared experts (moe_intermediate_size * n_shared_experts wide).

The released files' names (model.word_embeddings, `attention` for self_attn with its `dense` output, q/k/v_conv1d,
the forget gate's tensors on the layer, per-expert tensors, the router's `expert_bias`) load as transformers'
conversion mapping reads them, and are saved, as transformers saves them. The multi-token prediction layers after the last decoder
layer are not run (skipped on load). The one-token step and its compiled graphs carry the KDA layers' states. GGUF in
and out as llama.cpp's "bailingmoe3" (models.bailing_hybrid_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import CheckpointRules, GatedMLP, GGUFLayout, Linear, Rename
from ..nn.linear import packed
from . import bailing_hybrid_gguf as gguf_layout
from .base import CausalLM
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3Config, GGUFMla
from .glm4_moe import GROUPED_MOE_RULES, GROUPED_MOE_TP, grouped_moe_mlp, skip_nextn
from .glm5_next_layers import Glm5NextForgetGate
from .kimi_linear import KimiConvPieces, KimiDeltaAttention, KimiLinearConfig, KimiLinearDecoderLayer
from .mixtral import MixtralModel

# config.json's linear-attention sizes where it does not give them: transformers' own derivation
_LINEAR_FROM = (
    ("linear_num_heads", "num_attention_heads"),
    ("linear_conv_kernel_dim", "short_conv_kernel_size"),
)


@dataclass(repr=False)
class BailingHybridConfig(KimiLinearConfig):
    """transformers' BailingHybridConfig: DeepSeek-V3's fields in its attribute_map's names (num_experts,
    num_expert_group, moe_renormalize, ...) with Ling 3.0's defaults, no low-rank query, the layer schedule from
    layer_group_size, and the KDA layers' settings (their sizes written as linear_head_dim, linear_num_heads and
    linear_conv_kernel_dim, as transformers writes them)."""

    model_type: ClassVar[str] = "bailing_hybrid"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "rope_interleave", "q_lora_rank")
    bool_fields: ClassVar[tuple[str, ...]] = (*KimiLinearConfig.bool_fields, "kda_safe_gate")
    # GGUF out compares the layer kinds and the groups taken (all taken: none) instead (models.bailing_hybrid_gguf)
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("layer_group_size", "n_group", "topk_group")

    vocab_size: int = 157184
    hidden_size: int = 2560
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 42
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_routed_experts: int = 512
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 2
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156895
    head_dim: int | None = 128
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 6_000_000.0}
    )
    short_conv_kernel_size: int = 4
    layer_group_size: int = 6
    kda_safe_gate: bool = True
    kda_lower_bound: float = -5.0
    linear_head_dim: int | None = None  # None: config.json's head_dim
    linear_num_heads: int | None = None  # None: num_attention_heads
    linear_conv_kernel_dim: int | None = None  # None: short_conv_kernel_size

    def __post_init__(self) -> None:
        n, every = self.num_hidden_layers, self.layer_group_size
        if self.linear_head_dim is None:
            self.linear_head_dim = self.head_dim
        for ours, source in _LINEAR_FROM:
            if getattr(self, ours) is None:
                setattr(self, ours, getattr(self, source))
        if self.layer_types is None and _is_int(n) and n > 0 and _is_int(every) and every > 0:
            self.layer_types = [
                "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
            ]
        super().__post_init__()

    def validate(self) -> None:
        src = self.source
        if self.q_lora_rank is not None:
            raise ConfigError(f"{src}: q_lora_rank must be null (Ling 3.0's attention projects q directly), found "
                              f"{self.q_lora_rank!r}")  # fmt: skip
        if self.rope_interleave is not True:
            raise ConfigError(f"{src}: rope_interleave must be true (Ling 3.0 turns interleaved pairs), found "
                              f"{self.rope_interleave!r}")  # fmt: skip
        if not _is_number(self.kda_lower_bound):
            raise ConfigError(f"{src}: kda_lower_bound must be a number, found {self.kda_lower_bound!r}")
        every = self.layer_group_size
        if not _is_int(every) or every <= 0:
            raise ConfigError(f"{src}: layer_group_size must be a positive integer, found {every!r}")
        super().validate()

    def gguf_compared(self) -> dict[str, Any]:
        grouped = self.topk_group < self.n_group
        return {
            "layer kinds": list(self.layer_types),
            "expert groups": (self.n_group, self.topk_group) if grouped else 1,
        }

    def to_dict(self) -> dict[str, Any]:
        out = DeepseekV3Config.to_dict(self)  # RoPE settings kept (Kimi Linear has none)
        if "rope_parameters" in out:  # transformers writes rope_theta beside them
            out["rope_theta"] = self.rope_parameters.get("rope_theta")
        return out


class BailingHybridForgetGate(Glm5NextForgetGate):
    """GLM-5.3-Flash's forget gate (its decay formula) fed by one projection: g = f_proj(x) + dt_bias (the layer's
    project() gives f_proj(x); f_b_proj, which GLM's has after its low-rank f_a_proj, is the identity here)."""

    def __init__(self, config: BailingHybridConfig):
        nn.Module.__init__(self)
        h, d, heads = config.hidden_size, config.linear_head_dim, config.linear_num_heads
        self.head_dim = d
        self.lower_bound = float(config.kda_lower_bound) if config.kda_safe_gate else None
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads * d))
        self.f_proj = Linear(h, heads * d, bias=False)
        self.f_b_proj = nn.Identity()


class BailingHybridDeltaAttention(KimiDeltaAttention):
    """Kimi Linear's KDA layer with one-projection forget and output gates (f_proj in `forget_gate`, g_proj)."""

    def __init__(self, config: BailingHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.g_a_proj, self.g_b_proj
        self.forget_gate = BailingHybridForgetGate(config)
        self.g_proj = Linear(config.hidden_size, self.value_dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x -> the conv's input [q; k; v], the output gate (B, T, H, d), b (B, T, H), f_proj(x)."""
        B, T, _ = x.shape
        q, k, v, b, g, f = packed(
            x, (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.g_proj, self.forget_gate.f_proj)
        )
        return torch.cat([q, k, v], dim=-1), g.reshape(B, T, -1, self.head_v_dim), b, f


class BailingHybridAttention(DeepseekV3Attention):
    """DeepSeek-V3's latent attention (plain q_proj, interleaved RoPE) with each head's output times
    sigmoid(g_proj(x)) before o_proj."""

    def __init__(self, config: BailingHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.g_proj = Linear(config.hidden_size, self.num_heads, bias=False)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        g = torch.sigmoid(self.g_proj(x).float()).to(y.dtype)
        return (y.view(B, T, self.num_heads, -1) * g.unsqueeze(-1)).view(B, T, -1)


class BailingHybridDecoderLayer(KimiLinearDecoderLayer):
    """Pre-norm MLA or KDA (`self_attn`, by layer type), then a pre-norm dense MLP or mixture (mlp_layer_types)."""

    def make_attention(self, config: Any, layer_idx: int) -> nn.Module:
        if config.layer_types[layer_idx] == "linear_attention":
            return BailingHybridDeltaAttention(config, layer_idx)
        return BailingHybridAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return grouped_moe_mlp(config, config.first_k_dense_replace)  # past the dense ones: the mixture


# transformers' conversion mapping for bailing_hybrid: the released names, which transformers also saves
_ATTN = r"\.(?:attention|self_attn)\."
RENAMES = [
    Rename(
        _ATTN + r"(f_proj|dt_bias|A_log)\b",
        r".self_attn.forget_gate.\1",
        r"\.self_attn\.forget_gate\.",
        ".self_attn.",
    ),
    Rename(_ATTN + r"dense\.", ".self_attn.o_proj.", r"\.self_attn\.o_proj\.", ".self_attn.dense."),
    Rename(r"\.attention\.", ".self_attn.", r"\.self_attn\.", ".attention."),
    Rename(
        r"^model\.word_embeddings\.",
        "model.embed_tokens.",
        r"^model\.embed_tokens\.",
        "model.word_embeddings.",
    ),
    Rename(
        r"\.mlp\.gate\.expert_bias$",
        ".mlp.gate.e_score_correction_bias",
        r"\.mlp\.gate\.e_score_correction_bias$",
        ".mlp.gate.expert_bias",
    ),
]


class BailingHybridRules(CheckpointRules):
    """The renames, the q/k/v_conv1d pieces and per-expert tensors; saving splits each KDA conv into its equal q,
    k and v pieces, as transformers saves them."""

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().to_checkpoint(state_dict)
        for name in [n for n in out if n.endswith(".attention.conv1d.weight")]:
            prefix, t = name.removesuffix("conv1d.weight"), out.pop(name)
            out.update(
                {f"{prefix}{p}_conv1d.weight": piece for p, piece in zip("qkv", t.chunk(3), strict=True)}
            )
        return out


class BailingHybridForCausalLM(CausalLM):
    """transformers' BailingHybridForCausalLM."""

    config_class = BailingHybridConfig
    recurrent: ClassVar[bool] = True
    # llama.cpp's files: also the KDA tensors' transforms, kv_b_proj split, the KDA output gate's own name
    checkpoint_rules = BailingHybridRules(
        [*RENAMES, KimiConvPieces(), *GROUPED_MOE_RULES.rules, GGUFMla(), gguf_layout.BailingHybridGGUF(),
         gguf_layout.G_A_BACK]
    )  # fmt: skip
    gguf = GGUFLayout(
        "bailingmoe3",
        config=gguf_layout.GGUF_CONFIG,
        layer=gguf_layout.GGUF_LAYER,
        fixed=(("attention_bias", False),),
        derive=gguf_layout.derive,
        write_config=gguf_layout.write_config,
        bare=("ssm_a",),
    )
    # transformers' plan: the dense MLPs, shared experts and experts split; both kinds of attention (MLA and KDA, both
    # `self_attn`) and the router stay whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {k: v for k, v in GROUPED_MOE_TP.items() if ".mlp." in k}
    _no_split_modules: ClassVar[list[str]] = ["BailingHybridDecoderLayer"]
    # as transformers keeps them
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = [
        "e_score_correction_bias",
        "conv1d",
        "dt_bias",
        "A_log",
    ]

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head of both kinds of attention (kept whole): nothing to shard."""

    def __init__(self, config: BailingHybridConfig):
        super().__init__(config, MixtralModel(config, BailingHybridDecoderLayer))
        # the checkpoint's multi-token prediction layers (num_nextn_predict_layers after the last) skipped; GGUF
        # out's rules with this model's heads and KDA layers
        linear = tuple(i for i, t in enumerate(config.layer_types) if t == "linear_attention")
        own = {GGUFMla: GGUFMla(config.num_attention_heads, config.qk_nope_head_dim),
               gguf_layout.BailingHybridGGUF: gguf_layout.BailingHybridGGUF(linear)}  # fmt: skip
        rules = [own.get(type(r), r) for r in skip_nextn(type(self).checkpoint_rules, config).rules]
        self.checkpoint_rules = BailingHybridRules(rules)
