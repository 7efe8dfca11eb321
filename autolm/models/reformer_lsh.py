"""Reformer's LSH attention past lsh_attn_chunk_length, as transformers' LSHSelfAttention computes it in a forward
from the start (see models/reformer.py): hash the shared query/keys into buckets by random rotations, sort by bucket
(stably, by position within one), attend within chunks of the sorted order and the chunks before, sort back, and
sum the hashing rounds weighted by their log-normalisers."""

from __future__ import annotations

import math

import torch

from .reformer_config import ReformerConfig


def lsh_buckets(num_buckets: int | list[int] | None, T: int, config: ReformerConfig) -> int | list[int]:
    """config.num_buckets, or (null) transformers' choice for a forward of T positions: the power of 2 nearest
    below 2 * T / chunk, split in two factors where past 2 * max(sqrt(max_position_embeddings / chunk), chunk)."""
    if num_buckets is not None:
        return num_buckets
    chunk = config.lsh_attn_chunk_length
    power = (2 * (T // chunk)).bit_length() - 1
    limit = 2 * max(int((config.max_position_embeddings // chunk) ** 0.5), chunk)
    return [2 ** (power // 2), 2 ** (power - power // 2)] if 2**power > limit else 2**power


def hash_vectors(qk: torch.Tensor, buckets_spec, hashes: int, seed: int | None, mask: torch.Tensor | None):
    """(B, nh, hashes * T) bucket ids (each round's offset by its count), padding in a bucket of its own."""
    factors = [buckets_spec] if isinstance(buckets_spec, int) else list(buckets_spec)
    rotation, count = sum(factors), math.prod(factors)
    if seed is not None:
        torch.manual_seed(seed)  # transformers reseeds the global generator, as here
    nh, d = qk.shape[1], qk.shape[3]
    rotations = torch.randn((nh, d, hashes, rotation // 2), device=qk.device, dtype=qk.dtype)
    rotated = torch.einsum("bmtd,mdhr->bmhtr", qk.detach(), rotations)
    buckets, start, product = None, 0, 1
    for f in factors:
        part = rotated if len(factors) == 1 else rotated[..., start : start + f // 2]
        ids = torch.cat([part, -part], -1).argmax(-1)
        buckets = ids if buckets is None else buckets + product * ids
        start, product = start + f // 2, product * f
    if mask is not None and int(mask.sum()) < mask.numel():
        count += 1
        buckets = torch.where(mask.bool()[:, None, None, :], buckets, count - 1)
    offsets = (torch.arange(hashes, device=qk.device) * count).view(1, 1, -1, 1)
    return (buckets + offsets).flatten(2, 3)


def adjacent(t: torch.Tensor, before: int) -> torch.Tensor:
    """Each chunk (dim 2) with the `before` chunks ahead of it in a circle, concatenated along dim 3."""
    return torch.cat([torch.cat([t[:, :, i:], t[:, :, :i]], 2) if i else t for i in range(-before, 1)], 3)


def lsh_attention(
    qk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, config: ReformerConfig
) -> torch.Tensor:
    """qk, v (B, nh, T, d) of a forward from slot 0 (T a multiple of lsh_attn_chunk_length), mask (B, T) or None
    -> (B, nh, T, d)."""
    B, nh, T, d = qk.shape
    chunk, before, hashes = config.lsh_attn_chunk_length, config.lsh_num_chunks_before, config.num_hashes
    buckets = hash_vectors(qk, lsh_buckets(config.num_buckets, T, config), hashes, config.hash_seed, mask)
    L = buckets.shape[-1]
    order = torch.argsort(L * buckets + torch.arange(L, device=qk.device) % L, dim=-1)  # stable by position
    undo = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=qk.device).expand_as(order))
    at = order % T  # (B, nh, L): each sorted entry's position
    take = at[..., None].expand(-1, -1, -1, d)
    q = qk.repeat(1, 1, hashes, 1).gather(2, take).view(B, nh, -1, chunk, d)
    values = v.repeat(1, 1, hashes, 1).gather(2, take).view(B, nh, -1, chunk, d)
    keys = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(d)
    keys, values = adjacent(keys, before), adjacent(values, before)
    q_at = at.view(B, nh, -1, chunk)
    k_at = adjacent(q_at, before)
    scores = q @ keys.transpose(-1, -2)
    seen = q_at[..., None] >= k_at[..., None, :]
    if mask is not None:
        real = mask.bool()[:, None, None, :].expand(B, nh, q_at.shape[2], T).gather(-1, k_at)
        seen = seen & real[..., None, :]
    masked, itself = (-1e4, -1e3) if qk.dtype == torch.float16 else (-1e9, -1e5)
    scores = torch.where(seen, scores, torch.tensor(masked, dtype=qk.dtype, device=qk.device))
    scores = torch.where(q_at[..., None] != k_at[..., None, :], scores, torch.tensor(itself, dtype=qk.dtype,
                                                                                     device=qk.device))  # fmt: skip
    logits = torch.logsumexp(scores, -1, keepdim=True)
    out = (torch.exp(scores - logits) @ values).flatten(2, 3)
    out = out.gather(2, undo[..., None].expand(-1, -1, -1, d))
    logits = logits.flatten(2, 3).squeeze(-1).gather(2, undo)
    if hashes > 1:
        out, logits = out.view(B, nh, hashes, T, d), logits.view(B, nh, hashes, T, 1)
        out = (out * torch.exp(logits - torch.logsumexp(logits, dim=2, keepdim=True))).sum(2)
    return out
