"""CPM-Ant's layers (transformers' CpmAnt* modules and names): the relative position bias, the attention over the
prompt's and the text's keys, the pre-norm blocks; models/cpmant.py builds the model from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Attention, KVCache, Linear, RMSNorm


def position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """transformers' CPM-Ant bucket (always bidirectional) of key position minus query position, int32: half the
    buckets for keys after the query; within a half, exact buckets for the first quarter, log-spaced up to
    max_distance after."""
    num_buckets //= 2
    buckets = (relative > 0).to(torch.int32) * num_buckets
    relative = torch.abs(relative)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.int32)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(relative < max_exact, relative.to(torch.int32), large)


class CpmAntSegmentPositionEmbedding(nn.Module):
    """The attention bias (B, nh, T, S): `relative_attention_bias` rows segment_types ** 2 + num_buckets, one
    column per head; a position bucket between tokens of one segment, num_buckets + q_segment * segment_types +
    k_segment between segments."""

    def __init__(self, config):
        super().__init__()
        self.num_buckets, self.max_distance = (
            config.position_bias_num_buckets,
            config.position_bias_max_distance,
        )
        self.num_segments = config.segment_types
        rows = config.segment_types * config.segment_types + config.position_bias_num_buckets
        self.relative_attention_bias = nn.Parameter(torch.empty(rows, config.num_attention_heads))

    def forward(self, query_pos, key_pos, query_segment, key_segment) -> torch.Tensor:
        """Positions (T,), (S,); segments (B, T), (B, S)."""
        with torch.no_grad():
            between = (
                query_segment[:, :, None] * self.num_segments + key_segment[:, None, :] + self.num_buckets
            )
            rel = key_pos.to(torch.int32)[None, :] - query_pos.to(torch.int32)[:, None]
            same = position_bucket(rel, self.num_buckets, self.max_distance)
            buckets = torch.where(query_segment[:, :, None] == key_segment[:, None, :], same[None], between)
        return F.embedding(buckets, self.relative_attention_bias).permute(0, 3, 1, 2).contiguous()


@dataclass
class CpmAntContext:
    """What the layers of one forward share: the cache and the new text tokens' slots in it (`slots`, T), whether
    the prompt tokens lead the new states (the first forward), the mask (B, 1, T', S) and bias (B, nh, T', S)
    over the prompt's and the text's keys, the training-mode dropout, a list collecting attention probabilities."""

    cache: KVCache | None
    slots: torch.Tensor
    kv_length: int  # text slots attended over
    prompt_length: int
    first: bool
    mask: torch.Tensor
    bias: torch.Tensor
    dropout: float = 0.0
    attentions: list | None = None

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nh, T', hd) of the new states -> every key and value attended over: the prompt's, then the
        text's (through the cache where there is one)."""
        if self.cache is None:
            return k, v
        P = self.prompt_length if self.first else 0
        if self.first:
            self.cache.set_state(layer, (k[:, :, :P], v[:, :, :P]))
        pk, pv = self.cache.state(layer)
        tk, tv = self.cache.update(layer, k[:, :, P:], v[:, :, P:], self.slots, self.kv_length)
        if tk.dtype != k.dtype:
            tk, tv = tk.to(k.dtype), tv.to(k.dtype)
        return torch.cat([pk, tk], 2), torch.cat([pv, tv], 2)


class CpmAntAttention(Attention):
    """project_q, project_k, project_v, attention_out (no biases): softmax(q k^T / sqrt(dim_head) + bias) v under
    the padding mask, a padding query's probabilities zero (transformers')."""

    def __init__(self, config, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        width = self.num_heads * self.head_dim
        self.project_q = Linear(hidden, width, bias=False)
        self.project_k = Linear(hidden, width, bias=False)
        self.project_v = Linear(hidden, width, bias=False)
        self.attention_out = Linear(width, hidden, bias=False)

    # Attention.project's names for them
    q_proj = property(lambda self: self.project_q)
    k_proj = property(lambda self: self.project_k)
    v_proj = property(lambda self: self.project_v)
    o_proj = property(lambda self: self.attention_out)

    def forward(self, x: torch.Tensor, ctx: CpmAntContext) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in self.project(x))
        k, v = ctx.keys_values(self.layer_idx, k, v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd) + ctx.bias
        scores = scores.masked_fill(~ctx.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).masked_fill(~ctx.mask, 0.0)
        if ctx.attentions is not None:
            ctx.attentions.append(probs)
        probs = F.dropout(probs, ctx.dropout, self.training)
        y = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)
        return self.attention_out(y)


class CpmAntSelfAttentionBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layernorm_before_attention = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attention = CpmAntAttention(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx: CpmAntContext) -> torch.Tensor:
        y = self.self_attention(self.layernorm_before_attention(x), ctx)
        return x + F.dropout(y, ctx.dropout, self.training)


class CpmAntDenseGatedACT(nn.Module):
    """gelu(w_0(x)) * w_1(x)."""

    def __init__(self, config):
        super().__init__()
        self.w_0 = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w_1 = Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.w_0(x)) * self.w_1(x)


class CpmAntFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w_in = CpmAntDenseGatedACT(config)
        self.w_out = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.p = config.dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.dropout(self.w_in(x), self.p, self.training))


class CpmAntFFNBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layernorm_before_ffn = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = CpmAntFeedForward(config)

    def forward(self, x: torch.Tensor, ctx: CpmAntContext) -> torch.Tensor:
        return x + F.dropout(self.ffn(self.layernorm_before_ffn(x)), ctx.dropout, self.training)


class CpmAntTransformerBlock(nn.Module):
    """x + attention(norm(x)), then that + ffn(norm(that))."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_att = CpmAntSelfAttentionBlock(config, layer_idx)
        self.ffn = CpmAntFFNBlock(config)

    def forward(self, x: torch.Tensor, ctx: CpmAntContext) -> torch.Tensor:
        return self.ffn(self.self_att(x, ctx), ctx)


class CpmAntEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            CpmAntTransformerBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.output_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
