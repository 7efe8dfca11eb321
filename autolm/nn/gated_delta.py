"""Gated DeltaNet's pieces (the linear-attention layers of Qwen3-Next and Qwen 3.5), with transformers' arithmetic.

A gated delta rule layer keeps, per value head, a state S (k_head_dim, v_head_dim) that each token updates:

    S <- exp(g_t) * S                                   (decay, g_t <= 0)
    S <- S + beta_t * k_t (v_t - S^T k_t)^T             (the delta rule: write the part of v_t S does not predict)
    o_t = S^T q_t

with q_t and k_t L2-normalised and q_t scaled by k_head_dim ** -0.5. The decay g_t is one number per head (Gated
DeltaNet) or one per key channel (Kimi Delta Attention: g (B, T, H, d_k), exp(g_t) scaling the state's rows).
`recurrent_gated_delta_rule` runs this token by token (decoding); `chunk_gated_delta_rule` computes the same over
chunks of 64 tokens with a few matmuls each (the WY / UT transform), starting from a given state, so a prompt may
come in pieces. Both compute in fp32 and return the state in fp32, as transformers keeps it.

Before the rule, q/k/v pass a causal depthwise convolution (kernel K, nn.causal_conv) and SiLU, continuing from the
last K - 1 inputs of the previous piece (its state). After it, `GatedRMSNorm` norms each head's output and gates
it with SiLU(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (the FLA library's, as transformers computes it)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """(B, T, heads, d) inputs -> fp32 (B, Hv, T, d) with the key heads repeated for grouped value heads, q and k
    L2-normalised, q scaled by d_k ** -0.5; beta (B, T, Hv) -> (B, Hv, T); g (B, T, Hv) or per key channel
    (B, T, Hv, d_k) -> (B, Hv, T, 1) or (B, Hv, T, d_k)."""
    hk, hv = k.shape[2], v.shape[2]
    if hk != hv:  # each query/key head serves hv // hk consecutive value heads
        q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
    if g.dim() == 3:
        g = g[..., None]  # one decay per head: a single channel that broadcasts
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))  # fmt: skip
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


_TABLE_ELEMENTS = 1 << 25  # the per-channel decays' table: at most this many at once (128 MB in fp32)


def _decayed_dots(pairs, decay: torch.Tensor, upper: torch.Tensor) -> list[torch.Tensor]:
    """For each (a, b) of `pairs` ((B, H, chunks, C, d) each) and the log decays from each chunk's start (.., C, 1
    or d_k): sum over the channels of a_i * b_j * exp(decay_i - decay_j) for j <= i, else 0 -> (.., C, C). One
    matmul each where the decay is one per head; one per key channel a few chunks at a time (their C x C x d_k
    tables: every chunk's at once would take gigabytes for a long prompt)."""

    def table(d: torch.Tensor) -> torch.Tensor:
        return (d[..., :, None, :] - d[..., None, :, :]).masked_fill(upper, float("-inf")).exp()

    if decay.shape[-1] == 1:
        weights = table(decay)[..., 0]
        return [(a @ b.transpose(-1, -2)) * weights for a, b in pairs]
    outs = [a.new_empty(*a.shape[:-1], a.shape[-2]) for a, _ in pairs]
    B, H, n, C, d = decay.shape
    step = max(1, _TABLE_ELEMENTS // (B * H * C * C * d))  # chunks at a time
    for i in range(0, n, step):
        part = slice(i, i + step)
        weights = table(decay[:, :, part])
        for out, (a, b) in zip(outs, pairs, strict=True):
            out[:, :, part] = (a[:, :, part, :, None, :] * b[:, :, part, None, :, :] * weights).sum(dim=-1)
    return outs


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule token by token. q, k (B, T, Hk, dk), v (B, T, Hv, dv), g (B, T, Hv) or (B, T, Hv, dk) and beta
    (B, T, Hv), state (B, Hv, dk, dv) fp32 or None (zeros) -> (output (B, T, Hv, dv) in q's dtype, the state after
    the last token, fp32)."""
    dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, T, dk = k.shape
    S = v.new_zeros(B, H, dk, v.shape[-1]) if state is None else state.to(v)
    out = torch.zeros_like(v)
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None]
        predicted = (S * k[:, :, t, :, None]).sum(dim=-2)  # S^T k (B, H, dv)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (S * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), S


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over chunks of `chunk_size` tokens, from `state`; same arguments and results as
    recurrent_gated_delta_rule. Within a chunk the T delta-rule updates are one lower-triangular solve (the UT
    transform); the state passes from chunk to chunk."""
    dtype, T = q.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, H, _, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk_size - T % chunk_size) % chunk_size  # padded tokens: k = v = 0, beta = 0, no decay
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, pad))
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    # (B, H, chunks, C, d): the chunk's tokens along dim 3
    q, k, k_beta, v_beta, g = (
        x.reshape(B, H, -1, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta, g)
    )
    decay = g.cumsum(dim=-2)  # log of the decay from the chunk's start to t (.., C, 1 or dk)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)[..., None]
    # the UT transform's matrix, and each token's attention within its chunk
    ut, intra = _decayed_dots([(k_beta, k), (q, k)], decay, upper)
    # the UT transform (unit lower-triangular): the values to write, and the keys that read the old state
    values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    read_keys = torch.linalg.solve_triangular(ut, k_beta * decay.exp(), upper=False, unitriangular=True)
    S = values.new_zeros(B, H, dk, dv) if state is None else state.to(values)
    out = torch.zeros_like(values)
    q = q * decay.exp()
    k = k * (decay[..., -1:, :] - decay).exp()  # decayed to the chunk's end
    chunk_decay = decay[..., -1, :].exp()[..., None]  # (B, H, chunks, 1 or dk, 1): the state's rows
    for i in range(q.shape[2]):
        new = values[:, :, i] - read_keys[:, :, i] @ S  # what the old state does not already predict
        out[:, :, i] = q[:, :, i] @ S + intra[:, :, i] @ new
        S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ new
    out = out.reshape(B, H, -1, dv)[:, :, :T]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), S


class GatedRMSNorm(nn.Module):
    """RMSNorm of x gated by act(gate) (transformers' Qwen3NextRMSNormGated; `activation` "sigmoid" for Qwen4-Exp's
    and Kimi Linear's): normed in fp32, cast back, times the weight (starting at one), times act(gate) in fp32,
    cast back; with `fp32_weight` (Kimi Linear's) the weight multiplies in fp32, one cast at the end."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu", fp32_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.activation, self.fp32_weight = eps, activation, fp32_weight
        self.act = F.silu if activation == "silu" else torch.sigmoid

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight.float() * h if self.fp32_weight else self.weight * h.to(dtype)
        return (h * self.act(gate.float())).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
