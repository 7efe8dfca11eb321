"""DeepSeek-V4's blocks for models.deepseek_v4: its mixture (the router, the clamped experts and shared expert), its
hyper-connection with the Sinkhorn mixing (described there), and its attention (transformers' DeepseekV4Attention
and its compressors):

One shared key-value head per layer (K = V = kv_norm(kv_proj(x)), turned), queries from the low-rank path
(q_b_proj(q_a_norm(q_a_proj(x))), each head RMS-normed without a weight, turned), RoPE over interleaved pairs of each
head's LAST qk_rope_head_dim features ("main" RoPE on sliding layers, "compress" on the compressed ones), gpt-oss'
per-head sinks, the output's rope features turned back by its query's position, then the grouped output projection
(o_a_proj per group of heads, o_b_proj mixing the groups). Every layer attends to the last `sliding_window` slots.

Compressed layers add entries the query also attends to (transformers' DeepseekV4HCACompressor / CSACompressor):
each window of `m` slots (compress_rates by layer type; slot w * m .. w * m + m - 1, padding included, as
transformers counts them) pools kv_proj(x) under softmax(gate_proj(x) + position_bias) over the window into one
entry, normed (kv_norm) and turned at position w * m. A query at position p sees entries w < (p + 1) // m (the HCA
layers: all of them in a one-token step, as transformers). CSA (compressed_sparse_attention) pools two series
(kv_proj is 2 * head_dim wide): entry w over the previous window's first half and its own window's second half, and
its lightning indexer (the same pooling at index_head_dim, queries q_b_proj(q_resid) turned by the "compress" RoPE,
scores sum_h weights_proj(x)_h * n_h ** -0.5 * relu(q_h . k) * index_head_dim ** -0.5) keeps the top index_topk
entries a query may see.

The cache: the turned keys go to the layer's cache layer; the compressors' raw projections (kv and gate, and the
indexer's) of every slot to an extra one-head layer (slot num_hidden_layers + layer index), from which the entries
are pooled again at each forward: the windows transformers' DeepseekV4HCACache / CSACache close one by one, with the
same results, so the one-token step and generate give the whole forward's tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import GenerationError
from ..nn import GatedMLP, Linear, RMSNorm, SparseMoeBlock
from ..nn.linear import packed
from ..nn.rope import cos_sin, inv_freq_and_scale, rotate_interleaved
from .hy_v4 import HYV4Experts, _mixes, _weigh
from .qwen4_exp_qsa import indexer_history

COMPRESSED = ("compressed_sparse_attention", "heavily_compressed_attention")


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over interleaved pairs of the last cos.shape[-1] features of x; the leading ones as they are."""
    rd = cos.shape[-1]
    return torch.cat((x[..., :-rd], rotate_interleaved(x[..., -rd:], cos, sin)), dim=-1)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps), the scale computed in float32 and applied in x's dtype (transformers')."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class GroupedLinear(nn.Module):
    """transformers' DeepseekV4GroupedLinear: x (..., groups, in) -> (..., groups, out / groups), group g by
    weight rows g * out / groups onward (weight (out, in), as nn.Linear's)."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, d = x.shape[:-2], x.shape[-1]
        w = self.weight.view(self.groups, -1, d).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, self.groups, d).transpose(0, 1), w).transpose(0, 1)
        return y.reshape(*shape, self.groups, -1)


def pool(
    raw: torch.Tensor, bias: torch.Tensor, m: int, d: int, overlap: bool, norm: nn.Module
) -> torch.Tensor:
    """raw (B, S, 2w): every slot's kv then gate projections (w = d, or 2 * d with `overlap`) -> the entries of the
    complete windows of m slots (B, S // m, d), normed, not turned."""
    B, S, _ = raw.shape
    n = S // m
    kv, gate = raw[:, : n * m].chunk(2, dim=-1)
    kv, gate = kv.reshape(B, n, m, kv.shape[-1]), gate.reshape(B, n, m, gate.shape[-1]) + bias
    if overlap:  # the previous window's first series (none before window 0), then this window's second
        lead_kv = torch.cat((kv.new_zeros(B, min(n, 1), m, d), kv[:, :-1, :, :d]), dim=1)
        lead_gate = torch.cat(
            (gate.new_full((B, min(n, 1), m, d), float("-inf")), gate[:, :-1, :, :d]), dim=1
        )
        kv = torch.cat((lead_kv, kv[..., d:]), dim=2)
        gate = torch.cat((lead_gate, gate[..., d:]), dim=2)
    weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
    return norm((kv * weights).sum(dim=2))


class Pooler(nn.Module):
    """The pooling of one series of entries (transformers' compressor and indexer share it): kv_proj, gate_proj,
    position_bias, kv_norm; `overlap`: CSA's two series."""

    def __init__(self, config: Any, d: int, m: int, overlap: bool):
        super().__init__()
        w = 2 * d if overlap else d
        self.head_dim, self.compress_rate, self.overlap = d, m, overlap
        self.kv_proj = Linear(config.hidden_size, w, bias=False)
        self.gate_proj = Linear(config.hidden_size, w, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(m, w))
        self.kv_norm = RMSNorm(d, config.rms_norm_eps, weight_in_fp32=True)
        self.rope, self.max_pos = config.rope_parameters["compress"], config.max_position_embeddings
        self.model_head_dim = config.head_dim  # the RoPE's share is of the attention's head
        self._freqs: dict = {}

    def width(self) -> int:
        return 2 * self.kv_proj.out_features

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.kv_proj(x), self.gate_proj(x)), dim=-1)

    def entries(self, raw: torch.Tensor) -> torch.Tensor:
        """raw (B, S, width) -> the windows' entries (B, S // m, d) turned at positions w * m."""
        out = pool(raw, self.position_bias, self.compress_rate, self.head_dim, self.overlap, self.kv_norm)
        key = raw.device
        if key not in self._freqs:
            self._freqs[key] = tuple(
                t.to(key) if torch.is_tensor(t) else t
                for t in inv_freq_and_scale(self.rope, self.model_head_dim, self.max_pos, None, True)
            )
        inv_freq, scale = self._freqs[key]
        positions = (torch.arange(out.shape[1], device=key) * self.compress_rate)[None]
        cos, sin = cos_sin(positions, inv_freq, scale, out.dtype)
        return turn(out, cos, sin)


