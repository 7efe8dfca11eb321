"""Muse Spark's language model (model_type muse_spark_text; muse_spark: the image-audio-text checkpoints, whose vision
tower, vision adapter and audio tower are skipped). transformers 5.23 has no text-only causal LM for it: its language
model runs inside MuseSparkForConditionalGeneration. Muse Glimmer's model (muse_glimmer.py: the normed embeddings,
gated attention with weightless q/k norms and scaled queries, NoPE layers by `layer_rope_theta`, the head's
`output_multiplier` and soft-cap) with:

- the heads' attention output normed per head by a weightless RMSNorm (`o_norm`) before the sigmoid gate;
- residual gates instead of sums: x = alpha * residual + beta * sublayer, beta = sigmoid(g / T), alpha =
  sqrt(max(sigmoid(-g / T) * (1 + beta), 1e-3)) for a learned `gate` per channel (fp32) and T =
  `residual_gate_temperature`;
- after attention a weightless norm (`post_norm_eps`); after the MLP an input-scaled norm: the input times
  (1 + w), rounded to the input's dtype, then normed; the centered norms compute (1 + w) in the weight's dtype;
- `mlp_layer_types` (all "sparse" by default): a SiLU-gated MLP (`hidden_act`, intermediate_size) or a mixture
  at its own width: `pre_expert_proj` (hidden -> `moe_hidden_size`) and a centered norm, `num_local_experts`
  stacked experts (`moe_intermediate_size`) each followed by an input-scaled norm (`experts.post_expert_norm`,
  shared), then `post_expert_proj` back. The router (`mlp.gate`) reads the layer's input: sigmoid of the fp32
  logits times `output_multiplier`, the top `num_experts_per_tok` by score + `e_score_correction_bias`, their
  scores renormalised (+ 1e-15) times `routed_scaling_factor`.

The head is never tied (transformers' image-text model has no tied weights). int8 / int4 quantization leaves the
experts in float (their per-expert norm is not the stacked experts' arithmetic); tensor parallelism splits the
attention, the dense MLPs and the experts' projections (pre / post_expert_proj by rows), as transformers' plan; the
experts run whole on every rank. llama.cpp has no Muse Spark architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Experts, GatedMLP, GroupedRouter, Linear, RMSNorm, SparseMoeBlock
from .base import DecoderModel
from .gemma4 import WeightlessRMSNorm
from .image_text import ImageTextConfig
from .mixtral import validate_experts
from .muse_glimmer import (
    MuseGlimmerForCausalLM,
    MuseGlimmerTextAttention,
    MuseGlimmerTextConfig,
    MuseGlimmerTextModel,
)

_THETA = 500_000.0  # transformers' default rope_theta for Muse Spark


@dataclass(repr=False)
class MuseSparkTextConfig(MuseGlimmerTextConfig):
    """transformers' MuseSparkTextConfig (its field names and defaults): Muse Glimmer's, with `hidden_act` (no
    hidden_activation), the mixture's settings and mlp_layer_types (all sparse where absent)."""

    model_type: ClassVar[str] = "muse_spark_text"
    attribute_map: ClassVar[dict[str, str]] = {}
    bool_fields: ClassVar[tuple[str, ...]] = (*MuseGlimmerTextConfig.bool_fields, "output_router_logits")

    hidden_size: int = 8192
    intermediate_size: int = 16384
    num_hidden_layers: int = 62
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 16
    head_dim: int | None = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 1_048_576
    qk_scale_factor: float = 5.4730064863875
    output_multiplier: float = 0.1767766952966369
    moe_intermediate_size: int = 4096
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 1.0
    moe_hidden_size: int = 4096
    mlp_layer_types: list[str] | None = None
    residual_gate_temperature: float = 0.3
    output_router_logits: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": _THETA}
    )

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], source: str = "config.json", **overrides: Any
    ) -> MuseSparkTextConfig:
        """As PretrainedConfig reads it (hidden_act is this family's activation)."""
        return PretrainedConfig.from_dict.__func__(cls, d, source, **overrides)

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": _THETA, **d}, source)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.mlp_layer_types is None and _is_int(n) and n > 0:
            self.mlp_layer_types = ["sparse"] * n
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        for name in ("moe_intermediate_size", "moe_hidden_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {v!r}")
        for name in ("routed_scaling_factor", "residual_gate_temperature"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise ConfigError(f"{src}: {name} must be a positive number, found {v!r}")
        kinds = self.mlp_layer_types
        if not (isinstance(kinds, list) and len(kinds) == self.num_hidden_layers
                and all(k in ("dense", "sparse") for k in kinds)):  # fmt: skip
            raise ConfigError(f"{src}: mlp_layer_types must list {self.num_hidden_layers} entries, each \"dense\" "
                              f"or \"sparse\", found {str(kinds)[:200]}")  # fmt: skip


class MuseSparkConfig(ImageTextConfig):
    """transformers' MuseSparkConfig (image-audio-text): its language model's text_config; the head never tied."""

    model_type: ClassVar[str] = "muse_spark"
    text_class: ClassVar[type] = MuseSparkTextConfig
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}


class CenteredRMSNorm(RMSNorm):
    """RMSNorm times (1 + w), (1 + w) computed in the weight's dtype, then the product in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps, offset=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (kernels.rms_norm(x, self.eps) * (self.weight + 1.0).float()).to(x.dtype)


class InputScaledRMSNorm(CenteredRMSNorm):
    """The input times (1 + w) in fp32, rounded to the input's dtype, then normed (no weight after)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x.float() * (self.weight + 1.0).float()).to(x.dtype)
        return kernels.rms_norm(scaled, self.eps).to(x.dtype)


