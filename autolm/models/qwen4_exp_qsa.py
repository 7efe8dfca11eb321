"""Qwen4-Exp's QSA: gated attention (autolm.models.qwen3_next.GatedAttention) whose keys a token indexer selects
(transformers' Qwen4ExpTextQSAIndexer and Qwen4ExpTextAttention).

Each token has one raw index key (index_qk_proj's last `indexer_head_dim` features) and `indexer_n_heads` index
queries (normed per head, zero-centred, rotated by the token's RoPE). For a query, the keys it may see (causal, not
padding) are taken in order in blocks of `indexer_compress_ratio`; a complete block's key is the mean of its raw
keys, normed, rotated by the RoPE of its first token's position. A block scores sum over the query heads of
relu(q . key) / sqrt(indexer_head_dim); the query attends to the top indexer_budget / indexer_compress_ratio
complete blocks and to every key after the last complete block, nothing else.

The blocks depend only on which tokens are real (the keys a query sees are the real ones up to it), so the pooled
keys are made once per row. The raw index keys and the RoPE tables of every token stay in the KV cache (an extra
one-head layer per indexed layer, slot `slot`), so a step over the cache selects as a whole forward does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..nn import Linear, OneToken
from ..nn.rope import apply_rotary
from .qwen3_next import GatedAttention, zero_centred_norm


def indexer_history(ctx, slot: int, pack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write pack (B, n, T, width) for the new tokens into cache layer `slot`; return every slot's (B, n, S, width),
    the real slots (B, S) and the new tokens' slots (T,)."""
    if isinstance(ctx, OneToken):
        buf, seen = ctx.keys[slot], ctx.seen
        buf.narrow(2, seen - 1, 1).copy_(pack)
        every = buf[:, :, :seen]
        slots = torch.arange(seen, device=pack.device)
        real = torch.ones(pack.shape[0], seen, dtype=torch.bool, device=pack.device)
        if ctx.starts is not None:
            real = slots[None, :] >= ctx.starts[:, None].to(pack.device)
        return every.to(pack.dtype), real, slots[-1:]
    every = pack
    if ctx.cache is not None:
        every = ctx.cache.update(slot, pack, pack, ctx.cache_position, ctx.kv_length)[0].to(pack.dtype)
    S = every.shape[2]
    real = torch.ones(pack.shape[0], S, dtype=torch.bool, device=pack.device)
    if ctx.attention_mask is not None:
        real = ctx.attention_mask[:, :S].bool().to(pack.device)
    return every, real, ctx.cache_position


