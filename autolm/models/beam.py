"""Beam (Reflection AI: Beam-1.0): sliding-window and full layers as `layer_types` says (by default every sixth
layer full, and the last); `rope_parameters` is keyed by layer type, and a type whose entry is null runs without
position encoding (NoPE: by default the full layers), its queries scaled by position p: (1 + (p + 1) / 2048) ** 0.1
in fp32 (scalable softmax). Attention has GQA, per-head RMSNorms on queries and keys (before RoPE) and an output
gate: the heads' output times sigmoid(x @ `gate_proj` + `gate_bias`), one bias per head, before `o_proj`.

Each layer normalises its sublayers on both sides (`input_layernorm` / `post_attention_layernorm`,
`pre_feedforward_layernorm` / `post_feedforward_layernorm`; every norm times its weight in fp32) and adds them to
the residual stream depth-scaled: the n-th addition (n = 2 (layer + 1) for attention, one more for the MLP) is
sublayer / sqrt(n) + residual * sqrt((n - 1) / n).

`mlp_layer_types` says which layers have a dense SiLU-gated MLP (by default the first three) and which a mixture of
`num_experts` gated MLPs (`moe_intermediate_size`, no shared expert) under DeepSeek V3's grouped sigmoid routing
(`n_group`, `topk_group`, `e_score_correction_bias`), the output times `routed_scaling_factor`; gated activations
in fp32 (then cast back). The logits are soft-capped by tanh at `final_logit_softcapping`, in fp32. Checkpoints
keep one tensor per expert. llama.cpp has no Beam architecture: no GGUF layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Experts,
    GatedMLP,
    GroupedRouter,
    RMSNorm,
    Rotary,
    SelfSharded,
    SparseMoeBlock,
    apply_rotary,
    packed,
)
from .afmoe import AfmoeAttention
from .base import LLAMA_TP, CausalLM, DecoderModel
from .gemma2 import softcap
from .laguna import LayerTypedRopeConfig
from .qwen2_moe import QWEN_MOE_RULES

_KINDS = ("full_attention", "sliding_attention")
NOPE_SCALE = "beam_nope_scale"  # the NoPE layers' per-position query scale, carried with the RoPE tables


class NopeRopeConfig:
    """A config mixin: rope_parameters by layer type (each read as one RoPE setting, as Laguna's), where a null
    entry marks a layer type that runs without RoPE (Beam, Cohere Compass)."""

    default_rope: ClassVar[dict[str, Any]] = {}

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        given = d.get("rope_parameters")
        given = cls.default_rope if given is None else given
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object by layer type, found {given!r}")
        rotary = {k: v for k, v in given.items() if v is not None}
        kinds = LayerTypedRopeConfig.read_rope({**d, "rope_parameters": rotary}, source)[0] if rotary else {}
        return {**{k: None for k in given if given[k] is None}, **kinds}, "v5"

    @property
    def rope_theta(self) -> float:
        return float(next(iter(self.rope_kinds().values()), {"rope_theta": 10000.0})["rope_theta"])

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _KINDS
                if kind in self.layer_types and self.rope_parameters.get(kind) is not None}  # fmt: skip

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads: its layer type's, None for a NoPE type."""
        kind = self.layer_types[i]
        return kind if self.rope_parameters.get(kind) is not None else None

    def check_rope_entries(self) -> None:
        """ConfigError unless rope_parameters has an entry (an object, or null) for every layer type."""
        missing = set(self.layer_types) - set(self.rope_parameters)
        if missing:
            raise ConfigError(f"{self.source}: rope_parameters has no entry (an object, or null for no RoPE) for "
                              f"the layer types {sorted(missing)}")  # fmt: skip


@dataclass(repr=False)
class BeamConfig(NopeRopeConfig, LayerTypedRopeConfig):
    """transformers' BeamConfig: its fields and defaults (no BOS / EOS ids; the first three layers dense)."""

    model_type: ClassVar[str] = "beam"
    partial_rotary_default: ClassVar[bool] = False  # Beam's default RoPE rotates whole heads
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "norm_topk_prob",
        "output_router_logits",
    )
    default_rope: ClassVar[dict[str, Any]] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": None,
    }

    vocab_size: int = 151936
    hidden_size: int = 5120
    intermediate_size: int = 20480
    num_hidden_layers: int = 52
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = 512
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {k: v and dict(v) for k, v in BeamConfig.default_rope.items()}
    )
    attention_bias: bool = False
    moe_intermediate_size: int = 2560
    num_experts_per_tok: int = 8
    num_experts: int = 256
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    n_group: int | None = 8
    topk_group: int | None = 4
    routed_scaling_factor: float = 2.5
    final_logit_softcapping: float | None = 30.0

    @staticmethod
    def default_mlp_types(n: int) -> list[str]:
        return ["dense"] * min(3, n) + ["sparse"] * (n - min(3, n))

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
            self.layer_types[-1] = "full_attention"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        src = self.source
        self.check_rope_entries()
        for name in ("n_group", "topk_group"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {getattr(self, name)!r}")
        if self.num_experts % self.n_group or self.num_experts // self.n_group < 2:
            raise ConfigError(f"{src}: n_group ({self.n_group}) must divide num_experts ({self.num_experts}) "
                              "into groups of at least 2")  # fmt: skip
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"{src}: topk_group ({self.topk_group}) must be at most n_group ({self.n_group})"
            )
        if not _is_number(self.routed_scaling_factor):
            raise ConfigError(
                f"{src}: routed_scaling_factor must be a number, found {self.routed_scaling_factor!r}"
            )
        cap = self.final_logit_softcapping
        if cap is not None and not (_is_number(cap) and cap > 0):
            raise ConfigError(
                f"{src}: final_logit_softcapping must be a positive number or null, found {cap!r}"
            )


