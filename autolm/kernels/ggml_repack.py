"""GGUF blocks repacked while loading, exactly: the 5- to 8-bit types (ggml.PLANAR) into planes, the integer
quants as int8 (N, K) and a float32 scale (and low value) per group of columns (`planar`); Q4_0, Q4_1 and Q4_K
into the int4 layers' nibbles with a scale and low value per group of 32 (`int4_parts`). The quants are
assembled as 16- or 64-bit words, each of their bytes a quant or two: masks and shifts that keep every byte's
bits in their byte, over whole runs of a block's bytes (2-3.5x faster than unpacking one quant at a time with
the dequantizing functions of ggml.py, which the tests compare them with)."""

from __future__ import annotations

import functools

import torch

from .ggml import BLOCKS, LOW, PLANAR, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, Q8_0, half_at, parts, scale_min_k4

# The types that are int4 in groups of 32 (kernels.quant's int4 layers) -> (byte offset of the quants in a block,
# runs of quants per block): each run of m bytes holds 2m quants, the first m in the low nibbles, the rest high.
INT4 = {Q4_0: (2, 1), Q4_1: (4, 1), Q4_K: (16, 4)}


def int4_parts(raw: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An INT4 type's rows, raw bytes (rows, bytes per row) -> (nibbles uint8 (rows, columns / 2): the quants
    0..15 two to a byte in column order, column 2i in the low nibble of byte i as kernels.quant.pack_nibbles;
    scale float32 (rows, groups of 32); low float32 (rows, groups) or None): value = scale * q + low, and for
    Q4_0 scale * (q - 8). The quants are read as 16-bit words (two bytes, so two quants of each half of a run at
    once): 0.3 ns per weight, against 0.7 for unpacking them one by one and packing them again."""
    at, runs = INT4[kind]
    size = BLOCKS[kind][1]
    n, b = raw.shape[0], raw.unflatten(-1, (-1, size))
    words = raw.view(torch.int16).view(n, b.shape[1], size // 2)[..., at // 2 :]  # the quants run to the end
    words = words.unflatten(-1, (runs, -1))  # (rows, blocks, runs, m / 2)
    half = words.shape[-1]
    out = torch.empty(*words.shape[:-1], 2 * half, dtype=torch.uint8, device=raw.device)
    high = words >> 4
    out[..., :half] = (words & 15) | (high & 0xF0)  # the low nibbles' quants 2i and 2i + 1
    out[..., half:] = (high & 15) | ((high >> 4) & 0xF0)  # the high nibbles'
    if kind == Q4_K:
        sc, mn = scale_min_k4(b[..., 4:16])
        scale, low = half_at(b, 0) * sc, -(half_at(b, 2) * mn)
    else:
        scale, low = half_at(b, 0), None if kind == Q4_0 else half_at(b, 2)
    return out.view(n, -1), scale.flatten(1), None if low is None else low.flatten(1)


def planar(raw: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A PLANAR type's rows, raw bytes (rows, bytes per row) -> (q int8 (rows, columns), scale float32 (rows,
    groups), low float32 (rows, groups) or None): value = scale * q + low, PLANAR[kind] columns per group.
    Computed a few rows at a time (the unpacking's temporaries stay small)."""
    n, width = raw.shape
    columns = width // BLOCKS[kind][1] * BLOCKS[kind][0]
    groups = columns // PLANAR[kind]
    q = torch.empty(n, columns, dtype=torch.int8, device=raw.device)
    scale = torch.empty(n, groups, dtype=torch.float32, device=raw.device)
    low = torch.empty_like(scale) if kind in LOW else None
    if kind == Q8_0:  # the quants are bytes 2..33 of each block as they are: one strided copy
        b = raw.unflatten(-1, (groups, BLOCKS[Q8_0][1]))
        q.view(n, groups, -1).copy_(b[..., 2:].view(torch.int8))
        scale.copy_(b[..., :2].contiguous().view(torch.float16).squeeze(-1))
        return q, scale, low
    words = _WORDS.get(kind)
    step = max(1, (1 << (20 if words else 18)) // columns)
    for i in range(0, n, step):
        rows = slice(i, i + step)
        if words is not None:
            si, li = words(raw[rows], kind, q[rows])
        else:
            qi, si, li = parts(raw[rows], kind)  # (rows, G', g'), each scale repeated G' / groups times
            q[rows] = qi.reshape(qi.shape[0], columns)
            every = si.shape[-1] // groups
            si, li = si[:, ::every], None if li is None else li[:, ::every]
        scale[rows] = si
        if low is not None:
            low[rows] = li
    return q, scale, low


# Q5 and Q6_K quants assembled into planes as 64-bit words, each byte a quant: masks and shifts that keep every
# byte's bits in their byte, over whole runs of a block's bytes (2.3-3.5x faster than one quant at a time).
_NIBBLES = 0x0F0F0F0F0F0F0F0F


@functools.cache
def _fifth_bits(device: torch.device) -> torch.Tensor:
    """Byte x -> the 64-bit word whose byte j is 16 where bit j of x is set (eight of Q5's fifth bits)."""
    bits = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8) << 4
    return bits.view(torch.int64).view(256).to(device)


