"""GLM-5.3-Flash's (models.glm5_next) layer pieces: the manifold-constrained hyper-connections, the KDA layer's
forget gate, the clamped SwiGLU, and the latent attention whose k-pool indexer picks whole pools of keys.

Hyper-connections (transformers' Glm5NextTextHyperConnection): the streams (B, T, n * h) are flattened, RMS-normed
without a weight (eps rms_norm_eps) and projected by `fn` into pre (n), post (n) and comb (n * n) logits; pre =
sigmoid(logits * scale[0] + base) + hc_eps weighs the streams into the block's input, post = 2 * sigmoid(logits *
scale[1] + base) spreads the block's output y over the streams, comb = softmax(logits * scale[2] + base) + hc_eps,
made doubly stochastic by hc_sinkhorn_iters Sinkhorn steps (columns, then rows and columns), mixes the streams:
out_i = post_i * y + sum_j comb_ji * stream_j. All of it in float32 but the mixing, in the model's dtype.

The k-pool indexer (transformers' Glm5NextTextIndexer, no RoPE anywhere): each row's real keys are taken in order
in pools of `index_kpool` from its first real key; a complete pool's key is the per-channel softmax-weighted sum of
its k_norm(wk(x)) keys, the weights index_kpool_compress_gate(x) + index_kpool_compress_ape[place in pool]. A pool
whose last key a query sees scores sum over the heads of weights_proj(x)_h * n_heads ** -0.5 * relu(q_h . key *
index_head_dim ** -0.5) (q = wq_b(q_resid)); the query attends to the keys of its best index_topk / index_kpool
pools and, where index_kpool_always_select_tail, to the keys it sees after its last complete pool. The keys and
gate scores of every token stay in the cache (one extra layer of 2 * index_head_dim per indexed layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Linear, RMSNorm
from .deepseek_v3 import DeepseekV3Attention
from .deepseek_v32 import DSAIndexer
from .kimi_linear import KimiDeltaAttention
from .qwen4_exp_qsa import MaskedContext, indexer_history


class Glm5NextHyperConnection(nn.Module):
    """One block's hyper-connection (module docstring): forward(x, block) with x the flat streams (B, T, n * h)."""

    def __init__(self, config: Any):
        super().__init__()
        n = self.hc_mult = config.hc_mult
        self.hc_eps, self.norm_eps, self.iters = config.hc_eps, config.rms_norm_eps, config.hc_sinkhorn_iters
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre (B, T, n), post (B, T, n), comb (B, T, n, n), float32."""
        n, eps = self.hc_mult, self.hc_eps
        flat = x.float()
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        pre, post, comb = F.linear(flat, self.fn.float()).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(pre * s[0] + pre_b) + eps
        post = 2 * torch.sigmoid(post * s[1] + post_b)
        comb = torch.softmax(comb.unflatten(-1, (n, n)) * s[2] + comb_b.view(n, n), dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return pre, post, comb

    def forward(self, x: torch.Tensor, block) -> torch.Tensor:
        B, T, _ = x.shape
        pre, post, comb = self.weights(x)
        streams = x.view(B, T, self.hc_mult, -1)
        y = block((pre.unsqueeze(-1) * streams).sum(2).to(x.dtype))
        dtype = x.dtype
        out = post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams
        return out.reshape(B, T, -1)


class Glm5NextForgetGate(nn.Module):
    """The per-channel log decay (B, T, H, d), fp32: linear_lower_bound * sigmoid(exp(A_log[h]) * g) with a lower
    bound, else -exp(A_log[h]) * softplus(g); g = f_b_proj(f_a_proj(x)) + dt_bias."""

    def __init__(self, config: Any):
        super().__init__()
        h, d, heads = config.hidden_size, config.linear_head_dim, config.linear_num_heads
        self.head_dim, self.lower_bound = d, config.linear_lower_bound
        self.f_a_proj = Linear(h, d, bias=False)
        self.f_b_proj = Linear(d, heads * d, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(heads * d))
        self.A_log = nn.Parameter(torch.zeros(heads))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a: f_a_proj(x) (B, T, d) -> the log decay (B, T, H, d)."""
        g = (self.f_b_proj(a).float() + self.dt_bias.float()).unflatten(-1, (-1, self.head_dim))
        rate = self.A_log.float().exp()[:, None]
        if self.lower_bound is not None:
            return self.lower_bound * torch.sigmoid(rate * g)
        return -rate * torch.where(g > 20.0, g, torch.log(1.0 + torch.exp(g)))