class BeamRotary(Rotary):
    """The RoPE tables, plus NOPE_SCALE where a layer has no RoPE: each position's query scale (B, 1, T, 1) in fp32."""

    def __init__(self, config: BeamConfig):
        super().__init__(config.rope_kinds(), config.head_dim, config.max_position_embeddings)
        self.rotary = Rotary(dict(self.kinds), config.head_dim, config.max_position_embeddings)
        if any(config.layer_rope(i) is None for i in range(config.num_hidden_layers)):
            self.kinds = {**self.kinds, NOPE_SCALE: {}}

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        out = self.rotary.tables(position_ids, dtype)
        if NOPE_SCALE in self.kinds:
            scale = torch.exp(0.1 * torch.log1p((position_ids.float() + 1) / 2048))[:, None, :, None]
            out[NOPE_SCALE] = (scale, scale)
        return out


class BeamAttention(SelfSharded, AfmoeAttention):
    """AFMoE's attention (per-head q/k norms, RoPE by layer type, the output gated by sigmoid(x @ gate_proj)) with a
    gate bias per head (cut by head under tensor parallelism), and the NoPE layers' queries scaled by position."""

    tp_dims: ClassVar[dict[str, int]] = {"gate_bias": 0}  # a row per head

    def __init__(self, config: BeamConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate_bias = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        q, k = (
            self.q_norm(q.view(B, T, nh, hd)).transpose(1, 2),
            self.k_norm(k.view(B, T, nkv, hd)).transpose(1, 2),
        )
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if self.rope is not None:
            cos, sin = ctx.rope[self.rope]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            q = (q.float() * ctx.rope[NOPE_SCALE][0]).to(q.dtype)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.o_proj(self.gate(x, y.reshape(B, T, nh * hd)))

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        g = self.gate_proj(x).view(B, T, self.num_heads, self.head_dim) + self.gate_bias[:, None]
        return (y.view(B, T, self.num_heads, self.head_dim) * torch.sigmoid(g)).view(B, T, -1)


def fp32_glu(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up in fp32, cast back to the gate's dtype (Beam's SwiGLU)."""
    return (act(gate.float()) * up.float()).to(gate.dtype)


class BeamMLP(GatedMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed(x, (self.gate_proj, self.up_proj))
        return self.down_proj(fp32_glu(self.act_fn, gate, up))


class BeamExperts(Experts):
    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return fp32_glu(self.act_fn, gate, up)


class BeamDecoderLayer(nn.Module):
    """Attention and the feed-forward block, each between a norm of its input and of its output, added to the
    residual stream depth-scaled."""

    def __init__(self, config: BeamConfig, layer_idx: int):
        super().__init__()
        h, eps, act = config.hidden_size, config.rms_norm_eps, config.hidden_act
        self.self_attn = BeamAttention(config, layer_idx)
        if config.sparse(layer_idx):
            router = GroupedRouter(h, config.num_experts, config.num_experts_per_tok, n_group=config.n_group,
                                   topk_group=config.topk_group, normalize=config.norm_topk_prob,
                                   scaling=float(config.routed_scaling_factor))  # fmt: skip
            self.mlp = SparseMoeBlock(
                router, BeamExperts(config.num_experts, h, config.moe_intermediate_size, act)
            )
        else:
            self.mlp = BeamMLP(h, config.intermediate_size, act)
        for name in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            setattr(self, f"{name}_layernorm", RMSNorm(h, eps, weight_in_fp32=True))
        self.attn_add = 2 * (layer_idx + 1)

    @staticmethod
    def add(y: torch.Tensor, residual: torch.Tensor, n: int) -> torch.Tensor:
        """The n-th residual addition: y / sqrt(n) + residual * sqrt((n - 1) / n)."""
        return y * (1.0 / math.sqrt(n)) + residual * math.sqrt((n - 1) / n)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        x = self.add(y, x, self.attn_add)
        y = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.add(y, x, self.attn_add + 1)


class BeamModel(DecoderModel):
    def __init__(self, config: BeamConfig):
        super().__init__(
            config, BeamDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps, weight_in_fp32=True)
        )
        self.rotary = BeamRotary(config)


class BeamForCausalLM(CausalLM):
    """transformers' BeamForCausalLM."""

    config_class = BeamConfig
    checkpoint_rules = QWEN_MOE_RULES
    # transformers' plan: q/k/v, the output gate (and its per-head bias: SelfSharded) and the dense MLP's gate/up
    # column-parallel, o/down row-parallel, each expert's intermediate rows cut (Experts.shard); the router whole
    tp_patterns: ClassVar[dict[str, str]] = {**LLAMA_TP, "layers.*.self_attn.gate_proj": "colwise"}
    _no_split_modules: ClassVar[list[str]] = ["BeamDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias", "mlp.gate.weight"]

    def __init__(self, config: BeamConfig):
        super().__init__(config, BeamModel(config))
        self.final_logit_softcapping = (
            config.final_logit_softcapping
        )  # a setting of the compiled head's graph

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """tanh soft-capping in fp32 (the logits stay fp32, as transformers returns them)."""
        return (
            logits
            if self.final_logit_softcapping is None
            else softcap(logits.float(), self.final_logit_softcapping)
        )
