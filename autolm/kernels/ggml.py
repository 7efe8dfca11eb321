"""llama.cpp's (ggml's) weight blocks: dequantizing functions written in plain torch ops, the matmul that computes
on the blocks as they are, and the one on their exact repacking into planes (ggml_repack.planar).

Each quantized type is a sequence of fixed-size blocks per row (ggml/src/ggml-common.h): fp16 scales packed with
2..8-bit quants. `dequantize(raw, kind)` takes a weight's rows as raw bytes, uint8 (rows, bytes per row), and
returns float32 (rows, columns), with the arithmetic of ggml's `dequantize_row_*` (and gguf.quants, which the
tests compare against). Written with shifts, masks and broadcasts only, the same expression serves eagerly and
inside a compiled graph, where inductor fuses it into the matrix-vector loop: the weight is read once, as
blocks, and never written out in float.

Types of 5 to 8 bits (PLANAR) are repacked while loading (ggml_repack.py) into planes: the integer quants as
int8 (N, K) and a float32 scale (and low value) per group of columns, the same values as the blocks (scale * q +
low, each scale computed as ggml computes it). Inductor streams those planes with vector loads, 2-4x faster than
assembling the quants from the packed blocks, for 6% (Q8_0) to 64% (Q5_0) more bytes than the file holds.
"""

from __future__ import annotations

import torch

from . import native
from .core import batched_graph, linear, matvec, needs_grad, realize

# ggml type -> (weights per block, bytes per block), for the types autolm computes on.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16, MXFP4 = 10, 11, 12, 13, 14, 20, 23, 30, 39
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
    MXFP4: (32, 17),
}
# gguf.GGMLQuantizationType's names for these types (importing the gguf package takes a twentieth of a second)
NAMES = {
    F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0",
    Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS",
    MXFP4: "MXFP4",
}  # fmt: skip
FLOAT = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # FP4 E2M1's values, doubled
# Types repacked into planes while loading -> weights per scale (group).
PLANAR = {Q5_0: 32, Q5_1: 32, Q5_K: 32, Q6_K: 16, Q8_0: 32}
LOW = {Q4_1, Q5_1, Q2_K, Q4_K, Q5_K}  # types whose groups also have a low value (value = scale * q + low)
_TILE_BYTES = 1 << 21  # float32 bytes of one dequantized tile in the eager matmul (in the L2 / L3 cache)


def _i32(b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return b[..., lo:hi].to(torch.int32)


def _i8(x: torch.Tensor) -> torch.Tensor:
    """uint8 values below 128 as int8 (the same bytes), so that subtracting gives signed quants."""
    return x.view(torch.int8)


def half_at(b: torch.Tensor, at: int) -> torch.Tensor:
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
        return _i8(_nibbles(b, 2, 18)) - 8, half_at(b, 0), None
    return _nibbles(b, 4, 20), half_at(b, 0), half_at(b, 2)


def _q5(b, kind):  # Q4's nibbles plus a fifth bit from a 32-bit mask
    at = 2 if kind == Q5_0 else 4
    shifts = torch.arange(32, dtype=torch.int32, device=b.device).view(2, 16)
    q = _nibbles(b, at + 4, at + 20) | (((_u32(b, at).unsqueeze(-1) >> shifts) & 1) << 4).to(torch.uint8)
    return (_i8(q) - 16, half_at(b, 0), None) if kind == Q5_0 else (q, half_at(b, 0), half_at(b, 2))


def _q8_0(b, kind):
    return b[..., 2:34].view(torch.int8).unsqueeze(-2), half_at(b, 0), None


def _two_bits(b: torch.Tensor, lo: int) -> torch.Tensor:
    """Q2_K / Q3_K: 64 bytes of 2-bit quants -> (..., 16, 16) in the order of their 16 scales."""
    q = _bits(b[..., lo : lo + 64].unflatten(-1, (2, 2, 16)), 2, 4)  # (..., half, 16 bytes, shift, 16)
    return q.transpose(-3, -2).flatten(-4, -2)


def _q2_k(b, kind):
    sc = b[..., 0:16]
    return _two_bits(b, 16), half_at(b, 80) * (sc & 15), -(half_at(b, 82) * (sc >> 4))


def _q3_k(b, kind):
    low = _bits(b[..., 96:104], 4, 2).flatten(-2)  # 16 x 4 low bits of the 6-bit scales
    high = _bits(b[..., 104:108], 2, 4).flatten(-2)
    qh = _bits(b[..., 0:32].unflatten(-1, (2, 16)), 1, 8).transpose(-3, -2).flatten(-3, -2)
    q = _i8(_two_bits(b, 32)) - _i8((qh ^ 1) << 2)  # a set bit means no offset
    return q, half_at(b, 108) * (_i8(low | (high << 4)) - 32), None


def scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes (..., 12) uint8 -> eight 6-bit scales and eight 6-bit mins (..., 8)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc, mn


def _q45_k(b, kind):
    sc, mn = scale_min_k4(b[..., 4:16])
    at = 16 if kind == Q4_K else 48
    q = _bits(b[..., at : at + 128].unflatten(-1, (4, 32)), 4, 2).flatten(-3, -2)  # (..., 8, 32)
    if kind == Q5_K:
        q = q | (_bits(b[..., 16:48], 1, 8) << 4)
    return q, half_at(b, 0) * sc, -(half_at(b, 2) * mn)


def _q6_k(b, kind):
    ql = _bits(b[..., 0:128].unflatten(-1, (2, 2, 2, 16)), 4, 2)  # (..., half, 32 bytes, 16, nibble, 16)
    ql = ql.movedim(-2, -4).flatten(-5, -2)  # (..., 16 groups, 16)
    qh = _bits(b[..., 128:192].unflatten(-1, (2, 2, 16)), 2, 4).transpose(-3, -2).flatten(-4, -2)
    return _i8(ql | (qh << 4)) - 32, half_at(b, 208) * b[..., 192:208].view(torch.int8).float(), None


def _iq4(b, kind):
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    if kind == IQ4_NL:  # code book indices as int32 (uint8 index tensors would be masks)
        return table[_nibbles(b, 2, 18).int()], half_at(b, 0), None
    low = _bits(_i32(b, 4, 8), 4, 2).transpose(-1, -2).flatten(-2)  # (..., 8)
    high = _bits(_i32(b, 2, 3) | (_i32(b, 3, 4) << 8), 2, 8).flatten(-2)
    q = _bits(b[..., 8:136].unflatten(-1, (8, 16)), 4, 2).flatten(-3, -2)  # (..., 16, 16)
    return table[q.int()], half_at(b, 0) * ((low | (high << 4)) - 32), None


def _mxfp4(b, kind):  # an E8M0 scale byte (halved: the values are doubled), then IQ4_NL's nibbles
    table = torch.tensor(_MXFP4_VALUES, dtype=torch.float32, device=b.device)
    e = b[..., 0:1].int()
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return table[_nibbles(b, 1, 17).int()], bits.view(torch.float32), None


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
    MXFP4: _mxfp4,
}


