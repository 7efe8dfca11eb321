"""llama.cpp's (ggml's) weight blocks: dequantizing functions written in plain torch ops, the matmul that computes
on the blocks as they are, and the one on their exact repacking into planes (`planar`).

Each quantized type is a sequence of fixed-size blocks per row (ggml/src/ggml-common.h): fp16 scales packed with
2..8-bit quants. `dequantize(raw, kind)` takes a weight's rows as raw bytes, uint8 (rows, bytes per row), and
returns float32 (rows, columns), with the arithmetic of ggml's `dequantize_row_*` (and gguf.quants, which the
tests compare against). Written with shifts, masks and broadcasts only, the same expression serves eagerly and
inside a compiled graph, where inductor fuses it into the matrix-vector loop: the weight is read once, as
blocks, and never written out in float.

Types of 5 to 8 bits (PLANAR) are repacked while loading into planes: the integer quants as int8 (N, K) and a
float32 scale (and low value) per group of columns, the same values as the blocks (scale * q + low, each scale
computed as ggml computes it). Inductor streams those planes with vector loads, 2-4x faster than assembling
the quants from the packed blocks, for 6% (Q8_0) to 64% (Q5_0) more bytes than the file holds.
"""

from __future__ import annotations

import functools

import torch

from .core import batched_graph, linear, matvec, realize

# ggml type -> (weights per block, bytes per block), for the types autolm computes on.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = 10, 11, 12, 13, 14, 20, 23, 30
BLOCKS = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
    IQ4_NL: (32, 18),
    IQ4_XS: (256, 136),
}
NAMES = {  # gguf.GGMLQuantizationType's names for these types (the gguf package takes a twentieth of a second to import)
    F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0",
    Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS",
}  # fmt: skip
FLOAT = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# Types repacked into planes while loading -> weights per scale (group).
PLANAR = {Q5_0: 32, Q5_1: 32, Q5_K: 32, Q6_K: 16, Q8_0: 32}
LOW = {Q4_1, Q5_1, Q2_K, Q4_K, Q5_K}  # types whose groups also have a low value (value = scale * q + low)
_TILE_BYTES = 1 << 21  # float32 bytes of one dequantized tile in the eager matmul (in the L2 / L3 cache)


