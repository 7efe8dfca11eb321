"""Qwen3-Next: a hybrid of gated attention and Gated DeltaNet layers (`layer_types`, by default three
"linear_attention" layers then one "full_attention", `full_attention_interval` 4), each followed by Qwen 2 MoE's
mixture (experts in every `decoder_sparse_step`-th layer but `mlp_only_layers`, a shared expert gated by
sigmoid(shared_expert_gate(x)), the top k renormalised with `norm_topk_prob`).

- Every RMSNorm is zero-centred: times (1 + w) in fp32 (Gemma's), its weight starting at zero; the gated norm of
  the linear layers is the exception (times w, starting at one).
- Full attention: q_proj gives each head its queries and a gate of the same width (per head [q; gate]); per-head
  q/k norms; RoPE on the first `partial_rotary_factor` (0.25) of each head; the output times sigmoid(gate)
  before o_proj.
- Linear attention (`linear_attn`, autolm.nn.gated_delta): in_proj_qkvz gives, per key head, its query, key, and
  its value heads' values and output gates z; in_proj_ba, per key head, its value heads' beta and decay inputs.
  q/k/v pass a causal depthwise conv1d (kernel `linear_conv_kernel_dim`) and SiLU; beta = sigmoid(b), the decay
  g = -exp(A_log) * softplus(a + dt_bias); the gated delta rule; each value head normed and gated by SiLU(z)
  (a GatedRMSNorm); out_proj. Its state in the cache: the conv's last K - 1 inputs and the rule's fp32 state.

The Hub checkpoints keep one tensor per expert (stacked in the model) and multi-token-prediction layers (`mtp.*`),
which are not loaded. GGUF: llama.cpp's "qwen3next" (autolm.models.qwen3_next_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int, _is_number
from ..config_fields import read_rope
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    Ignored,
    Linear,
    RMSNorm,
    Router,
    SparseMoeBlock,
)
from ..nn.causal_conv import causal_conv1d
from ..nn.gated_delta import GatedRMSNorm, chunk_gated_delta_rule, recurrent_gated_delta_rule
from ..nn.linear import packed
from ..nn.rope import apply_rotary
from . import qwen3_next_gguf
from .base import CausalLM, DecoderModel
from .mixtral import GGUF_EXPERTS
from .qwen2_moe import GGUF_EXPERT_KEYS, QWEN_MOE_RULES, QWEN_MOE_TP, QwenMoeConfig

_LINEAR_KEYS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                "linear_num_value_heads")  # fmt: skip


def check_linear_sizes(config: Any) -> None:
    """The gated delta-net layers' sizes (linear_*): positive integers, the key heads dividing the value heads."""
    for name in _LINEAR_KEYS:
        v = getattr(config, name)
        if not _is_int(v) or not 0 < v <= 1 << 14:
            raise ConfigError(f"{config.source}: {name} must be a positive integer, found {v!r}")
    if config.linear_num_value_heads % config.linear_num_key_heads:
        raise ConfigError(f"{config.source}: linear_num_key_heads ({config.linear_num_key_heads}) must divide "
                          f"linear_num_value_heads ({config.linear_num_value_heads})")  # fmt: skip


