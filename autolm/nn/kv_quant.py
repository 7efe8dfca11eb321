"""Quantization of key/value tensors as transformers' quantized cache runs it with its three backends (group-wise
affine integers, per-tensor float8), reimplemented here (autolm imports neither integer library):

- "quanto" (optimum-quanto's MaxOptimizer + quantize_weight, as QuantoQuantizedLayer calls them): groups of
  `group_size` values, each with scale (max - min) / (2**bits - 1) and shift -min in the tensor's dtype; a code is
  round((x + shift) / scale) clamped to [0, 2**bits - 1], the value back scale * code - shift. axis 0 groups
  consecutive values of the flattened tensor (along the head dimension); axis -1 groups one channel of the head
  dimension over `group_size` consecutive rows (tokens, then heads, then batch rows).
- "hqq" (hqq's Quantizer.quantize with its defaults, as HQQQuantizedLayer calls it): in float32 (float16 on CUDA
  while optimizing), groups of the tensor reshaped to (-1, group_size) (axis 1: consecutive values) or
  (group_size, -1) (axis 0: values numel / group_size apart), min-max scale and zero, then hqq's proximal
  optimizer of the zero (lp norm 0.7, beta 10, at most 20 rounds, stopping at the first that does not lower the
  mean error); the value back (code - zero) * scale in the tensor's dtype.

The codes are stored packed, 8 // bits to a byte (`Packed`: 3-bit codes two to a byte), with the per-group scale
and shift or zero.

- "fp8" (transformers' Fp8QuantizedLayer, pure torch): the whole tensor in float8_e4m3fn (`Fp8`: 1 byte a value)
  as float32 x / scale, one float32 scale max|x| / 448 (at least float32's tiny) taken from the first tensor and
  kept for the values appended later; back as float32 code * scale in the first tensor's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GenerationError


@dataclass
class Packed:
    """A quantized tensor: its codes packed into bytes, per-group scale and shift (quanto) or zero (hqq)."""

    codes: torch.Tensor  # uint8 (ceil(numel * bits / 8),)
    scale: torch.Tensor
    shift: torch.Tensor
    shape: torch.Size  # the tensor's
    grouped: torch.Size  # the codes' shape before packing
    bits: int
    axis: int
    backend: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.shift))


@dataclass
class Fp8:
    """A tensor in 8-bit floating point (float8_e4m3fn codes, 1 byte a value) with one float32 scale for all of it,
    dequantized to `dtype`."""

    codes: torch.Tensor
    scale: torch.Tensor  # 0-dim float32
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))


FP8 = torch.float8_e4m3fn


def fp8_codes(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t's float8_e4m3fn codes at `scale` (float32 t / scale, cast)."""
    return (t.float() / scale).to(FP8)


def fp8(t: torch.Tensor) -> Fp8:
    """t quantized with its scale calibrated on its largest magnitude (transformers' first update)."""
    scale = (t.abs().amax().float() / torch.finfo(FP8).max).clamp(min=torch.finfo(torch.float32).tiny)
    return Fp8(fp8_codes(t, scale), scale, t.dtype)