def _i32(b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return b[..., lo:hi].to(torch.int32)


def _i8(x: torch.Tensor) -> torch.Tensor:
    """uint8 values below 128 as int8 (the same bytes), so that subtracting gives signed quants."""
    return x.view(torch.int8)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian fp16 at byte `at` of each block, as float32 (..., 1): a view of the two bytes (blocks,
    rows and the file's tensor data all start at even offsets), 4 us against 18 for assembling the bits."""
    return b[..., at : at + 2].view(torch.float16).float()


def _bits(x: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """x (..., n) -> (..., count, n) of x's dtype: the `width`-bit fields at shifts 0, width, 2 width, ... Bytes
    (uint8) stay bytes: unpacking reads and writes a quarter of what int32 temporaries take."""
    mask = (1 << width) - 1
    return torch.stack([x & mask, *((x >> s) & mask for s in range(width, width * count, width))], -2)


def _u32(b: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian uint32 at byte `at` of each block (as int32 bits) (..., 1)."""
    out = _i32(b, at, at + 1)
    for i in range(1, 4):
        out = out | (_i32(b, at + i, at + i + 1) << (8 * i))
    return out


def _nibbles(b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bytes lo..hi of each block as 4-bit values, uint8 (..., 2, hi - lo), the low nibbles first."""
    return _bits(b[..., lo:hi], 4, 2)


# Each type's blocks (..., blocks, bytes) -> (q, scale, low): q (..., groups, group) the integer quants (or the
# code book's values), scale and low (..., groups or fewer: each then serves several groups) float32, low None
# where zero; value = scale * q + low. The groups are laid out so that the elements of one group are always
# consecutive bytes (or bits of consecutive bytes): inside a compiled graph their loop is then one vector loop.


def _q4(b, kind):  # 32 weights: the low nibbles of 16 bytes, then their high nibbles
    if kind == Q4_0:
        return _i8(_nibbles(b, 2, 18)) - 8, _half(b, 0), None
    return _nibbles(b, 4, 20), _half(b, 0), _half(b, 2)


def _q5(b, kind):  # Q4's nibbles plus a fifth bit from a 32-bit mask
    at = 2 if kind == Q5_0 else 4
    shifts = torch.arange(32, dtype=torch.int32, device=b.device).view(2, 16)
    q = _nibbles(b, at + 4, at + 20) | (((_u32(b, at).unsqueeze(-1) >> shifts) & 1) << 4).to(torch.uint8)
    return (_i8(q) - 16, _half(b, 0), None) if kind == Q5_0 else (q, _half(b, 0), _half(b, 2))


def _q8_0(b, kind):
    return b[..., 2:34].view(torch.int8).unsqueeze(-2), _half(b, 0), None


def _two_bits(b: torch.Tensor, lo: int) -> torch.Tensor:
    """Q2_K / Q3_K: 64 bytes of 2-bit quants -> (..., 16, 16) in the order of their 16 scales."""
    q = _bits(b[..., lo : lo + 64].unflatten(-1, (2, 2, 16)), 2, 4)  # (..., half, 16 bytes, shift, 16)
    return q.transpose(-3, -2).flatten(-4, -2)


def _q2_k(b, kind):
    sc = b[..., 0:16]
    return _two_bits(b, 16), _half(b, 80) * (sc & 15), -(_half(b, 82) * (sc >> 4))


def _q3_k(b, kind):
    low = _bits(b[..., 96:104], 4, 2).flatten(-2)  # 16 x 4 low bits of the 6-bit scales
    high = _bits(b[..., 104:108], 2, 4).flatten(-2)
    qh = _bits(b[..., 0:32].unflatten(-1, (2, 16)), 1, 8).transpose(-3, -2).flatten(-3, -2)
    q = _i8(_two_bits(b, 32)) - _i8((qh ^ 1) << 2)  # a set bit means no offset
    return q, _half(b, 108) * (_i8(low | (high << 4)) - 32), None


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes (..., 12) uint8 -> eight 6-bit scales and eight 6-bit mins (..., 8)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc, mn


def _q45_k(b, kind):
    sc, mn = _scale_min_k4(b[..., 4:16])
    at = 16 if kind == Q4_K else 48
    q = _bits(b[..., at : at + 128].unflatten(-1, (4, 32)), 4, 2).flatten(-3, -2)  # (..., 8, 32)
    if kind == Q5_K:
        q = q | (_bits(b[..., 16:48], 1, 8) << 4)
    return q, _half(b, 0) * sc, -(_half(b, 2) * mn)


def _q6_k(b, kind):
    ql = _bits(b[..., 0:128].unflatten(-1, (2, 2, 2, 16)), 4, 2)  # (..., half, 32 bytes, 16, nibble, 16)
    ql = ql.movedim(-2, -4).flatten(-5, -2)  # (..., 16 groups, 16)
    qh = _bits(b[..., 128:192].unflatten(-1, (2, 2, 16)), 2, 4).transpose(-3, -2).flatten(-4, -2)
    return _i8(ql | (qh << 4)) - 32, _half(b, 208) * b[..., 192:208].view(torch.int8).float(), None


def _iq4(b, kind):
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    if kind == IQ4_NL:  # code book indices as int32 (uint8 index tensors would be masks)
        return table[_nibbles(b, 2, 18).int()], _half(b, 0), None
    low = _bits(_i32(b, 4, 8), 4, 2).transpose(-1, -2).flatten(-2)  # (..., 8)
    high = _bits(_i32(b, 2, 3) | (_i32(b, 3, 4) << 8), 2, 8).flatten(-2)
    q = _bits(b[..., 8:136].unflatten(-1, (8, 16)), 4, 2).flatten(-3, -2)  # (..., 16, 16)
    return table[q.int()], _half(b, 0) * ((low | (high << 4)) - 32), None


_PARTS = {
    Q4_0: _q4,
    Q4_1: _q4,
    Q5_0: _q5,
    Q5_1: _q5,
    Q8_0: _q8_0,
    Q2_K: _q2_k,
    Q3_K: _q3_k,
    Q4_K: _q45_k,
    Q5_K: _q45_k,
    Q6_K: _q6_k,
    IQ4_NL: _iq4,
    IQ4_XS: _iq4,
}


def parts(raw: torch.Tensor, kind: int):
    """A quantized weight's rows, raw bytes (rows, bytes per row) -> (q (rows, groups, group), scale (rows,
    groups), low (rows, groups) or None): value = scale * q + low, groups of 16 or 32 along each row."""
    q, scale, low = _PARTS[kind](raw.unflatten(-1, (-1, BLOCKS[kind][1])), kind)
    flat, groups = (*raw.shape[:-1], -1), q.shape[-2]

    def per_group(t: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., groups): each value for groups / n
        return t.unsqueeze(-1).expand(*t.shape, groups // t.shape[-1]).reshape(flat)

    return q.reshape(*flat, q.shape[-1]), per_group(scale), None if low is None else per_group(low)


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
    words = raw.view(torch.int16).view(n, b.shape[1], size // 2)[..., at // 2 : (size // 2)]
    words = words.unflatten(-1, (runs, -1))  # (rows, blocks, runs, m / 2)
    half = words.shape[-1]
    out = torch.empty(*words.shape[:-1], 2 * half, dtype=torch.uint8, device=raw.device)
    high = words >> 4
    out[..., :half] = (words & 15) | (high & 0xF0)  # the low nibbles' quants 2i and 2i + 1
    out[..., half:] = (high & 15) | ((high >> 4) & 0xF0)  # the high nibbles'
    if kind == Q4_K:
        sc, mn = _scale_min_k4(b[..., 4:16])
        scale, low = _half(b, 0) * sc, -(_half(b, 2) * mn)
    else:
        scale, low = _half(b, 0), None if kind == Q4_0 else _half(b, 2)
    return out.view(n, -1), scale.flatten(1), None if low is None else low.flatten(1)


def dequantize(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """A weight's rows in ggml type `kind`, raw bytes uint8 (rows, bytes per row) -> float32 (rows, columns)."""
    if kind in FLOAT:
        return raw.view(FLOAT[kind]).float()
    q, scale, low = parts(raw, kind)
    w = scale.unsqueeze(-1) * q
    return (w if low is None else w + low.unsqueeze(-1)).flatten(-2)


def ggml_linear(x: torch.Tensor, raw: torch.Tensor, kind: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for a weight W kept in its ggml blocks (see dequantize). Inside a compiler: one
    matrix-vector loop over the blocks (or a matmul of the dequantized weight for longer inputs); eagerly: the
    weight dequantized a tile of rows at a time, each tile multiplied by oneDNN's fp32 matmul."""
    if torch.compiler.is_compiling():
        x = realize(x)
        if not batched_graph() and x.shape[:-1].numel() <= 4:
            return _matvec(x, raw, kind, bias)
        return linear(x.float(), dequantize(raw, kind), None if bias is None else bias.float()).to(x.dtype)
    b = None if bias is None else bias.float()
    return _tiled(x, lambda i, j, out: dequantize(raw[i:j], kind), raw.shape[0], b)


def _matvec(x: torch.Tensor, raw: torch.Tensor, kind: int, bias: torch.Tensor | None) -> torch.Tensor:
    """A few rows of x times the blocks, as inductor streams them: per group a dot product of x with the integer
    quants, times the group's scale (plus the sum of x times its low value), summed over the groups."""
    if kind in FLOAT:
        return matvec(x.float(), raw.view(FLOAT[kind]), bias).to(x.dtype)
    q, scale, low = parts(raw, kind)  # (N, G, g), (N, G)
    xs = x.float().unflatten(-1, (-1, q.shape[-1])).unsqueeze(-3)  # (..., 1, G, g)
    y = ((xs * q).sum(-1) * scale).sum(-1)
    if low is not None:
        y = y + (xs.sum(-1) * low).sum(-1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


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
    return _half(b, 0).flatten(1), None if kind == Q5_0 else _half(b, 2).flatten(1)


def _q6_k_words(raw: torch.Tensor, kind: int, q: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Q6_K rows -> their quants into q (rows, columns); returns (scale, None). Each half block is 64 bytes of
    low nibbles (two runs of 32 bytes, each holding two runs of 32 quants) and 32 bytes of 2-bit high parts
    (bits 0-1, 2-3, 4-5, 6-7 for the four runs of 32 quants)."""
    b = raw.unflatten(-1, (-1, BLOCKS[Q6_K][1]))
    low4 = (
        b[..., :128].contiguous().view(torch.int64).unflatten(-1, (2, 2, 4))
    )  # (rows, blocks, half, run, 4)
    high2 = b[..., 128:192].contiguous().view(torch.int64).unflatten(-1, (2, 4))  # (rows, blocks, half, 4)
    out = q.view(torch.int64).view(*high2.shape[:-1], 4, 4)  # (rows, blocks, half, run of 32 quants, 4)
    first, second = low4[..., 0, :], low4[..., 1, :]
    out[..., 0, :] = (first & _NIBBLES) | ((high2 & 0x0303030303030303) << 4)
    out[..., 1, :] = (second & _NIBBLES) | ((high2 & 0x0C0C0C0C0C0C0C0C) << 2)
    out[..., 2, :] = ((first >> 4) & _NIBBLES) | (high2 & 0x3030303030303030)
    out[..., 3, :] = ((second >> 4) & _NIBBLES) | ((high2 >> 2) & 0x3030303030303030)
    q -= 32
    return (_half(b, 208) * b[..., 192:208].view(torch.int8).float()).flatten(1), None


_WORDS = {Q5_0: _q5_words, Q5_1: _q5_words, Q6_K: _q6_k_words}


def group_weight(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Planes (see planar) -> the float32 weight (rows, columns), in `out` if given. The quants are converted
    first, then scaled in place: 20% faster than one int8 * float32 multiply, whose mixed types take
    TensorIterator's casting loop (all of SmolLM2's planes: 122 -> 100 ms)."""
    w = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    w.copy_(q)
    groups = w.view(*q.shape[:-1], scale.shape[-1], -1).mul_(scale.unsqueeze(-1))
    if low is not None:
        groups.add_(low.unsqueeze(-1))
    return w


def group_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ W.T + bias for a weight in planes (see planar). Inside a compiler: one matrix-vector loop over the
    planes, the group's scale applied to each product (so the loop needs one sum per row, not one per group);
    else, and for longer inputs, the weight dequantized a tile of rows at a time for oneDNN's fp32 matmul."""
    b = None if bias is None else bias.float()
    if torch.compiler.is_compiling():
        x = realize(x)
        if not batched_graph() and x.shape[:-1].numel() <= 4:
            return _group_matvec(x, q, scale, low, b)
        return linear(x.float(), group_weight(q, scale, low), b).to(x.dtype)
    return _tiled(x, lambda i, j, out: group_weight(q[i:j], scale[i:j], None if low is None else low[i:j], out),
                  q.shape[0], b)  # fmt: skip


def _group_matvec(x, q, scale, low, bias):
    """A few rows of x times the planes as one loop: per weight x * q * its group's scale, summed over the row
    (plus, per group, the sum of x times the low value)."""
    xs = x.float().unflatten(-1, (scale.shape[-1], -1)).unsqueeze(-3)  # (..., 1, G, g)
    y = (xs * q.unflatten(-1, xs.shape[-2:]) * scale.unsqueeze(-1)).sum((-1, -2))
    if low is not None:
        y = y + (xs.sum(-1) * low).sum(-1)
    return (y if bias is None else y + bias).to(x.dtype)


def _tiled(x: torch.Tensor, weight_rows, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias with W's rows i..j given as float32 by weight_rows(i, j, out) (which may write them into
    `out`, a buffer reused from tile to tile that stays in the cache), a tile at a time."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    rows = min(n, max(1, _TILE_BYTES // (4 * x.shape[-1])))
    buf = torch.empty(rows, x.shape[-1], dtype=torch.float32, device=x.device)
    if rows == n:
        y = linear(x2, weight_rows(0, n, buf), bias)
    else:
        y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x.device)
        for i in range(0, n, rows):
            j = min(n, i + rows)
            y[:, i:j] = linear(x2, weight_rows(i, j, buf[: j - i]))
        y = y if bias is None else y + bias
    return y.to(x.dtype).view(*x.shape[:-1], n)


def ggml_rows(raw: torch.Tensor, kind: int, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (any shape) of a weight kept in ggml blocks, dequantized: (*ids.shape, columns) in dtype."""
    flat = ids.reshape(-1)
    return dequantize(raw.index_select(0, flat), kind).to(dtype).view(*ids.shape, -1)


__all__ = [
    "BLOCKS",
    "FLOAT",
    "PLANAR",
    "dequantize",
    "ggml_linear",
    "ggml_rows",
    "group_linear",
    "group_weight",
    "parts",
    "planar",
]
