"""ZAYA (Zyphra's ZAYA1): a mixture-of-experts decoder whose attention projects queries and keys through a
convolution (CCA, "compressed convolutional attention") and whose router carries a state from layer to layer.

- Attention (`self_attn.qkv_proj`): q_proj / k_proj give q (nh heads) and k (n_kv heads); a residual path mixes them,
  q_res = (q + k repeated over its group) / 2 and k_res = q_res averaged over each group; [q; k] goes through a causal
  depthwise convolution of `cca_time0` taps (`conv_qk_depthwise`) then a grouped one of `cca_time1` taps
  (`conv_qk_grouped`, one group per head), plus the residuals. The values are v_proj_current's output beside
  v_proj_delayed's of the previous token (the first token's previous one: v_proj_delayed of zeros), concatenated
  and split into heads. Queries and keys are L2-normalised to sqrt(head_dim), the keys then times a learned `temp`
  per KV head (`self_attn.qk_norm`); RoPE by layer type (`hybrid`, `hybrid_sliding`: a sliding window), each
  rotating `partial_rotary_factor` of a head; scale head_dim^-1/2; `o_proj`. The cache keeps, per layer, the last
  (cca_time0 - 1) + (cca_time1 - 1) convolution inputs and the last token's delayed values: a recurrent state
  (the layer's inputs at padding positions zeroed first, as transformers does).
- The residual stream is fp32: the embeddings plus `input_hidden_states_bias`, times `input_hidden_states_scale`,
  then fp32; each block's output joins it as (out + bias) * scale + (residual + bias) * scale
  (`post_attention_residual_scale`, `post_mlp_residual_scale`); the norms read it in the model's dtype.
- Mixture (`mlp`): one expert per token among `num_experts` (qwen3_moe's stacked experts) or a "skip" class that
  computes nothing. The router (`mlp.gate`): down_proj (h -> router_hidden_size) plus, after the first layer, the
  previous layer's router state times `router_states_scale`; that sum is the state the next layer reads; then
  `router_mlp` (RMSNorm, fc1, GELU, fc2, GELU, out_proj to num_experts + 1 classes), softmax; the class chosen by
  probability + `balancing_biases` (a buffer; by default -1 on the skip class), weighted by its probability.
- The head is tied by default, with a bias where `lm_head_bias`. llama.cpp has no ZAYA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, Experts, Linear, RMSNorm, SparseMoeBlock
from ..nn.rope import apply_rotary
from .base import CausalLM, DecoderModel
from .laguna import rope_by_kind

_KINDS = ("hybrid", "hybrid_sliding")
_DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


@dataclass(repr=False)
class ZayaConfig(PretrainedConfig):
    """transformers' ZayaConfig: its fields and defaults; rope_parameters by layer type."""

    model_type: ClassVar[str] = "zaya"
    partial_rotary_default: ClassVar[bool] = True
    layer_kinds: ClassVar[tuple[str, ...]] = _KINDS
    absent_keys: ClassVar[tuple[str, ...]] = ("intermediate_size",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "lm_head_bias",
        "output_router_logits",
    )

    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {k: dict(v) for k, v in _DEFAULT_ROPE.items()}
    )
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 1
    num_experts: int = 16
    output_router_logits: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    attention_bias: bool = False
    lm_head_bias: bool = False
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, each read as one RoPE setting (a stray top-level `rope_type`, which
        configs on the Hub carry, dropped as transformers drops it); transformers' defaults where none is given."""
        given = d.get("rope_parameters")
        given = {k: dict(v) for k, v in _DEFAULT_ROPE.items()} if given is None else given
        if isinstance(given, dict):
            given = {k: v for k, v in given.items() if k != "rope_type"}
        parent = super().read_rope
        one = lambda inner: parent(inner, source)  # noqa: E731
        return rope_by_kind(given, d, source, _KINDS, one), "v5"

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        super().__post_init__()

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["hybrid"]["rope_theta"])

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _KINDS if kind in (self.layer_types or ())}

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_types[i] == "hybrid_sliding" else None

    def validate(self) -> None:
        src = self.source
        if isinstance(self.layer_types, list) and not set(self.layer_types) - set(_KINDS):
            missing = set(self.layer_types) - set(self.rope_parameters)
            if missing:
                raise ConfigError(
                    f"{src}: rope_parameters has no entry for layer type {sorted(missing)[0]!r}"
                )
        super().validate()
        positive_ints(self, ("moe_intermediate_size", "router_hidden_size", "cca_time0", "cca_time1", "num_experts"), 1
                             << 20)  # fmt: skip
        if self.num_experts_per_tok != 1:
            raise ConfigError(
                f"{src}: num_experts_per_tok must be 1 (ZAYA routes each token to one expert), "
                f"found {self.num_experts_per_tok!r}"
            )
        if (self.num_key_value_heads * self.head_dim) % 2:
            raise ConfigError(
                f"{src}: num_key_value_heads * head_dim ({self.num_key_value_heads} * {self.head_dim}) must be even "
                "(half the values come from the previous token)"
            )
        if "hybrid_sliding" in self.layer_types and self.sliding_window is None:
            raise ConfigError(f"{src}: sliding_window must be set when layer_types contains 'hybrid_sliding'")
        for kind in self.rope_kinds():
            factor = self.rope_parameters[kind].get("partial_rotary_factor", 1.0)
            if not _is_number(factor) or not 0 < factor <= 1 or int(self.head_dim * factor) % 2:
                raise ConfigError(
                    f"{src}: rope_parameters[{kind!r}].partial_rotary_factor must be a number in (0, 1] that "
                    f"leaves an even number of rotary dimensions of the {self.head_dim} in a head, found {factor!r}"
                )


