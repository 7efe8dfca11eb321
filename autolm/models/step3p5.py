"""Step 3.5 (StepFun: Step-3.5-Flash, the language model of Step-3.7-Flash; transformers' models/step3p7, text
model_type "step3p5"): full and sliding-window layers as `layer_types` says, each type with its own RoPE
(rope_parameters by layer type: base and share of each head rotated; the dimensions past the rotary ones pass
through). Attention has GQA, `num_sliding_attention_heads` query heads on the sliding layers (`per_layer_config`),
per-head RMSNorms on queries and keys (before RoPE), scores scaled by `query_pre_attn_scalar` ** -0.5 and an output
gate: the heads' output times sigmoid(x @ `g_proj`), one gate per head. Every RMSNorm is Gemma's (times 1 + weight,
in fp32).

`mlp_layer_types` says which layers have a dense SiLU-gated MLP (`intermediate_size`; by default the first three)
and which a mixture of `n_routed_experts` gated MLPs (`moe_intermediate_size`): the router (`mlp.gate`) scores
every expert with sigmoid(logits) in fp32, the top `num_experts_per_tok` of the scores plus
`e_score_correction_bias` are chosen, their plain scores renormalised and times `moe_router_scaling_factor`; plus
`shared_experts`, a gated MLP of `share_expert_dim` every token passes. Per layer, `swiglu_limits` clamps the
experts' and `swiglu_limits_shared` the shared (or dense) MLP's SwiGLU: silu(gate) from above, up to +-limit
(None or 0: no clamp).

Checkpoints hold each layer's experts stacked under the remote-code names (`moe.gate_proj` / `moe.up_proj` (E, I,
h), `moe.down_proj`, `moe.gate`, `moe.router_bias`, `share_expert`), as transformers saves them too; the image-text
wrapper (model_type "step3p7") holds the language model beside a vision tower. The Hub's config.json spells the
per-layer settings its own way (rope_theta and partial_rotary_factors per layer, `moe_layers_enum`,
`attention_other_setting`, lists padded with the `num_nextn_predict_layers` MTP layers, which are not run): read as
transformers reads them. GGUF in and out as llama.cpp's "step35": step3p5_gguf.py.
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
    GatedMLP,
    GGUFLayout,
    Ignored,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
)
from .base import CausalLM
from .glm4_moe import GROUPED_MOE_RULES
from .image_text import IMAGE_TEXT_RULES, TextFirstConfig
from .laguna import (
    LagunaAttention,
    LagunaDecoderLayer,
    LagunaForCausalLM,
    LagunaRouter,
    LayerTypedRopeConfig,
)
from .mixtral import MixtralModel
from .step3p5_gguf import GGUF_KEYS, GGUF_LAYER, derive, write_config

_ALIASES = (
    ("num_attention_groups", "num_key_value_heads"),
    ("moe_num_experts", "n_routed_experts"),
    ("moe_top_k", "num_experts_per_tok"),
    ("share_expert_dims", "share_expert_dim"),
    ("num_mtp_layers", "num_nextn_predict_layers"),
)  # transformers' attribute_map: the Hub's names
_PADDED = ("layer_types", "mlp_layer_types", "swiglu_limits", "swiglu_limits_shared", "rope_theta",
           "partial_rotary_factors")  # fmt: skip


def hub_config(d: dict[str, Any]) -> dict[str, Any]:
    """The Hub's config.json spelling read as transformers' Step3p7TextConfig reads it: the lists padded with the MTP
    layers cut (their layer types kept as mtp_*), the MLP types from moe_layers_enum (else dense up to layer 3), the
    sliding layers' heads from attention_other_setting, rope_parameters by type from per-layer rope_theta /
    partial_rotary_factors (rope_scaling onto the full layers'); the activation always SiLU."""
    d = dict(d)
    for alias, name in _ALIASES:
        if alias in d and name not in d:
            d[name] = d.pop(alias)
    n, m = d.get("num_hidden_layers", 45), d.pop("num_nextn_predict_layers", 0) or 0
    if not _is_int(n) or not _is_int(m):
        return d
    for key in _PADDED:
        v = d.get(key)
        if m and isinstance(v, list) and len(v) == n + m:
            d[key] = v[:n]
            if key in ("layer_types", "mlp_layer_types"):
                d[f"mtp_{key}"] = v[n:]
    if d.get("layer_types") is None:
        d["layer_types"] = ["full_attention"] * n
        d["mtp_layer_types"] = ["full_attention"] * m if m else d.get("mtp_layer_types")
    enum = d.pop("moe_layers_enum", None)
    if d.get("mlp_layer_types") is None:
        items = enum.split(",") if isinstance(enum, str) else enum
        sparse = {int(i) for i in items if str(i).strip()} if items is not None else set(range(3, n))
        types = ["sparse" if i in sparse else "dense" for i in range(n + m)]
        d["mlp_layer_types"], d["mtp_mlp_layer_types"] = (
            types[:n],
            types[n:] if m else d.get("mtp_mlp_layer_types"),
        )
    other = d.pop("attention_other_setting", None)
    if d.get("num_sliding_attention_heads") is None:
        d["num_sliding_attention_heads"] = (other or {}).get(
            "num_attention_heads", d.get("num_attention_heads", 64)
        )
    _rope_by_type(d)
    for key in ("sparse_attention_config", "moe_layer_freq"):
        d.pop(key, None)
    d["hidden_act"], d["num_nextn_predict_layers"] = "silu", m
    return d


def _rope_by_type(d: dict[str, Any]) -> None:
    theta, factors = d.pop("rope_theta", 10000.0), d.pop("partial_rotary_factors", None)
    scaling, types = d.pop("rope_scaling", None), d["layer_types"]
    given = d.get("rope_parameters")
    if isinstance(given, dict) and given and all(isinstance(given.get(t), dict) for t in set(types)):
        d["rope_parameters"] = {t: given[t] for t in set(types)}
        return
    if not isinstance(types, list) or not types:
        return
    thetas = theta if isinstance(theta, list) else [theta] * len(types)
    rope = {}
    for kind in dict.fromkeys(types):
        i = types.index(kind)
        rope[kind] = {"rope_type": "default", "rope_theta": thetas[i]}
        if factors:
            rope[kind]["partial_rotary_factor"] = factors[i]
    if scaling and "full_attention" in rope:
        rope["full_attention"].update(scaling)
    d["rope_parameters"] = rope


def _limits_ok(v: Any, n: int) -> bool:
    return v is None or (isinstance(v, list) and len(v) == n and all(x is None or _is_number(x) for x in v))


@dataclass(repr=False)
class Step3p5Config(LayerTypedRopeConfig):
    """transformers' Step3p7TextConfig: its fields and defaults (no BOS / EOS ids, padding id 1)."""

    model_type: ClassVar[str] = "step3p5"
    # GGUF out compares the heads per layer (gguf_compared), not how the config spells them
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("gating", "per_layer_config", "num_sliding_attention_heads",
                                                    "mtp_layer_types", "mtp_mlp_layer_types",
                                                    "num_nextn_predict_layers", "initializer_range")  # fmt: skip
    attribute_map: ClassVar[dict[str, str]] = {"num_local_experts": "n_routed_experts"}
    # class attributes of transformers' config, not fields: written only where they differ
    absent_keys: ClassVar[tuple[str, ...]] = ("gating", "use_bidirectional_attention")
    bool_fields: ClassVar[tuple[str, ...]] = (*LayerTypedRopeConfig.bool_fields, "attention_bias", "mlp_bias",
                                              "output_router_logits", "use_bidirectional_attention")  # fmt: skip
    default_rope: ClassVar[dict[str, dict[str, Any]]] = {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}
    }

    vocab_size: int = 128815
    hidden_size: int = 4096
    intermediate_size: int = 11264
    num_hidden_layers: int = 45
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts_per_tok: int = 8
    output_router_logits: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    )
    gating: bool | str = True
    use_bidirectional_attention: bool = False
    moe_intermediate_size: int = 1280
    num_local_experts: int = 288
    share_expert_dim: int = 1280
    num_sliding_attention_heads: int | None = None
    attention_bias: bool = False
    query_pre_attn_scalar: int | float | None = None
    moe_router_scaling_factor: float = 1.0
    mlp_bias: bool = False
    swiglu_limits: list[float | int | None] | None = None
    swiglu_limits_shared: list[float | int | None] | None = None
    mtp_layer_types: list[str] | None = None
    mtp_mlp_layer_types: list[str] | None = None
    num_nextn_predict_layers: int = 0
    per_layer_config: dict[Any, dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Step3p5Config:
        if not isinstance(d, dict):
            return super().from_dict(d, source, **overrides)
        return super().from_dict(hub_config({**d, **overrides}), source)

    @staticmethod
    def default_mlp_types(n: int) -> list[str]:
        return ["dense" if i < 3 else "sparse" for i in range(n)]

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def __post_init__(self) -> None:
        if self.num_sliding_attention_heads is None:
            self.num_sliding_attention_heads = self.num_attention_heads
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        n, types = self.num_hidden_layers, self.layer_types
        if self.per_layer_config is None and _is_int(n) and n > 0:
            types = types or ["full_attention"] * n
            self.per_layer_config = {i: {"num_attention_heads": self.num_sliding_attention_heads}
                                     for i, t in enumerate(types) if t == "sliding_attention"}  # fmt: skip
        super().__post_init__()

    def layer_heads(self, i: int) -> int:
        """Layer i's query heads: per_layer_config's (as transformers resolves it), else num_attention_heads."""
        entry = self.per_layer_config.get(i, self.per_layer_config.get(str(i), {}))
        return entry.get("num_attention_heads", self.num_attention_heads)

    def gguf_compared(self) -> dict[str, Any]:
        return {"layer heads": [self.layer_heads(i) for i in range(self.num_hidden_layers)]}

    def swiglu_limit(self, i: int, shared: bool) -> float | None:
        """Layer i's SwiGLU clamp (the shared / dense MLP's with `shared`); None or 0: none."""
        limits = self.swiglu_limits_shared if shared else self.swiglu_limits
        return float(limits[i]) if limits and limits[i] else None

    def validate(self) -> None:
        super().validate()
        src, n, nkv = self.source, self.num_hidden_layers, self.num_key_value_heads
        plc = self.per_layer_config
        if not isinstance(plc, dict) or any(not isinstance(v, dict) or set(v) - {"num_attention_heads"}
                                            or not str(k).isdigit() or int(k) >= n for k, v in plc.items()):  # fmt: skip
            raise ConfigError(f"{src}: per_layer_config must map layer indices below {n} to "
                              f"{{'num_attention_heads': ...}}, found {str(plc)[:200]}")  # fmt: skip
        for i in range(n):
            h = self.layer_heads(i)
            if not _is_int(h) or h < 1 or h % nkv:
                raise ConfigError(f"{src}: num_sliding_attention_heads / per_layer_config: layer {i}'s heads must be "
                                  f"a positive multiple of num_key_value_heads ({nkv}), found {h!r}")  # fmt: skip
        if self.gating is not True and self.gating != "per-head":
            raise ConfigError(f"{src}: gating must be true or 'per-head' (transformers' Step 3.5 gates per head "
                              f"only), found {self.gating!r}")  # fmt: skip
        if self.use_bidirectional_attention:
            raise ConfigError(
                f"{src}: use_bidirectional_attention=true is not supported (autolm runs causal LMs)"
            )
        q = self.query_pre_attn_scalar
        if not _is_number(q) or not q > 0:
            raise ConfigError(f"{src}: query_pre_attn_scalar must be a positive number, found {q!r}")
        for name in ("swiglu_limits", "swiglu_limits_shared"):
            if not _limits_ok(getattr(self, name), n):
                raise ConfigError(
                    f"{src}: {name} must list {n} numbers or nulls, found {getattr(self, name)!r}"
                )
        for name in ("share_expert_dim", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not _is_int(v) or v < (name == "share_expert_dim"):
                raise ConfigError(f"{src}: {name} must be a non-negative integer, found {v!r}")
        if not _is_number(self.moe_router_scaling_factor):
            raise ConfigError(f"{src}: moe_router_scaling_factor must be a number, "
                              f"found {self.moe_router_scaling_factor!r}")  # fmt: skip


def _norm(config: Step3p5Config, dim: int) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, offset=1.0)


class Step3p5Attention(LagunaAttention):
    """Laguna's attention (per-layer heads, per-head q/k norms, RoPE by layer type) with Gemma's norms, scores scaled
    by query_pre_attn_scalar ** -0.5 and the gate sigmoid(x @ g_proj) per head, in the input's dtype."""

    def __init__(self, config: Step3p5Config, layer_idx: int):
        nh, hd = config.layer_heads(layer_idx), config.head_dim
        Attention.__init__(self, config.hidden_size, nh, config.num_key_value_heads, hd, layer_idx,
                           bias=config.attention_bias, scale=float(config.query_pre_attn_scalar) ** -0.5,
                           window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx),
                           qk_norm="head", norm=lambda dim: _norm(config, dim))  # fmt: skip
        self.gate_per_head = True
        self.g_proj = Linear(config.hidden_size, nh, bias=False)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        g = torch.sigmoid(self.g_proj(x))
        return (y.view(B, T, self.num_heads, self.head_dim) * g.unsqueeze(-1)).view(B, T, -1)


