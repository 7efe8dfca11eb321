"""Weight-only int8 / int4 matmuls: PyTorch's CPU kernels, and their arithmetic inside compiled graphs; and
the quantization of a float (N, K) weight into those layouts.

Each returns None where its kernel is missing (another device, another torch build); the quantized layers
then dequantize and run a plain matmul.
"""

from __future__ import annotations

import functools

import torch

from .core import PrivateOp, batched_graph, needs_grad, realize

INT8_MM = PrivateOp("aten", "_weight_int8pack_mm")
INT4_MM = PrivateOp("aten", "_weight_int4pack_mm_for_cpu")
INT4_PACK = PrivateOp("aten", "_convert_weight_to_int4pack_for_cpu")
COMPUTE = torch.bfloat16  # activation dtype of the CPU kernels


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """x @ (q * scales + offsets).T + bias for an int8 weight q (N, K) with per-row scales and offsets:
    (x @ q.T) * scales + sum(x) * offsets, x rounded to bf16 for the kernel. Inside a compiler the same
    roundings as multiply-and-sum loops."""
    if torch.compiler.is_compiling() and not batched_graph():
        x = realize(x)
        xb = x.to(COMPUTE).float()
        y = ((xb.unsqueeze(-2) * q.float()).sum(-1) * scales.to(COMPUTE).float()).to(COMPUTE)
        total = x.float().sum(-1, keepdim=True).to(x.dtype)
        y = (y.to(x.dtype).float() + total.float() * offsets.to(x.dtype).float()).to(x.dtype)
        return y if bias is None else y + bias
    if x.device.type != "cpu" or needs_grad(x) or not int8_kernel_fits(q):  # the kernel has no backward
        return None
    x2 = x.reshape(-1, q.shape[1])  # eager, or many rows inside a compiled graph: PyTorch's kernel
    y = INT8_MM.call(x2.to(COMPUTE), q, scales.to(COMPUTE))
    if y is None:
        return None
    total = x2.sum(-1, keepdim=True, dtype=torch.float32).to(x.dtype)
    y = torch.addcmul(y.to(x.dtype), total, offsets.to(x.dtype)).reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def int8_kernel_fits(q: torch.Tensor) -> bool:
    """Whether PyTorch's int8 CPU kernel takes a weight (..., N, K): it reads K in blocks of 16 and gives wrong
    sums, or reads past the weight's end, for other K."""
    return q.shape[-1] % 16 == 0


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_and_zeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """x @ W.T + bias for an int4 weight in the CPU kernel's packed layout (scales_and_zeros (K / group, N, 2));
    also called from compiled code."""
    if torch.compiler.is_compiling():
        x = realize(x)
    elif x.device.type != "cpu" or needs_grad(x):  # the kernel has no backward
        return None
    n = scales_and_zeros.shape[1]
    # A fused layer's parts hold column slices of its scales: the kernel reads them dense.
    y = INT4_MM.call(
        x.reshape(-1, x.shape[-1]).to(COMPUTE), packed, group_size, scales_and_zeros.contiguous()
    )
    if y is None:
        return None
    y = y.to(x.dtype).view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def int4_pack(nibbles: torch.Tensor) -> torch.Tensor | None:
    """Nibbles (N, K / 2) uint8 (pack_nibbles) -> the CPU int4 kernel's packed layout; None where the kernel is
    missing or does not take this shape (it packs rows in blocks of 16). Written here with byte operations where
    the kernel's layout is the one `_int4_layout` recognizes (4-9x faster than the kernel's own packing, which
    takes the quants as int32 and reads them a column at a time), else by the kernel. A multiple of 64 rows at a
    time (the layout's blocks of rows are whole in each part, so the parts are the whole's rows): temporaries of
    about 1 MB, small enough for the allocator to reuse (a whole matrix's, freed, stays in the heap; parts of
    4 MB raised SmolLM2's peak RSS by 50 MB), large enough for the kernel's threads."""
    if INT4_MM.get() is None or nibbles.shape[0] % 16:
        return None
    layout, nibbles = _int4_layout(), nibbles.contiguous()
    out = torch.empty(nibbles.shape, dtype=torch.uint8, device=nibbles.device)
    width = nibbles.shape[1] * (2 if layout else 8)  # bytes per row of the temporaries (int32 for the kernel)
    rows = max(64, (1 << 20) // width // 64 * 64)
    for i in range(0, nibbles.shape[0], rows):
        if layout is not None:
            _pack_rows(nibbles[i : i + rows], out[i : i + rows], *layout)
            continue
        part = INT4_PACK.call(unpack_nibbles(nibbles[i : i + rows]).to(torch.int32), 1)
        if part is None:
            return None
        out[i : i + rows] = part
    return out


def _pack_rows(
    nibbles: torch.Tensor, out: torch.Tensor, block: int, halves: bool, unpack: bool = False
) -> None:
    """The kernel's layout (see _int4_layout) of `nibbles` (n, K / 2), into out: whole blocks of `block` rows,
    then the rest as one block of adjacent pairs. `unpack`: the other way, `nibbles` in the kernel's layout and
    `out` the nibbles."""
    n, width = nibbles.shape
    whole = n // block * block
    for lo, hi, rows, split in ((0, whole, block, halves), (whole, n, n - whole, False)):
        if hi == lo:
            continue
        plain, packed = (out[lo:hi], nibbles[lo:hi]) if unpack else (nibbles[lo:hi], out[lo:hi])
        if split:
            pairs = plain.view(-1, 2, rows // 2, width)
        else:
            pairs = plain.view(-1, rows // 2, 2, width).transpose(1, 2)
        # (blocks, rows / 2, K / 2) each: the rows for the low and for the high nibbles
        first, second = pairs[:, 0], pairs[:, 1]
        columns = packed.view(-1, width, 2, rows // 2)  # (blocks, K / 2, even / odd column, rows / 2)
        even, odd = columns[:, :, 0].transpose(1, 2), columns[:, :, 1].transpose(1, 2)
        if unpack:
            first.copy_((even & 15) | (odd << 4))
            second.copy_((even >> 4) | (odd & 0xF0))
        else:
            even.copy_((first & 15) | (second << 4))
            odd.copy_((first >> 4) | (second & 0xF0))


@functools.cache
def _int4_layout() -> tuple[int, bool] | None:
    """The CPU kernel's packed layout, recognized once by packing a probe with the kernel itself. PyTorch's
    layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp) takes the rows in blocks of 4 float vectors' widths (64
    rows with AVX-512, 32 with AVX2 and without vectors); block b's bytes come after block b - 1's, column by
    column: byte (k, j) holds column k of row j in its low nibble and of row j + rows / 2 in its high nibble
    (AVX-512, AVX2), or of rows 2j and 2j + 1 (the others, and a last block of fewer rows in all builds).
    Returns (rows per block, whether rows pair with the row half a block away); None where the probe matches
    none of these (a changed kernel: it then packs every weight itself)."""
    probe = torch.randint(0, 16, (208, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    # 208 rows: whole blocks of any size, and a last block of 16 rows where blocks are of 64 or 32
    want = INT4_PACK.call(probe, 1)
    if want is None:
        return None
    nibbles = pack_nibbles(probe.to(torch.uint8))
    for layout in ((64, True), (32, True), (32, False), (16, False)):
        got = torch.empty_like(nibbles)
        _pack_rows(nibbles, got, *layout)
        if torch.equal(got, want):
            return layout
    return None


def int4_unpack(packed: torch.Tensor, group_size: int, in_features: int, scales_and_zeros: torch.Tensor):
    """Recover q (N, K) uint8 in 0..15 from the CPU kernel's layout: by byte operations where _int4_layout
    recognizes it (about 0.5 ns per weight), else by running the kernel on the identity (50 ns per weight of a
    4096 x 4096 matrix)."""
    layout = _int4_layout()
    if layout is not None:
        nibbles = torch.empty(packed.shape, dtype=torch.uint8, device=packed.device)
        rows = max(64, (1 << 20) // (2 * packed.shape[1]) // 64 * 64)
        for i in range(0, packed.shape[0], rows):
            _pack_rows(packed[i : i + rows].contiguous(), nibbles[i : i + rows], *layout, unpack=True)
        return unpack_nibbles(nibbles)
    ones = torch.zeros_like(scales_and_zeros)
    ones[..., 0] = 1  # scale 1, zero 0: the kernel returns q - 8 exactly (small integers are exact in bf16)
    eye = torch.eye(in_features, dtype=COMPUTE)
    qt = INT4_MM.call(eye, packed, group_size, ones)  # (K, N)
    return (qt.t().float() + 8).round().to(torch.uint8)


_ROWS = 64  # rows quantized at a time: small float temporaries keep the peak near the quantized size


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K), per-row scales (N,) and offsets (N,): w ~ q * scale + offset."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scales, offsets = torch.empty(N), torch.empty(N)
    for i in range(0, N, _ROWS):
        rows = w[i : i + _ROWS].float()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        o, s = (hi + lo) / 2, ((hi - lo) / 254).clamp(min=1e-10)
        q[i : i + _ROWS] = rows.sub(o[:, None]).div_(s[:, None]).round_().clamp_(-127, 127)
        scales[i : i + _ROWS], offsets[i : i + _ROWS] = s, o
    return q, scales, offsets


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q in 0..15 as uint8 (N, K) and scales_and_zeros (K / group, N, 2)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.uint8)
    sz = torch.empty(K // group_size, N, 2)
    for i in range(0, N, _ROWS):
        g = w[i : i + _ROWS].float().reshape(-1, K // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)  # (rows, G)
        scales = ((hi - lo) / 15).clamp(min=1e-6)
        q[i : i + _ROWS] = g.sub(lo[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).reshape(-1, K)
        sz[:, i : i + _ROWS] = torch.stack([scales, lo + 8 * scales], -1).transpose(0, 1)
    return q, sz


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) in 0..15 -> (N, K / 2): even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], -1).reshape(p.shape[0], -1)