def _q5_words(raw: torch.Tensor, kind: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Q5_0 / Q5_1 rows -> their quants into q (rows, columns); returns (scale, low). A block's 16 bytes of
    nibbles are two words (low nibbles: quants 0-15; high: 16-31); each byte of its 32-bit mask, looked up,
    gives eight quants' fifth bits."""
    at, size = (2 if kind == Q5_0 else 4), BLOCKS[kind][1]
    b = raw.unflatten(-1, (-1, size))
    nibbles = b[..., at + 4 : at + 20].contiguous().view(torch.int64)  # (rows, blocks, 2)
    out = q.view(torch.int64).view(*nibbles.shape[:-1], 4)
    out[..., :2] = nibbles & _NIBBLES
    out[..., 2:] = (nibbles >> 4) & _NIBBLES
    out |= _fifth_bits(raw.device)[b[..., at : at + 4].long()]
    if kind == Q5_0:
        q -= 16
    return half_at(b, 0).flatten(1), None if kind == Q5_0 else half_at(b, 2).flatten(1)


def _q6_k_words(raw: torch.Tensor, kind: int, q: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Q6_K rows -> their quants into q (rows, columns); returns (scale, None). Each half block is 64 bytes of
    low nibbles (two runs of 32 bytes, each holding two runs of 32 quants) and 32 bytes of 2-bit high parts
    (bits 0-1, 2-3, 4-5, 6-7 for the four runs of 32 quants)."""
    b = raw.unflatten(-1, (-1, BLOCKS[Q6_K][1]))
    # (rows, blocks, half, run, 4 words) and (rows, blocks, half, 4 words)
    low4 = b[..., :128].contiguous().view(torch.int64).unflatten(-1, (2, 2, 4))
    high2 = b[..., 128:192].contiguous().view(torch.int64).unflatten(-1, (2, 4))
    out = q.view(torch.int64).view(*high2.shape[:-1], 4, 4)  # (rows, blocks, half, run of 32 quants, 4)
    first, second = low4[..., 0, :], low4[..., 1, :]
    out[..., 0, :] = (first & _NIBBLES) | ((high2 & 0x0303030303030303) << 4)
    out[..., 1, :] = (second & _NIBBLES) | ((high2 & 0x0C0C0C0C0C0C0C0C) << 2)
    out[..., 2, :] = ((first >> 4) & _NIBBLES) | (high2 & 0x3030303030303030)
    out[..., 3, :] = ((second >> 4) & _NIBBLES) | ((high2 >> 2) & 0x3030303030303030)
    q -= 32
    return (half_at(b, 208) * b[..., 192:208].view(torch.int8).float()).flatten(1), None


_WORDS = {Q5_0: _q5_words, Q5_1: _q5_words, Q6_K: _q6_k_words}