def parts(raw: torch.Tensor, kind: int):
    """A quantized weight's rows, raw bytes (rows, bytes per row) -> (q (rows, groups, group), scale (rows,
    groups), low (rows, groups) or None): value = scale * q + low, groups of 16 or 32 along each row."""
    q, scale, low = _PARTS[kind](raw.unflatten(-1, (-1, BLOCKS[kind][1])), kind)
    flat, groups = (*raw.shape[:-1], -1), q.shape[-2]

    def per_group(t: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., groups): each value for groups / n
        return t.unsqueeze(-1).expand(*t.shape, groups // t.shape[-1]).reshape(flat)

    return q.reshape(*flat, q.shape[-1]), per_group(scale), None if low is None else per_group(low)


def llama_qk_order(t: torch.Tensor, heads: int, dim: int = 0) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation along dimension `dim` of t: its converter stores each head's rows
    (2, half) as (half, 2), so that RoPE rotates adjacent pairs; this gives them back in the HF model's order
    (rotate-half). Rows of any kind (raw blocks included, dim=0) or a layer's outputs (dim=-1); a view where
    the strides allow."""
    dim = dim % t.dim()
    half = t.shape[dim] // heads // 2
    return t.unflatten(dim, (heads, half, 2)).transpose(dim + 1, dim + 2).flatten(dim, dim + 2)


def dequantize(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """A weight's rows in ggml type `kind`, raw bytes uint8 (rows, bytes per row) -> float32 (rows, columns)."""
    if kind in FLOAT:
        return raw.view(FLOAT[kind]).float()
    q, scale, low = parts(raw, kind)
    w = scale.unsqueeze(-1) * q
    return (w if low is None else w + low.unsqueeze(-1)).flatten(-2)


def ggml_linear(
    x: torch.Tensor, raw: torch.Tensor, kind: int, bias: torch.Tensor | None, heads: int = 0
) -> torch.Tensor:
    """x @ W.T + bias for a weight W kept in its ggml blocks (see dequantize). Inside a compiler: one
    matrix-vector loop over the blocks (or a matmul of the dequantized weight for longer inputs); eagerly: the
    weight dequantized a tile of rows at a time, each tile multiplied by oneDNN's fp32 matmul. The types of
    native.KINDS go to autolm's C++ kernel where it is built (eagerly and compiled alike): integer dot
    products with x quantized to int8 per block, as llama.cpp computes them. `heads` > 0: raw's rows are
    llama.cpp's permuted q/k rows of that many heads; the outputs come in the model's order (llama_qk_order)."""
    if raw.device.type == "cpu" and not needs_grad(x) and native.computes(kind, x.shape[-1]):
        y = native.ggml_mm(x, raw, kind, heads)
        return y if bias is None else y + bias.to(y.dtype)
    if heads:
        y = llama_qk_order(ggml_linear(x, raw, kind, None), heads, -1)
        return y if bias is None else y + bias.to(y.dtype)
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


def group_weight(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Planes (ggml_repack.planar) -> the float32 weight (rows, columns), in `out` if given. The quants are
    converted first, then scaled in place: 20% faster than one int8 * float32 multiply, whose mixed types take
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
    """x @ W.T + bias for a weight in planes (ggml_repack.planar). Inside a compiler: one matrix-vector loop over
    the planes, the group's scale applied to each product (so the loop needs one sum per row, not one per group);
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
    "half_at",
    "llama_qk_order",
    "parts",
    "scale_min_k4",
]
