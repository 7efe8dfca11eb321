"""Block-quantized FP8 checkpoints (config.json's quantization_config quant_method "fp8": DeepSeek-V3/R1, Qwen3's
and MiniMax's -FP8 releases), dequantized while loading, as transformers loads them on a machine without an FP8
GPU (FineGrainedFP8 with dequantize=True): the model holds, and saves, floats.

A quantized linear `<m>` is stored as `<m>.weight`, float8_e4m3fn (out, in), and `<m>.weight_scale_inv`, float32
(ceil(out / bm), ceil(in / bn)): one scale per bm x bn block (`weight_block_size`, [128, 128] in every release;
without it the block is the weight's size over the grid's). The value is weight * scale of its block, computed in
float32. The variants transformers reads the same way: scales as E8M0 bytes (uint8, 2 ** (byte - 127): MXFP8), and
weights as FP4 pairs (int8, two E2M1 values per byte, the low nibble first). Static activation scales
(`activation_scale`, `input_scale`) quantize activations on an FP8 GPU alone and are dropped, as transformers'
dequantized load drops them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import CheckpointError
from .safetensors import Shards

SCALE = "_scale_inv"
DROPPED = (".activation_scale", ".input_scale")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _values(q: torch.Tensor) -> torch.Tensor:
    """A quantized weight's values in float32: FP8 as they are, FP4 pairs (int8) unpacked, the low nibble first."""
    if q.dtype != torch.int8:
        return q.to(torch.float32)
    b = q.contiguous().view(torch.uint8).long()
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    return torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, name: str
) -> torch.Tensor:
    """`q` (..., out, in) with its per-block `scale` (..., ceil(out / bm), ceil(in / bn)) -> float32 values."""
    w = _values(q)
    s = (scale.to(torch.float32) - 127.0).exp2() if scale.dtype == torch.uint8 else scale.to(torch.float32)
    if s.dim() < 2:
        s = s.reshape(*(1,) * (2 - s.dim()), *s.shape)
    rows, cols = w.shape[-2:]
    if block is None:
        if rows % s.shape[-2] or cols % s.shape[-1]:
            raise CheckpointError(f"tensor {name!r}: shape {tuple(w.shape)} is not a whole number of blocks of "
                                  f"its scale grid {tuple(s.shape)}; the config's weight_block_size is needed")  # fmt: skip
        block = (rows // s.shape[-2], cols // s.shape[-1])
    bm, bn = block
    if s.shape[-2:] != (math.ceil(rows / bm), math.ceil(cols / bn)) or s.shape[:-2] != w.shape[:-2]:
        raise CheckpointError(f"tensor {name!r}: scale grid {tuple(s.shape)} does not fit weight {tuple(w.shape)} "
                              f"in blocks of {bm} x {bn}")  # fmt: skip
    s = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return w * s


class FP8Scales(Shards):
    """The scales of a checkpoint's quantized weights, looked up wherever their shard is."""

    def __init__(self, where: dict[str, str], block: tuple[int, int] | None):
        super().__init__(where)  # scale name -> its file
        self.block = block

    @classmethod
    def of(cls, names_by_file: dict[str, list[str]], quant: dict | None) -> FP8Scales | None:
        """The checkpoint's scales (its tensor names, file by file; its quantization_config), or None when it
        holds none."""
        where = {n: f for f, names in names_by_file.items() for n in names if n.endswith(SCALE)}
        if not where:
            return None
        block = quant.get("weight_block_size") if isinstance(quant, dict) else None
        ok = (
            isinstance(block, (list, tuple))
            and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)
        )
        if block is not None and not ok:
            raise CheckpointError(f"quantization_config: weight_block_size must be two positive integers, found {block!r}")  # fmt: skip
        return cls(where, tuple(block) if ok else None)

    def skips(self, name: str) -> bool:
        """Whether `name` is a scale (consumed with its weight) or an activation scale (dropped)."""
        return name.endswith(SCALE) or name.endswith(DROPPED)

    def take(self, name: str, get: Callable[[], torch.Tensor], keep=None) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as the model takes it: a weight as float32 values when the checkpoint holds its
        scale; None for a scale (taken with its weight) or an activation scale."""
        if self.skips(name):
            return None
        scale = self._part(name + SCALE)
        return (name, get()) if scale is None else (name, dequantize_fp8(get(), scale, self.block, name))