class ClampedGatedMLP(GatedMLP):
    """The gated MLP with Step 3.5's SwiGLU clamp (`limit`: silu(gate) at most limit, up within +-limit)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool, limit: float | None):
        super().__init__(hidden, intermediate, act, bias)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return super().forward(x)
        gate = self.act_fn(self.gate_proj(x)).clamp(max=self.limit)
        return self.down_proj(gate * self.up_proj(x).clamp(min=-self.limit, max=self.limit))


class Step3p5DecoderLayer(LagunaDecoderLayer):
    """Pre-norm gated attention, then a pre-norm dense MLP or mixture (mlp_layer_types); Gemma's norms."""

    @staticmethod
    def norm(config: Step3p5Config, dim: int) -> nn.Module:
        return _norm(config, dim)

    def make_attention(self, config: Step3p5Config, layer_idx: int) -> Attention:
        return Step3p5Attention(config, layer_idx)

    def make_mlp(self, config: Step3p5Config, layer_idx: int) -> nn.Module:
        h, act, bias = config.hidden_size, config.hidden_act, config.mlp_bias
        shared_limit = config.swiglu_limit(layer_idx, shared=True)
        if not config.sparse(layer_idx):
            return ClampedGatedMLP(h, config.intermediate_size, act, bias, shared_limit)
        router = LagunaRouter(h, config.num_local_experts, config.num_experts_per_tok,
                              float(config.moe_router_scaling_factor), 0.0)  # fmt: skip
        experts = Experts(config.num_local_experts, h, config.moe_intermediate_size, act,
                          limit=config.swiglu_limit(layer_idx, shared=False))  # fmt: skip
        shared = ClampedGatedMLP(h, config.share_expert_dim, act, bias, shared_limit)
        return SparseMoeBlock(router, experts, shared_experts=shared)