def fp8_append(q: Fp8, t: torch.Tensor, dim: int = -2) -> Fp8:
    """q with t appended along `dim`, quantized at q's scale."""
    return Fp8(torch.cat([q.codes, fp8_codes(t, q.scale)], dim=dim), q.scale, q.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values < 2**bits) as bytes, 8 // bits codes to a byte (the first in the low bits)."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per)]).reshape(-1, per)
    out = flat[:, 0].clone()
    for i in range(1, per):
        out |= flat[:, i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """pack's codes back, as uint8 of `shape`."""
    shifts = torch.arange(8 // bits, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[: shape.numel()].reshape(shape)


def quantize(t: torch.Tensor, backend: str, bits: int, axis: int, group_size: int, field: str) -> Packed:
    """t quantized by `backend`; GenerationError naming q_group_size (and `field`) when the groups do not tile it."""
    if backend == "quanto":
        return _quanto(t, bits, axis, group_size, field)
    return _hqq(t, bits, axis, group_size, field)


def dequantize(q: Packed | Fp8) -> torch.Tensor:
    """The tensor a Packed (or Fp8) stands for, in its scale's dtype (Fp8's own), as the backend computes it."""
    if isinstance(q, Fp8):
        return (q.codes.float() * q.scale).to(q.dtype)
    codes = unpack(q.codes, q.bits, q.grouped)
    if q.backend == "hqq":
        return ((codes.to(q.scale.dtype) - q.shift) * q.scale).reshape(q.shape)
    grouped = q.scale * codes
    grouped -= q.shift
    if q.axis == 0:
        return grouped.reshape(q.shape)
    group_size, axis_dim = grouped.shape[0], q.shape[-1]
    return grouped.reshape(group_size, axis_dim, -1).permute(2, 0, 1).reshape(q.shape)


def _bad_group(t: torch.Tensor, group_size: int, over: int, field: str) -> GenerationError:
    return GenerationError(
        f"cache_config q_group_size={group_size} must divide {over} (the values per quantization axis of the "
        f"{field} {tuple(t.shape)} to quantize)"
    )


def _quanto(t: torch.Tensor, bits: int, axis: int, group_size: int, field: str) -> Packed:
    axis_dim = t.shape[axis]
    axis_numel = t.numel() // axis_dim
    if group_size > axis_numel or axis_numel % group_size:
        raise _bad_group(t, group_size, axis_numel, field)
    if axis == 0:
        grouped = t.reshape(-1, group_size)
    else:
        grouped = t.reshape(axis_numel // group_size, group_size, axis_dim).permute(1, 2, 0)
        grouped = grouped.reshape(group_size, -1)
    # MaxOptimizer: min and max per group (over the whole first axis where only one group row remains)
    dim = 1 if axis == 0 and grouped.shape[0] != 1 else 0
    rmin = torch.amin(grouped, dim=dim, keepdim=True)
    rmax = torch.amax(grouped, dim=dim, keepdim=True)
    scale = (rmax - rmin) / (2**bits - 1)
    shift = -rmin
    codes = torch.clamp(torch.round((grouped + shift) / scale), min=0, max=2**bits - 1).to(torch.uint8)
    return Packed(pack(codes, bits), scale, shift, t.shape, codes.shape, bits, axis, "quanto")


def _hqq(t: torch.Tensor, bits: int, axis: int, group_size: int, field: str) -> Packed:
    if t.numel() % group_size:
        raise _bad_group(t, group_size, t.numel(), field)
    W = t.float()
    W = W.reshape(-1, group_size) if axis == 1 else W.reshape(group_size, -1)
    lo, hi = W.min(axis, keepdim=True)[0], W.max(axis, keepdim=True)[0]
    top = 2**bits - 1
    denom = hi - lo
    scale = top / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale).clamp(max=2e4)
    scale, zero = _hqq_optimize(
        W, scale, -lo * scale, top, axis
    )  # in the optimizer's dtype, as hqq keeps them
    codes = torch.round(W * scale + zero).clamp_(0, top)
    scale = 1.0 / scale
    return Packed(
        pack(codes, bits), scale.to(t.dtype), zero.to(t.dtype), t.shape, codes.shape, bits, axis, "hqq"
    )


def _hqq_optimize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int, axis: int):
    """hqq's optimize_weights_proximal_legacy: (scale, zero) after its half-quadratic rounds on the zero."""
    dtype = torch.float16 if W.device.type == "cuda" else torch.float32
    W_f, scale, zero = W.to(dtype), scale.to(dtype), zero.to(dtype)
    beta, lp_norm = 10.0, 0.7
    best = torch.tensor(torch.inf, dtype=torch.float32, device=W.device)
    for _ in range(20):
        W_q = torch.round(W_f * scale + zero).clamp_(0, top)
        W_r = (W_q - zero) / scale
        x = W_f - W_r
        W_e = torch.abs(x)
        W_e.sub_((1.0 / beta) * W_e.pow(lp_norm - 1)).clamp_min_(0.0)
        W_e.mul_(torch.sign(x))
        zero = torch.mean(W_q - (W_f - W_e) * scale, axis=axis, keepdim=True)
        error = torch.abs(W_f - W_r).mean().float()
        if error < best:
            best = error
        else:
            break
    return scale, zero
