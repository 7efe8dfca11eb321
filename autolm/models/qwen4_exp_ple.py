"""Qwen4-Exp's residual streams and per-layer embeddings (autolm.models.qwen4_exp's pieces, transformers' names).

- `GatedResidual` (transformers' Qwen4ExpTextGatedResidual): the model carries `hc_count` residual streams side by
  side (B, T, hc_count * h). Before a block they are normed per stream (a zero-centred RMSNorm over each stream's
  h features), mixed into the block's input by per-feature sigmoid weights from a low-rank MLP (SiLU between, the
  down projection divided by hc_count), averaged over the streams; the block's output is added to every stream
  times 2 * sigmoid(block_inject_weight(normed) / hc_count). The model's last mixer (no block) replaces the final
  norm.
- `PLELayer` (Per-Layer Embedding, on the `ple_layer_ids` layers, one-indexed): hashed n-gram embeddings of the
  tokens (`NGramEmbedding`: for n = 2 .. ngram_size, `heads_per_ngram` heads each hashing the last n tokens, xor
  of token * multiplier, into a prime-sized table; an EOS token starts a new segment, the tokens before it unseen),
  a value (value_proj) gated per stream by sigmoid of the signed square root of key . query / sqrt(h), plus a
  dilated (ngram_size) causal depthwise conv of the normed gated values, SiLU; added to the streams before the
  layer. Padding reads as EOS and its values are zeroed. Its state in the cache: the last ngram_size - 1 token ids
  and the conv's last (kernel - 1) * dilation inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..nn import Linear, RMSNorm, embedding

_MASK64 = (1 << 64) - 1
_GAMMA, _M1, _M2, _PRIME_1 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 10007


class GroupRMSNorm(RMSNorm):
    """A zero-centred RMSNorm (times 1 + w in fp32) over each group of `group` features (each residual stream)."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__(dim, eps, offset=1.0)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = kernels.rms_norm(x.unflatten(-1, (-1, self.group)), self.eps).flatten(-2)
        return (normed * (self.weight.float() + 1.0)).to(x.dtype)