class ZayaCCAProjection(nn.Module):
    """q, k (B, T, heads, hd) through the convolutions with their residual paths, and v (B, T, n_kv, hd) half from
    the previous token. State: (the last K = (t0 - 1) + (t1 - 1) convolution inputs (B, C, K), the last token's
    delayed values (B, n_kv * hd / 2))."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        h, nh, nkv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias, t0, t1 = config.attention_bias, config.cca_time0, config.cca_time1
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, nh, nkv, hd
        self.lookback = (t0 - 1) + (t1 - 1)
        self.q_proj = Linear(h, nh * hd, bias=bias)
        self.k_proj = Linear(h, nkv * hd, bias=bias)
        self.v_proj_current = Linear(h, nkv * hd // 2, bias=bias)
        self.v_proj_delayed = Linear(h, nkv * hd // 2, bias=bias)
        channels = (nh + nkv) * hd
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, t0, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, t1, groups=nh + nkv)

    def forward(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = ctx.real_tokens()
        if real is not None:  # padding's inputs zeroed, as transformers does
            x = (x * real[:, :, None]).to(x.dtype)
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)
        q_res = (q.view(B, T, nh, hd) + k.view(B, T, nkv, hd).repeat_interleave(nh // nkv, dim=2)) * 0.5
        k_res = q_res.view(B, T, nkv, nh // nkv, hd).mean(dim=-2)
        state = ctx.state(self.layer_idx)
        qk = torch.cat([q, k], dim=-1).transpose(1, 2)  # (B, C, T)
        if state is None:
            prev = qk.new_zeros(B, qk.shape[1], self.lookback)
            v_prev = self.v_proj_delayed(x.new_zeros(B, 1, x.shape[-1]))
        else:
            prev, v_prev = state[0].to(qk.dtype), state[1].unsqueeze(1)
        full = torch.cat([prev, qk], dim=-1)  # (B, C, K + T)
        mixed = self.conv_qk_grouped(self.conv_qk_depthwise(full)).transpose(1, 2)  # (B, T, C)
        q = mixed[..., : nh * hd].reshape(B, T, nh, hd) + q_res
        k = mixed[..., nh * hd :].reshape(B, T, nkv, hd) + k_res
        delayed = self.v_proj_delayed(x)
        v_delayed = torch.cat([v_prev.to(delayed.dtype), delayed[:, :-1]], dim=1)
        v = torch.cat([self.v_proj_current(x), v_delayed], dim=-1).view(B, T, nkv, hd)
        ctx.keep_state(
            self.layer_idx, (full[..., full.shape[-1] - self.lookback :].clone(), delayed[:, -1].clone())
        )
        return q, k, v


class ZayaQKNorm(nn.Module):
    """q and k L2-normalised to sqrt(head_dim) (norms clamped at the dtype's eps); k times `temp` per KV head."""

    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.head_dim_scale = config.head_dim**0.5
        self.temp = nn.Parameter(torch.zeros(config.num_key_value_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.finfo(q.dtype).eps
        q = q * (self.head_dim_scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.head_dim_scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


class ZayaAttention(Attention):
    """Attention over the CCA projection's queries, keys and values (normalised by qk_norm), RoPE by layer type."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, window=config.layer_window(layer_idx),
                         rope=config.layer_types[layer_idx])  # fmt: skip
        self.qkv_proj = ZayaCCAProjection(config, layer_idx)
        self.qk_norm = ZayaQKNorm(config)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x, ctx)
        q, k = self.qk_norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.o_proj(y.reshape(B, T, -1))


class ZayaRouterMLP(nn.Module):
    """out_proj(gelu(fc2(gelu(fc1(norm(x))))))."""

    def __init__(self, hidden: int, classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.fc1 = Linear(hidden, hidden, bias=True)
        self.fc2 = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


class ZayaRouter(nn.Module):
    """The router: (x (B, T, h), the previous layer's router state or None) -> (expert ids (B, T, 1), weights
    (B, T, 1), this layer's router state (B, T, router_hidden_size)); the skip class as expert 0 with weight 0."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        r, self.num_experts, self.top_k = config.router_hidden_size, config.num_experts, 1
        self.down_proj = Linear(config.hidden_size, r, bias=True)
        if layer_idx != 0:
            self.router_states_scale = nn.Parameter(torch.ones(r))
        self.router_mlp = ZayaRouterMLP(r, self.num_experts + 1, config.rms_norm_eps)
        biases = torch.zeros(self.num_experts + 1, dtype=torch.float32)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)

    def forward(self, x: torch.Tensor, states: torch.Tensor | None):
        r = self.down_proj(x)
        if states is not None and hasattr(self, "router_states_scale"):
            r = r + states * self.router_states_scale
        probs = torch.softmax(self.router_mlp(r), dim=-1)
        ids = torch.topk(probs.detach().float() + self.balancing_biases, self.top_k, dim=-1)[1]
        weights = probs.gather(-1, ids)
        skip = ids == self.num_experts
        return ids.masked_fill(skip, 0), weights.masked_fill(skip, 0), r


class ZayaSparseMoeBlock(SparseMoeBlock):
    """The router and the experts; forward(x, router state) -> (output, the next layer's router state)."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )
        super().__init__(ZayaRouter(config, layer_idx), experts)

    def forward(self, x: torch.Tensor, states: torch.Tensor | None = None):
        B, T, h = x.shape
        ids, weights, states = self.gate(x, states)
        y = self.experts(x.reshape(-1, h), ids.reshape(-1, 1), weights.reshape(-1, 1))
        return y.view(B, T, h), states


class ZayaResidualScaling(nn.Module):
    """(out + hidden_states_bias) * hidden_states_scale + (residual + residual_bias) * residual_scale."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = (out + self.hidden_states_bias) * self.hidden_states_scale
        return out + (residual + self.residual_bias) * self.residual_scale


class ZayaDecoderLayer(nn.Module):
    """Pre-norm CCA attention and mixture, each joining the fp32 residual stream through its scaling."""

    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = ZayaAttention(config, layer_idx)
        self.mlp = ZayaSparseMoeBlock(config, layer_idx)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_attention_residual_scale = ZayaResidualScaling(h)
        self.post_mlp_residual_scale = ZayaResidualScaling(h)

    def forward(self, x: torch.Tensor, ctx, router_states: torch.Tensor | None = None):
        dtype = self.input_layernorm.weight.dtype
        x = self.post_attention_residual_scale(self.self_attn(self.input_layernorm(x.to(dtype)), ctx), x)
        y, router_states = self.mlp(self.post_attention_layernorm(x.to(dtype)), router_states)
        return self.post_mlp_residual_scale(y, x), router_states


class ZayaModel(DecoderModel):
    """The body: the embeddings' scale and bias, the layers carrying the router state, the final norm."""

    def __init__(self, config: ZayaConfig):
        super().__init__(config, ZayaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return (x + self.input_hidden_states_bias) * self.input_hidden_states_scale

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.to(self.norm.weight.dtype))

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """The layers over the fp32 residual stream, each router reading the previous layer's router state."""
        x, router_states = x.float(), None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x, router_states = torch.utils.checkpoint.checkpoint(
                    layer, x, ctx, router_states, use_reentrant=False
                )
            else:
                x, router_states = layer(x, ctx, router_states)
        x = self.final_norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


class ZayaForCausalLM(CausalLM):
    """transformers' ZayaForCausalLM."""

    config_class = ZayaConfig
    recurrent: ClassVar[bool] = True  # the CCA projections' convolution and delayed-value states
    compiled_graphs: ClassVar[bool] = False  # the router state runs from layer to layer: the eager step
    tp_patterns: ClassVar[dict[str, str]] = {}  # transformers declares none
    _no_split_modules: ClassVar[list[str]] = ["ZayaDecoderLayer"]

    def __init__(self, config: ZayaConfig):
        super().__init__(config, ZayaModel(config))
        if config.lm_head_bias:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    def blocks(self) -> list[str]:
        """The embeddings, the body's own input scale and bias ("model"), the layers, the final norm, the head."""
        out = super().blocks()
        return [out[0], "model", *out[1:]]