class MuseSparkResidualGate(nn.Module):
    """alpha * residual + beta * x per channel, from the learned `gate` (kept in fp32) over the temperature."""

    def __init__(self, hidden: int, temperature: float, eps: float = 1e-3):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(hidden))
        self.temperature, self.eps = temperature, eps

    def forward(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = self.gate / self.temperature
        beta = torch.sigmoid(w)
        alpha = torch.sqrt(torch.clamp(torch.sigmoid(-w) * (1.0 + beta), min=self.eps))
        return (alpha * residual + beta * x).to(residual.dtype)


class MuseSparkRouter(GroupedRouter):
    """Sigmoid routing over the fp32 logits times `multiplier` (see the module docstring)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, multiplier: float, scaling: float):
        super().__init__(hidden, num_experts, top_k, scaling=scaling)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (F.linear(x.float(), self.weight.float()) * self.multiplier).sigmoid()  # (N, E)
        ids = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        return ids, top / (top.sum(dim=-1, keepdim=True) + 1e-15) * self.scaling


class MuseSparkExperts(Experts):
    """Stacked experts whose outputs are each normed (`post_expert_norm`, input-scaled) before the weighting."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str, eps: float):
        super().__init__(num_experts, hidden, intermediate, act)
        self.post_expert_norm = InputScaledRMSNorm(hidden, eps)

    def expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        return self.post_expert_norm(super().expert(x, e))

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        """Whole on every rank under tensor parallelism: each expert's norm needs its whole output."""
        return {}


class MuseSparkMoE(SparseMoeBlock):
    """The router on the layer's input; the experts between pre_expert_proj (+ its norm) and post_expert_proj."""

    def __init__(self, config: MuseSparkTextConfig):
        h, w = config.hidden_size, config.moe_hidden_size
        router = MuseSparkRouter(h, config.num_local_experts, config.num_experts_per_tok,
                                 float(config.output_multiplier), float(config.routed_scaling_factor))  # fmt: skip
        experts = MuseSparkExperts(config.num_local_experts, w, config.moe_intermediate_size, config.hidden_act,
                                   config.post_norm_eps)  # fmt: skip
        super().__init__(router, experts)
        self.pre_expert_proj = Linear(h, w, bias=False)
        self.pre_expert_norm = CenteredRMSNorm(w, config.rms_norm_eps)
        self.post_expert_proj = Linear(w, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.gate(flat)
        y = self.experts(self.pre_expert_norm(self.pre_expert_proj(flat)), ids, weights)
        return self.post_expert_proj(y).view(B, T, h)


class MuseSparkTextAttention(MuseGlimmerTextAttention):
    """Muse Glimmer's attention with each head's output normed (weightless) before the gate."""

    def __init__(self, config: MuseSparkTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.o_norm = WeightlessRMSNorm(config.rms_norm_eps)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        y = self.o_norm(y.view(B, T, -1, self.head_dim)).view(B, T, -1)
        return super().gate(x, y)


class MuseSparkTextDecoderLayer(nn.Module):
    """Attention and the feed-forward block, each between a norm of its input and one of its output, joined to the
    residual stream by a residual gate."""

    def __init__(self, config: MuseSparkTextConfig, layer_idx: int):
        super().__init__()
        h, eps, post, t = (
            config.hidden_size,
            config.rms_norm_eps,
            config.post_norm_eps,
            config.residual_gate_temperature,
        )
        self.self_attn = MuseSparkTextAttention(config, layer_idx)
        if config.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = MuseSparkMoE(config)
        else:
            self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = CenteredRMSNorm(h, eps)
        self.post_attention_layernorm = WeightlessRMSNorm(post)
        self.pre_feedforward_layernorm = CenteredRMSNorm(h, eps)
        self.post_feedforward_layernorm = InputScaledRMSNorm(h, post)
        self.post_attention_residual_gate = MuseSparkResidualGate(h, t)
        self.post_feedforward_residual_gate = MuseSparkResidualGate(h, t)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        x = self.post_attention_residual_gate(x, y)
        y = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.post_feedforward_residual_gate(x, y)


class MuseSparkForCausalLM(MuseGlimmerForCausalLM):
    """The language model of transformers' MuseSparkForConditionalGeneration."""

    config_class = MuseSparkTextConfig
    gguf = None  # llama.cpp has no Muse Spark (Muse Glimmer's "muse-glimmer" layout not inherited)
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = [  # as transformers
        "post_attention_residual_gate",
        "post_feedforward_residual_gate",
        "mlp.gate.weight",
        "e_score_correction_bias",
    ]
    _no_split_modules: ClassVar[list[str]] = ["MuseSparkTextDecoderLayer"]
    # transformers' plan (Muse Glimmer's, and the experts' projections cut by rows, their outputs summed whole): the
    # experts themselves run whole on every rank (MuseSparkExperts.shard), as each one's output norm needs all of it
    tp_patterns: ClassVar[dict[str, str]] = {
        **MuseGlimmerForCausalLM.tp_patterns,
        "layers.*.mlp.pre_expert_proj": "rowwise_split",
        "layers.*.mlp.post_expert_proj": "rowwise_split",
    }

    def __init__(self, config: MuseSparkTextConfig, model: DecoderModel | None = None):
        super().__init__(config, model or MuseGlimmerTextModel(config, MuseSparkTextDecoderLayer))