class GatedResidual(nn.Module):
    """The streams around one block, or (combine=False) the model's last mix of them; see the module docstring."""

    def __init__(self, config: Any, combine: bool = True):
        super().__init__()
        self.hc_count, self.hidden_size = config.hc_count, config.hidden_size
        width = self.hc_count * self.hidden_size
        self.hc_norm = GroupRMSNorm(width, self.hidden_size, config.rms_norm_eps)
        self.input_mix_weight_down = Linear(width, config.hc_lowrank, bias=False)
        self.input_mix_weight_up = Linear(config.hc_lowrank, width, bias=False)
        self.block_inject_weight = Linear(width, self.hc_count, bias=False) if combine else None

    def forward(
        self, x: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, T, hc_count * h) -> the streams plus block's output (B, T, hc_count * h), or without a block the
        mixed input (B, T, h)."""
        n, h = self.hc_count, self.hidden_size
        normed = self.hc_norm(x)
        w = torch.sigmoid(self.input_mix_weight_up(F.silu(self.input_mix_weight_down(normed) / n)))
        mixed = (w.unflatten(-1, (n, h)) * normed.unflatten(-1, (n, h))).mean(dim=-2)
        if block is None:
            return mixed
        inject = 2 * torch.sigmoid(self.block_inject_weight(normed) / n)
        return x + (block(mixed).unsqueeze(-2) * inject.unsqueeze(-1)).flatten(-2)


def _splitmix64(value: int) -> int:
    value = (value + _GAMMA) & _MASK64
    value = ((value ^ (value >> 30)) * _M1) & _MASK64
    value = ((value ^ (value >> 27)) * _M2) & _MASK64
    return (value ^ (value >> 31)) & _MASK64


def layer_multipliers(vocab_size: int, ngram_size: int, ple_index: int, seed: int) -> list[int]:
    """The odd hash multiplier of each of the n-gram's tokens (transformers' _build_layer_multipliers)."""
    half_bound = max(1, ((1 << 63) - 1) // max(vocab_size, 1) // 2)
    base = seed + _PRIME_1 * ple_index
    return [
        2 * (_splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % half_bound) + 1 for i in range(ngram_size)
    ]


@functools.lru_cache(maxsize=8)
def primes_after(start: int, count: int) -> tuple[int, ...]:
    """The first `count` primes above `start`."""
    out, p = [], start
    while len(out) < count:
        p += 1
        if p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1)):
            out.append(p)
    return tuple(out)


class NGramEmbedding(nn.Module):
    """Hashed n-gram embeddings of one PLE layer (see the module docstring): (B, T) ids -> (B, T, ple_embed_dim)."""

    def __init__(self, config: Any, dim: int, ple_index: int):
        super().__init__()
        self.ngram_size, self.heads_per_ngram = config.ngram_size, config.heads_per_ngram
        heads = (self.ngram_size - 1) * self.heads_per_ngram
        eos = config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        sizes = primes_after(config.ngram_vocab_size_base - 1, (ple_index + 1) * heads)[-heads:]
        offsets = [sum(sizes[:i]) for i in range(heads)]
        mults = layer_multipliers(config.vocab_size, self.ngram_size, ple_index, config.seed)
        self.register_buffer("layer_multipliers", torch.tensor(mults, dtype=torch.long))
        self.register_buffer("ngram_heads_vocab_sizes", torch.tensor(sizes, dtype=torch.long))
        self.register_buffer("ngram_heads_offsets", torch.tensor(offsets, dtype=torch.long))
        div = config.make_ngram_vocab_size_divisible_by
        self.ngram_embedding = embedding(-(-sum(sizes) // div) * div, dim // heads)

    def shifted(self, ids: torch.Tensor, shift: int) -> torch.Tensor:
        """ids moved `shift` tokens right within each EOS-ended segment, EOS where that leaves the segment."""
        if shift == 0:
            return ids
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        eos_at = torch.where(ids == self.eos_token_id, pos, -1).cummax(dim=1).values
        start = torch.cat([eos_at.new_full((B, 1), -1), eos_at[:, :-1]], dim=1) + 1
        source = pos - shift
        moved = ids.gather(1, source.clamp_min(0).unsqueeze(0).expand(B, -1))
        valid = (pos.unsqueeze(0) - start >= shift) & (source.unsqueeze(0) >= 0)
        return torch.where(valid, moved, ids.new_full((), self.eos_token_id))

    def forward(self, history: torch.Tensor, T: int) -> torch.Tensor:
        """history (B, ngram_size - 1 + T): the previous ids then the T new ones -> (B, T, dim)."""
        shifted = [self.shifted(history, s) for s in range(self.ngram_size)]
        m, blocks = self.layer_multipliers, []
        for n in range(2, self.ngram_size + 1):
            heads = slice((n - 2) * self.heads_per_ngram, (n - 1) * self.heads_per_ngram)
            mixed = shifted[0] * m[0]
            for i in range(1, n):
                mixed = torch.bitwise_xor(mixed, shifted[i] * m[i])
            ids = torch.remainder(mixed.unsqueeze(-1), self.ngram_heads_vocab_sizes[heads].view(1, 1, -1))
            blocks.append(ids + self.ngram_heads_offsets[heads].view(1, 1, -1))
        ids = torch.cat(blocks, dim=-1)[:, -T:]
        return self.ngram_embedding(ids.to(self.ngram_embedding.weight.device)).flatten(-2)


class PLELayer(nn.Module):
    """One layer's per-layer embedding (see the module docstring): streams (B, T, hc * h) and token ids (B, T) ->
    what is added to the streams."""

    def __init__(self, config: Any, layer_idx: int, ple_index: int):
        super().__init__()
        self.layer_idx, self.hidden_size, self.hc_count = layer_idx, config.hidden_size, config.hc_count
        dim, width, eps = config.ple_embed_dim, config.hidden_size * config.hc_count, config.rms_norm_eps
        self.ple_embedding = NGramEmbedding(config, dim, ple_index)
        self.key_proj = Linear(dim, width, bias=False)
        self.value_proj = Linear(dim, self.hidden_size, bias=False)
        self.norm_key, self.norm_query, self.norm_conv = (
            GroupRMSNorm(width, self.hidden_size, eps) for _ in range(3)
        )
        K, dilation = config.ple_conv_kernel_size, config.ngram_size
        self.state_len = (K - 1) * dilation
        self.conv1d = nn.Conv1d(width, width, K, groups=width, dilation=dilation, bias=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        emb = self.ple_embedding
        previous, conv_state = ctx.state(("ple", self.layer_idx)) or (None, None)
        real = ctx.real_tokens()
        if real is not None:  # padding reads as EOS (a segment boundary)
            ids = torch.where(real.bool(), ids, emb.eos_token_id)
        if previous is None:
            previous = ids.new_full((B, emb.ngram_size - 1), emb.eos_token_id)
        history = torch.cat([previous, ids.long()], dim=1)
        e = emb(history, T).to(x.dtype)
        n, h = self.hc_count, self.hidden_size
        key = self.norm_key(self.key_proj(e)).unflatten(-1, (n, h))
        query = self.norm_query(x).unflatten(-1, (n, h))
        gate = (key * query).sum(dim=-1, keepdim=True) / math.sqrt(h)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gated = torch.sigmoid(gate) * self.value_proj(e).unsqueeze(-2)
        normed, gated = self.norm_conv(gated.flatten(-2)), gated.flatten(-2)
        if real is not None:
            gated, normed = ((t * real[:, :, None]).to(t.dtype) for t in (gated, normed))
        if conv_state is None:
            conv_state = normed.new_zeros(B, normed.shape[-1], self.state_len)
        inputs = torch.cat([conv_state, normed.transpose(1, 2)], dim=-1)
        ctx.keep_state(
            ("ple", self.layer_idx), (history[:, -(emb.ngram_size - 1) :], inputs[..., -self.state_len :])
        )
        return gated + F.silu(self.conv1d(inputs)).transpose(1, 2)