class HybridConfig:
    """What the Qwen3-Next and Qwen 3.5 configs share (a mixin before their dataclass base): layer types from
    full_attention_interval, partial RoPE (0.25 by default, also read from the top level as transformers 4 wrote
    it), and the linear layers' sizes."""

    partial_rotary_default: ClassVar[bool] = True  # the default RoPE rotates only the partial dimensions
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "linear_attention")

    def hybrid_post_init(self) -> None:
        if isinstance(self.rope_parameters, dict):  # built in Python: transformers' default factor
            self.rope_parameters = {"partial_rotary_factor": 0.25, **self.rope_parameters}
        n, every = self.num_hidden_layers, self.extra.get("full_attention_interval", 4)
        if self.layer_types is None and _is_int(n) and n > 0:
            if not _is_int(every) or every < 1:
                raise ConfigError(f"{self.source}: full_attention_interval must be a positive integer, found "
                                  f"{every!r}")  # fmt: skip
            self.layer_types = [
                "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
            ]

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = read_rope(d, cls, source)
        rope.setdefault("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
        return rope, spelling

    def to_dict(self) -> dict[str, Any]:
        """transformers 4's spelling (the Hub's config.json) keeps partial_rotary_factor at the top level."""
        out = super().to_dict()
        if self.rope_spelling == "v4":
            scaling = dict(out.get("rope_scaling") or {})
            out["partial_rotary_factor"] = scaling.pop("partial_rotary_factor", 0.25)
            plain = scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}
            out["rope_scaling"] = None if plain else scaling
        return out

    def validate(self) -> None:
        super().validate()
        src = self.source
        check_linear_sizes(self)
        factor = self.rope_parameters.get("partial_rotary_factor")
        if not _is_number(factor) or not 0 < factor <= 1 or int(self.head_dim * factor) % 2:
            raise ConfigError(f"{src}: partial_rotary_factor must be a number in (0, 1] that leaves an even number "
                              f"of rotary dimensions of the {self.head_dim} in a head, found {factor!r}")  # fmt: skip


@dataclass(repr=False)
class Qwen3NextConfig(HybridConfig, QwenMoeConfig):
    """transformers' Qwen3NextConfig (its fields and defaults)."""

    model_type: ClassVar[str] = "qwen3_next"
    absent_keys: ClassVar[tuple[str, ...]] = ("mlp_bias", "sliding_window", "use_sliding_window",
                                              "max_window_layers")  # fmt: skip
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int | None = 256
    sliding_window: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        self.hybrid_post_init()
        super().__post_init__()

    qk_norm = property(lambda self: True)


def zero_centred_norm(config: Any, dim: int) -> RMSNorm:
    """transformers' Qwen3NextRMSNorm: times (1 + w) in fp32."""
    return RMSNorm(dim, config.rms_norm_eps, offset=1.0)