class Indexer(Pooler):
    """CSA's lightning indexer (transformers' DeepseekV4Indexer; `scorer.weights_proj` as its name)."""

    def __init__(self, config: Any, m: int):
        super().__init__(config, config.index_head_dim, m, overlap=True)
        self.num_heads, self.index_topk = config.index_n_heads, config.index_topk
        self.q_b_proj = Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = Linear(config.hidden_size, self.num_heads, bias=False)

    @torch.no_grad()
    def select(self, raw, x, q_resid, threshold, cos, sin) -> torch.Tensor:
        """The entries (B, T, n) each query keeps: its top index_topk among those it may see (w < threshold)."""
        B, T, _ = x.shape
        keys = self.entries(raw)  # (B, n, d)
        q = turn(self.q_b_proj(q_resid).view(B, T, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        scores = torch.einsum("bhtd,bnd->bthn", q.float(), keys.float()).relu() * self.head_dim**-0.5
        weights = self.scorer.weights_proj(x).float() * self.num_heads**-0.5  # (B, T, h)
        index = (scores * weights.unsqueeze(-1)).sum(dim=2)  # (B, T, n)
        n = keys.shape[1]
        if n == 0:
            return index.new_zeros(B, T, 0, dtype=torch.bool)
        seeable = torch.arange(n, device=x.device) < threshold[..., None]
        top = index.masked_fill(~seeable, float("-inf")).topk(min(self.index_topk, n), dim=-1).indices
        return torch.zeros_like(seeable).scatter_(-1, top, top < threshold[..., None])


class Compressor(Pooler):
    """transformers' DeepseekV4HCACompressor (one series) or DeepseekV4CSACompressor (two, with the indexer)."""

    def __init__(self, config: Any, layer_type: str):
        m = config.compress_rates[layer_type]
        sparse = layer_type == "compressed_sparse_attention"
        super().__init__(config, config.head_dim, m, overlap=sparse)
        self.indexer = Indexer(config, m) if sparse else None

    def width(self) -> int:
        return super().width() + (0 if self.indexer is None else self.indexer.width())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        own = super().project(x)
        return own if self.indexer is None else torch.cat((own, self.indexer.project(x)), dim=-1)

    def forward(self, raw, x, q_resid, positions, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """raw (B, S, width) every slot's projections -> (entries (B, n, d), the mask (B, T, n) of those each
        query sees)."""
        B, T, _ = x.shape
        own = super().width()
        entries = self.entries(raw[..., :own])
        n = entries.shape[1]
        threshold = (positions + 1) // self.compress_rate  # (B, T)
        if self.indexer is not None:
            return entries, self.indexer.select(raw[..., own:], x, q_resid, threshold, cos, sin)
        if T == 1:  # transformers' one-token step: every entry made so far
            return entries, torch.ones(B, T, n, dtype=torch.bool, device=x.device)
        return entries, torch.arange(n, device=x.device) < threshold[..., None]


class DeepseekV4Attention(nn.Module):
    """One layer's attention (module docstring); its compressor's projections kept in cache layer `slot`."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__()
        h, hd, nh = config.hidden_size, config.head_dim, config.num_attention_heads
        self.layer_idx, self.slot, self.layer_type = layer_idx, slot, config.layer_types[layer_idx]
        self.num_heads, self.num_kv_heads, self.head_dim = nh, 1, hd
        self.rope_kind = "compress" if self.layer_type in COMPRESSED else "main"
        self.scaling, self.eps, self.window = hd**-0.5, config.rms_norm_eps, config.sliding_window
        self.o_groups = config.o_groups
        self.q_a_proj = Linear(h, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, weight_in_fp32=True)
        self.q_b_proj = Linear(config.q_lora_rank, nh * hd, bias=False)
        self.kv_proj = Linear(h, hd, bias=False)
        self.kv_norm = RMSNorm(hd, config.rms_norm_eps, weight_in_fp32=True)
        self.o_a_proj = GroupedLinear(nh * hd // config.o_groups, config.o_groups * config.o_lora_rank,
                                      config.o_groups)  # fmt: skip
        self.o_b_proj = Linear(config.o_groups * config.o_lora_rank, h, bias=False)
        self.sinks = nn.Parameter(torch.zeros(nh))
        self.compressor = Compressor(config, self.layer_type) if self.layer_type in COMPRESSED else None

    def extra_width(self) -> int:
        """The width of this layer's extra cache layer (its compressor's projections; 0 without one)."""
        return 0 if self.compressor is None else self.compressor.width()

    def window_mask(self, slots: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, T, S): causal, within the window, real keys (a padding query sees none, as transformers')."""
        kv = torch.arange(real.shape[1], device=real.device)[None, :]
        q = slots.to(real.device)[:, None]
        return ((kv <= q) & (kv > q - self.window))[None] & real[:, None, :]

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = ctx.rope[self.rope_kind]  # (B, 1, T, rope dims)
        q_resid = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q = turn(unweighted_rms(q, self.eps), cos, sin)
        kv = turn(self.kv_norm(self.kv_proj(x)).view(B, T, 1, self.head_dim).transpose(1, 2), cos, sin)
        keys, real, slots = indexer_history(ctx, self.layer_idx, kv)
        mask = self.window_mask(slots, real)
        if self.compressor is not None:
            raw = indexer_history(ctx, self.slot, self.compressor.project(x).unsqueeze(1))[0][:, 0]
            positions = ctx.rope["positions"][0].to(x.device)
            c_cos, c_sin = ctx.rope["compress"]
            entries, seen = self.compressor(raw, x, q_resid, positions, c_cos, c_sin)
            keys = torch.cat((keys, entries.unsqueeze(1).to(keys.dtype)), dim=2)
            mask = torch.cat((mask, seen), dim=-1)
        keys = keys.to(q.dtype)
        y = kernels.attention(q, keys, keys, mask[:, None], self.scaling, None, self.sinks,
                              getattr(ctx, "attentions", None))  # fmt: skip
        y = turn(y, cos.transpose(1, 2), -sin.transpose(1, 2))  # (B, T, nh, hd): the values' RoPE undone
        y = self.o_a_proj(y.reshape(B, T, self.o_groups, -1)).flatten(2)
        return self.o_b_proj(y)


class DeepseekV4Router(nn.Module):
    """The router (models.deepseek_v4's docstring): forward(x (N, h), token ids) -> (expert ids, weights) (N, k)."""

    def __init__(self, config: Any, hashed: bool):
        super().__init__()
        self.num_experts, self.top_k, self.hashed = (
            config.n_routed_experts,
            config.num_experts_per_tok,
            hashed,
        )
        self.scoring, self.scaling = config.scoring_func, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32)
            )

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight.to(x.dtype))
        scores = F.softplus(logits).sqrt() if self.scoring == "sqrtsoftplus" else logits.sigmoid()
        if self.hashed:
            if ids is None:
                raise GenerationError("DeepSeek-V4's hash_moe layers route by token id: give input_ids, not "
                                      "inputs_embeds")  # fmt: skip
            chosen = self.tid2eid[ids.reshape(-1).to(self.tid2eid.device)].long().to(x.device)
        else:
            chosen = torch.topk(
                scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False
            ).indices
        weights = scores.gather(1, chosen)
        return chosen, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling


class ClampedMLP(GatedMLP):
    """The shared expert: down(act(min(gate, limit)) * clamp(up, +-limit))."""

    def __init__(self, hidden: int, intermediate: int, act: str, limit: float):
        super().__init__(hidden, intermediate, act)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed(x, (self.gate_proj, self.up_proj))
        lim = self.limit
        return self.down_proj(self.act_fn(gate.clamp(max=lim)) * up.clamp(min=-lim, max=lim))


class DeepseekV4MoE(SparseMoeBlock):
    """Router, clamped experts and the clamped shared expert; forward(x (B, T, h), token ids (B, T) or None)."""

    def __init__(self, config: Any, layer_idx: int):
        c = config
        experts = HYV4Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.hidden_act,
                              limit=c.swiglu_limit)  # fmt: skip
        shared = ClampedMLP(c.hidden_size, c.moe_intermediate_size, c.hidden_act, c.swiglu_limit)
        router = DeepseekV4Router(c, c.mlp_layer_types[layer_idx] == "hash_moe")
        super().__init__(router, experts, shared_experts=shared)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        chosen, weights = self.gate(flat, ids)
        return (self.experts(flat, chosen, weights) + self.shared_experts(flat)).view(B, T, h)


class DeepseekV4HyperConnection(nn.Module):
    """One block's hyper-connection, streams mixed by Sinkhorn (models.deepseek_v4's docstring): forward(x, block)."""

    def __init__(self, config: Any):
        super().__init__()
        n = self.hc_mult = config.hc_mult
        self.hc_eps, self.norm_eps, self.iters = config.hc_eps, config.rms_norm_eps, config.hc_sinkhorn_iters
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def comb(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, n * n) logits -> the doubly stochastic (B, T, n, n) mixing, as transformers' Sinkhorn-Knopp."""
        n, eps = self.hc_mult, self.hc_eps
        comb = torch.softmax(logits.view(*logits.shape[:-1], n, n), dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return comb

    def forward(self, x: torch.Tensor, block) -> torch.Tensor:
        n, (B, T, _) = self.hc_mult, x.shape
        pre_w, post_w, comb_w = _mixes(x, self.fn, self.norm_eps).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        scale = self.scale.float()
        pre = torch.sigmoid(pre_w * scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
        comb = self.comb(comb_w * scale[2] + comb_b)
        y = block(_weigh(pre, x, n))
        dtype, streams = x.dtype, x.view(B, T, n, -1)
        out = post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams
        return out.reshape(B, T, -1)