class QSAIndexer(nn.Module):
    """The token indexer of one attention layer: (x (B, T, h), ctx) -> the mask (B, 1, T, S) of the keys kept."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__()
        self.layer_idx, self.slot = layer_idx, slot
        self.index_n_heads, self.index_head_dim = config.indexer_n_heads, config.indexer_head_dim
        self.compress_ratio = config.indexer_compress_ratio
        self.block_topk = config.indexer_budget // self.compress_ratio
        d = self.index_head_dim
        self.index_qk_proj = Linear(
            config.hidden_size, (self.index_n_heads + config.indexer_kv_heads) * d, bias=False
        )
        self.q_layernorm = zero_centred_norm(config, d)
        self.k_layernorm = zero_centred_norm(config, d)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.index_head_dim
        q, key = self.index_qk_proj(x).split([self.index_n_heads * d, d], dim=-1)
        cos, sin = ctx.rope["default"]  # (B, 1, T, r)
        q = apply_rotary(self.q_layernorm(q.view(B, T, -1, d)).transpose(1, 2), cos, sin)  # (B, nh, T, d)
        r = cos.shape[-1]
        pack = torch.cat([key.unsqueeze(1), cos.to(key.dtype), sin.to(key.dtype)], dim=-1)
        every, real, slots = indexer_history(ctx, self.slot, pack)
        keys, cos_all, sin_all = every[:, 0].split([d, r, r], dim=-1)
        return self.select(q, self.block_keys(keys, cos_all, sin_all, real), real, slots)

    def block_keys(self, keys, cos, sin, real) -> torch.Tensor:
        """Every row's complete-or-not blocks of real keys -> their pooled, normed, rotated keys (B, S // c, d)."""
        B, S, d = keys.shape
        c, nb = self.compress_ratio, S // self.compress_ratio
        rank = real.long().cumsum(-1) - 1  # the key's place among the row's real keys
        block = torch.where(real & (rank // c < nb), rank // c, nb)  # nb: a bin for what no block holds
        sums = keys.new_zeros(B, nb + 1, d, dtype=torch.float32)
        sums.scatter_add_(1, block[..., None].expand(-1, -1, d), keys.float())
        first = torch.where(rank % c == 0, block, nb)
        starts = torch.zeros(B, nb + 1, dtype=torch.long, device=keys.device)
        starts.scatter_(1, first, torch.arange(S, device=keys.device).expand(B, -1))
        at = starts[:, :nb, None].expand(-1, -1, cos.shape[-1])
        pooled = self.k_layernorm((sums[:, :nb] / c).to(keys.dtype))
        return apply_rotary(pooled, cos.gather(1, at), sin.gather(1, at))

    def select(self, q, blocks, real, slots) -> torch.Tensor:
        """q (B, nh, T, d), the blocks' keys (B, nb, d) -> the mask (B, 1, T, S): real keys up to the query, less the
        complete blocks not among its top ones (a padding query sees itself only)."""
        nb = blocks.shape[1]
        S, T, c = real.shape[1], slots.shape[0], self.compress_ratio
        counts = real.long().cumsum(-1)
        complete = counts.index_select(1, slots) // c  # (B, T) complete blocks each query sees
        scores = torch.einsum("bhtd,bnd->btnh", q.float(), blocks.float()).relu().sum(-1) / math.sqrt(
            self.index_head_dim
        )
        chosen = torch.arange(nb, device=q.device) < complete[..., None]  # (B, T, nb)
        for n in complete[complete > self.block_topk].unique().tolist():  # queries with more blocks than kept
            rows = complete == n
            top = scores[rows][:, :n].topk(self.block_topk, dim=-1).indices
            chosen[rows] = torch.zeros_like(chosen[rows]).scatter_(1, top, True)
        block = torch.where(real, (counts - 1) // c, nb)  # (B, S)
        in_complete = block[:, None, :] < complete[..., None]  # (B, T, S)
        kept = (
            chosen.gather(2, block.clamp(max=max(nb - 1, 0))[:, None, :].expand(-1, T, -1))
            if nb
            else in_complete
        )
        kv = torch.arange(S, device=q.device)
        causal = kv[None, :] <= slots[:, None]
        allowed = causal[None] & real[:, None, :] & ~(in_complete & ~kept)
        itself = (kv[None, :] == slots[:, None])[None] & ~real.index_select(1, slots)[..., None]
        return (allowed | itself)[:, None]


class MaskedContext:
    """A forward context whose attention runs under a given mask (the indexer's), the cache written as usual."""

    def __init__(self, ctx, mask: torch.Tensor):
        self.ctx, self.mask = ctx, mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)

    def attend(self, layer_idx: int, q, k, v, window=None, scale=None, softcap=None, sinks=None, *args,
               **kwargs) -> torch.Tensor:  # fmt: skip
        ctx = self.ctx
        if isinstance(ctx, OneToken):
            keys, values = ctx.keys[layer_idx], ctx.values[layer_idx]
            keys.narrow(2, ctx.seen - 1, 1).copy_(k)
            values.narrow(2, ctx.seen - 1, 1).copy_(v)
            k, v = keys[:, :, : ctx.seen], values[:, :, : ctx.seen]
        elif ctx.cache is not None:
            k, v = ctx.cache.update(layer_idx, k, v, ctx.cache_position, ctx.kv_length)
        k, v = k.to(q.dtype), v.to(q.dtype)
        return kernels.attention(q, k, v, self.mask, scale, None, sinks, getattr(ctx, "attentions", None))


class IndexedAttention(GatedAttention):
    """Gated attention over the keys its indexer keeps (transformers' Qwen4ExpTextAttention)."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx)
        self.indexer = QSAIndexer(config, layer_idx, slot)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return super().forward(x, MaskedContext(ctx, self.indexer(x, ctx)))
