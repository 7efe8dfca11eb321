"""Inkling 2's attention, convolutions, experts, router and block attention residuals (see models.inkling2)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..nn import Attention, Experts, Linear
from ..nn.causal_conv import causal_conv1d
from .deepseek_v4_layers import DeepseekV4Router, unweighted_rms
from .inkling import InklingShortConvolution, history, relative_bias


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def l2_clip(x: torch.Tensor, threshold: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each head vector (last dimension), times `scale` when given, scaled down to an L2 norm of `threshold` where
    longer; in fp32, cast back."""
    h = x.float() if scale is None else x.float() * scale.float()
    norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return (h * (threshold / (norm + 1e-6)).clamp(max=1.0)).to(x.dtype)


class ScaledL2Clip(nn.Module):
    """transformers' Inkling2ScaledL2Clip: a learned scale (heads, dim), then the L2 clip."""

    def __init__(self, heads: int, dim: int, threshold: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(heads, dim))
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_clip(x, self.threshold, self.scale)


class Inkling2ShortConvolution(InklingShortConvolution):
    """(x + conv(x)) / sqrt(K + 1), in fp32, padding's inputs zeroed; (x, real, state) -> (y, the next state)."""

    def forward(self, x: torch.Tensor, real, state) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.float()
        masked = h if real is None else h * real[:, :, None]
        y, state = causal_conv1d(masked.transpose(1, 2), self.conv1d.weight.float(), None, state)
        return ((y.transpose(1, 2) + h) / math.sqrt(self.conv1d.kernel_size[0] + 1)).to(x.dtype), state


