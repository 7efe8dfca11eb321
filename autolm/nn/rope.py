"""Rotary position embeddings: inverse frequencies for each RoPE type with transformers' formulas, the tables
for a batch of positions, and the rotation itself (full or partial; rotate-half or interleaved pairs)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import kernels


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_and_scale(
    rope: dict[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
    partial_default: bool = False,
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq (rotary_dim/2,), attention scaling) for this RoPE config at this sequence length.

    rotary_dim is head_dim * partial_rotary_factor: only that many leading dimensions of a head rotate. As in
    transformers, the scaled types always apply the factor and the default type only in the families that
    say so (`partial_default`; Llama's default RoPE ignores it, Phi-3's applies it)."""
    kind = rope.get("rope_type", "default")
    base = float(rope["rope_theta"])
    dim = head_dim
    if kind != "default" or partial_default:
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    factor = rope.get("factor")
    if kind == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if kind == "dynamic":
        # NTK-aware scaling: the base grows once the sequence passes max_position_embeddings.
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(base, dim, rope), 1.0
    if kind == "yarn":
        return _yarn(base, dim, rope, max_position_embeddings)
    if kind == "longrope":
        return _longrope(base, dim, rope, max_position_embeddings, seq_len)
    raise ValueError(f"unknown RoPE type {kind!r}")  # config validation rejects this earlier


def _longrope(
    base: float, dim: int, rope: dict[str, Any], max_pos: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-dimension factors, the long set once the sequence passes the original length."""
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_pos / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope["long_factor"] if seq_len and seq_len > original else rope["short_factor"]
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32) * base**shape), float(attention_factor)


def _llama3(base: float, dim: int, rope: dict[str, Any]) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, rope: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency per dimension
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def proportional_inv_freq(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Gemma 4's proportional RoPE (transformers'): head_dim / 2 frequencies, the first partial_rotary_factor share of them
    rope_theta ** (-2i / head_dim), the rest zero, all divided by factor."""
    angles = int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
    base = float(rope["rope_theta"])
    rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles)))
    return inv_freq / rope.get("factor", 1.0)


def cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for these positions: (B, T) -> two (B, T, head_dim) tensors, computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate x (..., hd) by tables (..., rotary_dim) broadcasting against it, rotate-half convention; with
    partial rotary (rotary_dim < hd) the last hd - rotary_dim dimensions pass through. `interleaved`: the pairs
    (x0, x1), (x2, x3), ... rotate instead (see rotate_interleaved)."""
    if interleaved:
        return rotate_interleaved(x, cos, sin)
    fused = kernels.rotary(x, cos, sin)
    if fused is not None:
        return fused
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)
    half = rd // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over adjacent pairs: (x[2i], x[2i+1]) rotates by frequency i (GPT-J's and Cohere's convention, whose
    tables transformers repeat_interleaves; the first half of the rotate-half tables holds each frequency once).
    Computed in fp32 and cast back, as transformers' Cohere does; dimensions past rotary_dim pass through."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    c, s = cos[..., :half].float(), sin[..., :half].float()  # (..., rd/2)
    pairs = x[..., :rd].float().unflatten(-1, (half, 2))  # (..., rd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(x.dtype)
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


class Rotary:
    """The cos/sin tables of a model's RoPE kinds (a dict of rope parameter dicts by kind, e.g. {"default": ...}
    or Gemma 3's {"sliding_attention": ..., "full_attention": ...}). Not a module: it holds no weights, only
    inverse frequencies computed once (per sequence length for dynamic RoPE and LongRoPE) on first use."""

    def __init__(
        self,
        kinds: dict[str, dict[str, Any]],
        head_dim: int,
        max_position_embeddings: int,
        partial_default: bool = False,
    ):
        self.kinds, self.head_dim, self.max_pos = kinds, head_dim, max_position_embeddings
        self.partial_default = partial_default
        self._freqs: dict[str, tuple[torch.Tensor, float, int]] = {}  # kind -> (inv_freq, scale, seq_len key)

    def _seq_key(self, rope: dict[str, Any], position_ids: torch.Tensor) -> int:
        kind = rope.get("rope_type")
        if kind == "dynamic":
            return max(int(position_ids.max()) + 1, self.max_pos)
        if kind == "longrope":  # two sets of factors: at or below the original length, and above it
            original = rope["original_max_position_embeddings"]
            return original + 1 if int(position_ids.max()) + 1 > original else 0
        return 0

    def switch_length(self) -> int | None:
        """The sequence length from which the tables of every position change (LongRoPE's long factors, past
        original_max_position_embeddings): keys cached before it are stale once a sequence reaches it. None
        where tables never change with the length (or only grow with it, as dynamic RoPE's)."""
        lengths = [
            rope["original_max_position_embeddings"] + 1
            for rope in self.kinds.values()
            if rope.get("rope_type") == "longrope"
        ]
        return min(lengths, default=None)

    def slot_tables(
        self, position_ids: torch.Tensor, cache_position: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The tables for new tokens at positions (B, T) in cache slots (T,), as the forward and the one-token step
        ask: tables(position_ids) here; a family whose tables count slots (Llama 4's temperature) overrides it."""
        return self.tables(position_ids, dtype)

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{kind: (cos, sin)} for these positions (B, T), each (B, 1, T, rotary_dim) in `dtype`."""
        out = {}
        for kind, rope in self.kinds.items():
            key = self._seq_key(rope, position_ids)
            cached = self._freqs.get(kind)
            if cached is None or cached[2] != key or cached[0].device != position_ids.device:
                inv_freq, scale = inv_freq_and_scale(
                    rope, self.head_dim, self.max_pos, key or None, self.partial_default
                )
                cached = self._freqs[kind] = (inv_freq.to(position_ids.device), scale, key)
            cos, sin = cos_sin(position_ids, cached[0], cached[1], dtype)
            out[kind] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return out