class GatedAttention(Attention):
    """Attention whose q_proj gives each head [queries; gate] (2 * head_dim), the output times sigmoid(gate)
    before o_proj; per-head zero-centred q/k norms; partial RoPE."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, layer_idx, bias=config.attention_bias, qk_norm="head",
                         norm=lambda dim: zero_centred_norm(config, dim))  # fmt: skip

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        super().make_projections(hidden, bias, o_bias)
        self.q_proj = Linear(hidden, 2 * self.num_heads * self.head_dim, bias=bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q_gate, k, v = self.project(x)
        q, gate = q_gate.view(B, T, nh, 2 * hd).chunk(2, dim=-1)  # (B, T, nh, hd) each
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k.view(B, T, nkv, hd)).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling).reshape(B, T, nh * hd)
        return self.o_proj(y * torch.sigmoid(gate.reshape(B, T, nh * hd)))


class Qwen3NextGatedDeltaNet(nn.Module):
    """The linear-attention mixer (see the module docstring). `project` gives the conv's input and z, b, a in
    the family's projection layout; the rest is shared with Qwen 3.5."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        K = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False, padding=K - 1
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, config.hidden_size, bias=False)
        self.make_projections(config.hidden_size)

    def make_projections(self, hidden: int) -> None:
        self.in_proj_qkvz = Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(hidden, 2 * self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, h) -> the conv's input [q; k; v] (B, T, conv_dim), z (B, T, Hv, dv), b and a (B, T, Hv).
        Qwen3-Next groups the projections by key head: [q, k, v of its value heads, z of them] and [b; a]."""
        B, T, _ = x.shape
        hk, r, dk, dv = (
            self.num_k_heads,
            self.num_v_heads // self.num_k_heads,
            self.head_k_dim,
            self.head_v_dim,
        )
        qkvz, ba = packed(x, (self.in_proj_qkvz, self.in_proj_ba))
        q, k, v, z = qkvz.view(B, T, hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = ba.view(B, T, hk, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(B, T, -1, dv), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def beta(self, b: torch.Tensor) -> torch.Tensor:
        """The delta rule's write strengths from the b projection (OLMo Hybrid doubles them)."""
        return b.sigmoid()

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """The rule's log decay (<= 0) from the a projection: one per value head."""
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        real = ctx.real_tokens()
        if real is not None:  # padding's inputs zeroed: a left-padded row's state is its unpadded one
            x = (x * real[:, :, None]).to(x.dtype)
        conv_state, state = ctx.state(self.layer_idx) or (None, None)
        qkv, z, b, a = self.project(x)
        qkv, conv_state = causal_conv1d(qkv.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state)
        qkv = F.silu(qkv).to(x.dtype)
        q, k, v = qkv.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.reshape(B, T, -1, self.head_k_dim), k.reshape(B, T, -1, self.head_k_dim)
        v = v.reshape(B, T, -1, self.head_v_dim)
        beta, g = self.beta(b), self.decay(a)
        rule = recurrent_gated_delta_rule if state is not None and T == 1 else chunk_gated_delta_rule
        y, state = rule(q, k, v, g, beta, state)  # (B, T, Hv, dv)
        ctx.keep_state(self.layer_idx, (conv_state, state))
        y = self.norm(y.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(y.reshape(B, T, self.value_dim))


def moe_or_mlp(config: Any, layer_idx: int) -> nn.Module:
    """Experts with a gated shared expert in sparse layers (config.sparse), else a dense gated MLP."""
    h, act = config.hidden_size, config.hidden_act
    if not config.sparse(layer_idx):
        return GatedMLP(h, config.intermediate_size, act)
    router = Router(h, config.num_experts, config.num_experts_per_tok, normalize=config.norm_topk_prob)
    experts = Experts(config.num_experts, h, config.moe_intermediate_size, act)
    shared = GatedMLP(h, config.shared_expert_intermediate_size, act)
    return SparseMoeBlock(router, experts, shared, Linear(h, 1, bias=False))


class HybridDecoderLayer(nn.Module):
    """Pre-norm token mixer (`linear_attn` or `self_attn`, by layer type), then a pre-norm feed-forward block."""

    mixer_cls: ClassVar[type[nn.Module]] = Qwen3NextGatedDeltaNet

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        if config.layer_types[layer_idx] == "linear_attention":
            self.linear_attn = self.mixer_cls(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = zero_centred_norm(config, config.hidden_size)
        self.post_attention_layernorm = zero_centred_norm(config, config.hidden_size)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return moe_or_mlp(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        mixer = self.linear_attn if hasattr(self, "linear_attn") else self.self_attn
        x = x + mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextDecoderLayer(HybridDecoderLayer):
    pass


class HybridModel(DecoderModel):
    def __init__(self, config: Any, layer_cls: type[nn.Module]):
        super().__init__(config, layer_cls, zero_centred_norm(config, config.hidden_size))


class Qwen3NextForCausalLM(CausalLM):
    """transformers' Qwen3NextForCausalLM."""

    config_class = Qwen3NextConfig
    checkpoint_rules = CheckpointRules([*QWEN_MOE_RULES.rules, Ignored(r"mtp\..+")])
    # the attention, MLPs and experts split as Qwen 2 MoE's; the linear-attention mixers run whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = QWEN_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Qwen3NextDecoderLayer"]
    recurrent: ClassVar[bool] = True
    # llama.cpp renormalises the top k, runs every layer as a mixture, reads no attention biases
    gguf = GGUFLayout(
        "qwen3next",
        config=(
            *GGUF_EXPERT_KEYS,
            ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
            *qwen3_next_gguf.GGUF_LINEAR_KEYS,
        ),
        layer=(
            *GGUF_EXPERTS,
            ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
            ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
            ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
            *qwen3_next_gguf.GGUF_LINEAR,
        ),
        fixed=(("norm_topk_prob", True), ("attention_bias", False)),
        norm_shift=1.0,
        derive=qwen3_next_gguf.derive,
        write_config=qwen3_next_gguf.write_config,
        bare=("ssm_a",),
    )

    def __init__(self, config: Any):
        super().__init__(config, HybridModel(config, Qwen3NextDecoderLayer))
        # llama.cpp's linear-layer tensors: a rule that knows the heads of in_proj_qkvz
        self.checkpoint_rules = CheckpointRules(
            [*type(self).checkpoint_rules.rules, qwen3_next_gguf.Qwen3NextGGUF(config)]
        )