# the Hub's (and transformers' saved) names: the experts stacked under moe.*, the router's bias, the shared MLP
STEP3P5_RULES = CheckpointRules(
    [
        Rename(r"\.moe\.(gate|up|down)_proj\.weight$", r".mlp.experts.\1_proj.weight", r"(?!)", ""),
        Rename(r"\.moe\.gate\.weight$", ".mlp.gate.weight", r"(?!)", ""),
        Rename(r"\.moe\.router_bias$", ".mlp.gate.e_score_correction_bias", r"(?!)", ""),
        Rename(r"\.share_expert\.", ".mlp.shared_experts.", r"(?!)", ""),
        *GROUPED_MOE_RULES.rules,
        *IMAGE_TEXT_RULES,
        Ignored(r"vit_large_projector\..+"),
    ]
)


class Step3p5ForCausalLM(CausalLM):
    """Step 3.5's language model (transformers has it only inside Step3p7ForConditionalGeneration)."""

    config_class = Step3p5Config
    checkpoint_rules = STEP3P5_RULES
    # llama.cpp's Step35Model converter: tensors by gguf-py's map (NeoX RoPE: no permutation), norms + 1, g_proj as
    # attn_gate, the experts stacked, the router's bias as exp_probs_b.bias, the shared MLP as *_shexp
    gguf = GGUFLayout(
        "step35",
        config=GGUF_KEYS,
        layer=GGUF_LAYER,
        fixed=(("attention_bias", False), ("mlp_bias", False)),
        norm_shift=1.0,
        present=(("blk.{}.ffn_gate_inp.weight", "mlp_layer_types"),),
        derive=derive,
        write_config=write_config,
    )
    # transformers' plan (Step3p7TextConfig) gathers q/k/v/g and splits o_proj's input, every rank running every
    # head; here the heads are split instead (exact: the q/k norms and the gate are per head): q/k/v, the gate and
    # the dense and shared MLPs' gate/up column-parallel, o/down row-parallel, each expert's intermediate rows cut
    # (Experts.shard; the SwiGLU clamps are elementwise); the router whole
    tp_patterns: ClassVar[dict[str, str]] = LagunaForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Step3p5DecoderLayer"]
    shard_heads = LagunaForCausalLM.shard_heads  # every layer's heads (the sliding ones' own count)

    def __init__(self, config: Step3p5Config):
        super().__init__(config, MixtralModel(config, Step3p5DecoderLayer))


class Step3p7Config(TextFirstConfig):
    """transformers' Step3p7Config (Step3p7ForConditionalGeneration): its language model's, a Step 3.5."""

    model_type: ClassVar[str] = "step3p7"
    text_class: ClassVar[type] = Step3p5Config