class DynamicShortConvolution(nn.Module):
    """transformers' Inkling2DynamicShortConvolution: taps static_weight (K, C) (tap 0 the current token) plus
    weight_proj(dynamic input) per head and token; (x, dynamic input, real, state) -> (y, the next state)."""

    def __init__(self, channels: int, hidden: int, heads: int, kernel: int):
        super().__init__()
        self.heads, self.kernel = heads, kernel
        self.static_weight = nn.Parameter(torch.zeros(kernel, channels))
        self.weight_proj = Linear(hidden, heads * kernel, bias=False)

    def forward(
        self, x: torch.Tensor, dynamic: torch.Tensor, real, state
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        K, n = self.kernel, self.heads
        taps = self.weight_proj(dynamic).float().view(B, T, n, 1, K)
        taps = self.static_weight.float().t().reshape(n, C // n, K) + taps  # (B, T, heads, C / heads, K)
        h = x.float()
        masked = (h if real is None else h * real[:, :, None]).transpose(1, 2)
        if state is None:
            state = masked.new_zeros(B, C, K - 1)
        full = torch.cat([state.float(), masked], dim=-1)  # (B, C, K - 1 + T)
        windows = full.unfold(-1, K, 1).flip(-1).transpose(1, 2).reshape(B, T, n, C // n, K)  # [..., lag]
        y = (windows * taps).sum(-1).reshape(B, T, C)
        return ((y + h) / math.sqrt(2 * K + 1)).to(x.dtype), full[:, :, T:].clone()


class Inkling2Attention(Attention):
    """transformers' Inkling2SlidingAttention / Inkling2FullAttention (the module docstring): forward(x, ctx, states,
    real, k input, v input) -> (out, (k, v states)); x is the query input, also of r/gate/sink projections."""

    def __init__(self, config: Any, layer_idx: int):
        sliding = config.is_sliding(layer_idx)
        swa = "swa_" if sliding else ""
        hd = getattr(config, f"{swa}head_dim")
        nh, nkv = getattr(config, f"{swa}num_attention_heads"), getattr(config, f"{swa}num_key_value_heads")
        h, K = config.hidden_size, config.conv_kernel_size
        super().__init__(
            h, nh, nkv, hd, layer_idx, rope=None, window=config.sliding_window if sliding else None
        )
        self.r_proj = Linear(h, nh * config.d_rel, bias=False)
        if sliding:
            self.k_sconv, self.v_sconv = (Inkling2ShortConvolution(nkv * hd, K) for _ in range(2))
        else:
            self.k_sconv, self.v_sconv = (DynamicShortConvolution(nkv * hd, h, nkv, K) for _ in range(2))
        self.rel_logits_proj = nn.Module()
        self.rel_logits_proj.proj = nn.Parameter(torch.empty(config.d_rel, config.sliding_window if sliding
                                                             else config.rel_extent))  # fmt: skip
        self.gate_proj = Linear(h, nh * hd, bias=False)
        self.sink_proj = Linear(h, nh, bias=False)
        self.q_l2_clip = ScaledL2Clip(nh, hd, config.qk_l2_clip_threshold)
        self.rel_l2_clip = ScaledL2Clip(nh, config.d_rel, config.rel_l2_clip_threshold)
        self.k_threshold, self.eps = config.qk_l2_clip_threshold, config.rms_norm_eps
        self.log_scaled = not sliding and config.log_scaling_n_floor is not None

    def forward(self, x, ctx, states=(None, None), real=None, k_in=None, v_in=None):
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.sliding_window is not None:
            k, k_state = self.k_sconv(self.k_proj(x), real, states[0])
            v, v_state = self.v_sconv(self.v_proj(x), real, states[1])
        else:
            k, k_state = self.k_sconv(self.k_proj(k_in), k_in, real, states[0])
            v, v_state = self.v_sconv(self.v_proj(v_in), v_in, real, states[1])
        q = self.q_l2_clip(self.q_proj(x).view(B, T, nh, hd))
        rel = self.rel_l2_clip(self.r_proj(x).view(B, T, nh, -1))
        if self.log_scaled:
            tau = ctx.rope["log_scaling"][0]  # (B, T, 1, 1) in fp32
            q, rel = (q.float() * tau).to(q.dtype), (rel.float() * tau).to(rel.dtype)
        k = l2_clip(k.view(B, T, nkv, hd), self.k_threshold).transpose(1, 2)
        v = unweighted_rms(v.view(B, T, nkv, hd).float(), self.eps).to(v.dtype).transpose(1, 2)
        k, v, q_pos, k_pos, mask = history(ctx, self.layer_idx, k, v, self.sliding_window)
        k, v = k.to(q.dtype), v.to(q.dtype)
        bias = relative_bias(rel, self.rel_logits_proj.proj, q_pos, k_pos)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) * self.scaling + bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sinks = self.sink_proj(x).transpose(1, 2).unsqueeze(-1)  # (B, nh, T, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1).float(), dim=-1)[..., :-1].to(q.dtype)
        if getattr(ctx, "attentions", None) is not None:
            ctx.attentions.append(probs)
        y = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)
        y = (y.float() * torch.sigmoid(self.gate_proj(x).float())).to(y.dtype)
        return self.o_proj(y), (k_state, v_state)


class Inkling2Experts(Experts):
    """The routed experts: gate_softcap(g) * sigmoid(g) * up_softcap(u), in fp32."""

    def __init__(self, config: Any):
        super().__init__(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.caps = (float(config.mlp_gate_softcap), float(config.mlp_up_softcap))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g, u = gate.float(), up.float()
        return (softcap(g, self.caps[0]) * torch.sigmoid(g) * softcap(u, self.caps[1])).to(gate.dtype)


class Inkling2Router(DeepseekV4Router):
    """DeepSeek-V4's router, in fp32: (x (N, h)) -> (expert ids, weights (N, k) in fp32)."""

    def __init__(self, config: Any):
        super().__init__(config, hashed=False)

    def forward(self, x: torch.Tensor, ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x.float(), None)


class BlockAttentionResidual(nn.Module):
    """Learned queries (`query`: (h,) or (Q, h)) attending over the block states (B, T, n, h) and the partial state
    (B, T, h), all unweighted-RMS-normed, per token -> Q outputs (B, T, h) in fp32."""

    def __init__(self, hidden: int, queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden) if queries == 1 else torch.zeros(queries, hidden))

    def forward(self, blocks: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stacked = unweighted_rms(torch.cat([blocks.float(), partial.float()[..., None, :]], dim=-2), 1e-6)
        q = self.query.float().view(-1, stacked.shape[-1])  # (Q, h)
        probs = torch.softmax(stacked @ q.t() * stacked.shape[-1] ** -0.5, dim=-2)  # (B, T, n + 1, Q)
        return (probs.transpose(-1, -2) @ stacked).unbind(-2)