class Glm5NextLinearAttention(KimiDeltaAttention):
    """Kimi Linear's KDA layer (models.kimi_linear) with GLM-5.3-Flash's forget gate (one A_log per head, the
    optional lower bound)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        self.forget_gate = Glm5NextForgetGate(config)


class KPoolIndexer(DSAIndexer):
    """The k-pool indexer (module docstring): (x, q_resid, ctx) -> the mask (B, 1, T, S) of the keys kept."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        self.kpool, self.tail = config.index_kpool, config.index_kpool_always_select_tail
        self.width = 2 * self.head_dim  # the cache keeps each token's key and gate scores
        self.index_kpool_compress_ape = nn.Parameter(torch.zeros(self.kpool, self.head_dim))
        self.index_kpool_compress_gate = nn.Parameter(torch.ones(self.head_dim, config.hidden_size))

    def pools(self, keys: torch.Tensor, gates: torch.Tensor, real: torch.Tensor):
        """Every row's pools from its first real key: (pooled keys (B, P, d), token slots (B, P, kpool), complete
        (B, P), the first real slot (B,)), the pools no row completes dropped, as transformers."""
        B, S, _ = keys.shape
        first = torch.where(real.any(-1), real.long().argmax(-1), S)
        n = -(-S // self.kpool)
        slots = first[:, None, None] + torch.arange(n * self.kpool, device=keys.device).view(1, n, self.kpool)
        safe, b = slots.clamp(0, S - 1), torch.arange(B, device=keys.device)[:, None, None]
        inside = real[b, safe] & (slots < S)
        complete = inside.all(-1)
        logits = gates[b, safe].float() + self.index_kpool_compress_ape.float()[None, None]
        probs = torch.nan_to_num(logits.masked_fill(~inside[..., None], float("-inf")).softmax(dim=2))
        pooled = (probs.to(keys.dtype) * keys[b, safe]).sum(dim=2)
        keep = complete.any(0)
        return pooled[:, keep], slots[:, keep], complete[:, keep], first

    def choose(self, q, x, pooled, slots, complete, visible) -> torch.Tensor:
        """The pools each query keeps (B, T, P): its best index_topk / kpool among those it sees whole."""
        B, T, S = visible.shape
        scores = F.relu(q.float() @ pooled.transpose(-1, -2).float().unsqueeze(1) * self.head_dim**-0.5)
        weights = self.weights_proj(x).float() * self.n_heads**-0.5
        index = (weights.unsqueeze(-2) @ scores).squeeze(-2)  # (B, T, P)
        ends = slots[..., -1].clamp(0, S - 1)
        candidates = visible.gather(-1, ends[:, None, :].expand(B, T, -1)) & complete[:, None]
        index = index.masked_fill(~candidates, torch.finfo(index.dtype).min)
        top = index.topk(min(self.index_topk // self.kpool, index.shape[-1]), dim=-1).indices
        return torch.zeros_like(candidates).scatter_(-1, top, candidates.gather(-1, top))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        d, c = self.head_dim, self.kpool
        q = self.wq_b(q_resid).view(B, T, self.n_heads, d)
        pack = torch.cat([self.k_norm(self.wk(x)), F.linear(x, self.index_kpool_compress_gate)], dim=-1)
        every, real, at = indexer_history(ctx, self.slot, pack.unsqueeze(1))
        keys, gates = every[:, 0].split([d, d], dim=-1)
        S = keys.shape[1]
        kv = torch.arange(S, device=x.device)
        visible = (kv[None, :] <= at[:, None])[None] & real[:, None, :]  # (B, T, S)
        pooled, slots, complete, first = self.pools(keys, gates, real)
        kept = torch.zeros_like(visible)
        P = pooled.shape[1]
        if P:
            chosen = self.choose(q, x, pooled, slots, complete, visible)
            pool = (kv[None, :] - first[:, None]).div(c, rounding_mode="floor")  # (B, S)
            inside = (kv[None, :] >= first[:, None]) & (pool < P)
            kept = chosen.gather(-1, pool.clamp(0, P - 1)[:, None, :].expand(B, T, S)) & inside[:, None]
        if self.tail and c > 1:
            seen = visible.long().sum(-1)
            start = first[:, None] + seen - seen % c  # (B, T): the slots after the last complete pool
            kept |= (kv >= start[..., None]) & visible
        real_q = real.index_select(1, at)  # (B, T)
        itself = (kv[None, :] == at[:, None])[None] & ~real_q[..., None]
        return ((kept & real_q[..., None]) | itself)[:, None]  # a padding query sees itself only


class Glm5NextAttention(DeepseekV3Attention):
    """Latent attention without RoPE (its q_a / kv_a norms of rms_norm_eps) over the keys its own k-pool indexer
    keeps ("full"), or those the layer before it kept ("shared": `source` holds that layer's attention)."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        full = config.indexer_types[layer_idx] == "full"
        self.indexer = KPoolIndexer(config, layer_idx, slot) if full else None
        self.kept: torch.Tensor | None = None  # a full layer's last mask, which a shared layer after it reads
        self.source: list[Glm5NextAttention] = []

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x  # no position encoding (qk_rope_head_dim is 0)

    def keep(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.indexer is None:
            return self.source[0].kept.to(x.device)
        self.kept = self.indexer(x, self.q_a_layernorm(self.q_a_proj(x)), ctx)
        return self.kept

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return super().forward(x, MaskedContext(ctx, self.keep(x, ctx)))
