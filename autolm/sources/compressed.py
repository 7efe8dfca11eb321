"""compressed-tensors checkpoints (quantization_config quant_method "compressed-tensors": the llm-compressor
releases vLLM serves, "-FP8-dynamic", "-W8A8", "-W4A16", "-quantized.w4a16"), dequantized while loading, as
transformers loads them with dequantize=True: the model holds, and saves, floats.

A quantized linear `<m>` stores, by the format of its config group:
- "float-quantized": `<m>.weight` float8_e4m3fn, `<m>.weight_scale`;
- "int-quantized" / "naive-quantized": `<m>.weight` int8, `<m>.weight_scale`, `<m>.weight_zero_point` (asymmetric);
- "pack-quantized": `<m>.weight_packed` int32, `num_bits` values per word from the lowest bits, each stored plus
  2 ** (num_bits - 1); `<m>.weight_shape` (out, in); `<m>.weight_scale`; `<m>.weight_zero_point` for asymmetric
  weights, packed the same way down the output rows.
The scale is one per tensor (1,), per output row (out, 1), per group of input columns (out, in / group_size), or per
block (`block_structure`); activation ordering (`actorder`) gives each input column its group (`weight_g_idx`).
The value is (q - zero_point) * scale. Activation and KV-cache scales (`input_scale`, `output_scale`, `k_scale`,
`v_scale`) quantize activations on a GPU alone and are dropped, as the dequantized load drops them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..kernels.quant import pack_nibbles
from .fp8 import dequantize_fp8
from .safetensors import Shards

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "dense")
PARTS = (".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")
DROPPED = (".input_scale", ".output_scale", ".k_scale", ".v_scale", ".input_zero_point", ".output_zero_point")


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, count) signed values: `32 / bits` per word from the lowest bits, each stored
    plus 2 ** (bits - 1)."""
    if 32 % bits:
        raise CheckpointError(
            f"pack-quantized: num_bits {bits} does not divide a 32-bit word (expected 2, 4 or 8)"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count] - (1 << (bits - 1))


def _expand(s: torch.Tensor, rows: int, cols: int, g_idx: torch.Tensor | None, name: str) -> torch.Tensor:
    """A per-tensor, per-row or per-group scale (or zero point) as one value per weight element."""
    s = s.reshape(1, 1) if s.dim() < 2 else s
    if g_idx is not None:
        return s.expand(rows, -1)[:, g_idx.long()]
    if cols % s.shape[-1] or s.shape[0] not in (1, rows):
        raise CheckpointError(f"tensor {name!r}: scale {tuple(s.shape)} does not fit weight ({rows}, {cols})")
    return s.expand(rows, -1).repeat_interleave(cols // s.shape[-1], dim=-1)


@dataclass
class Int4Codes:
    """A 4-bit weight as its checkpoint stores it: codes q (out, in) in 0..15 and per group of `group` input
    columns value = (q - 8) * scale + zero, autolm's int4 layout (quant.Int4Linear), so that quantization "int4"
    with the same group size keeps the codes exactly (load.placers) instead of quantizing the values again."""

    q: torch.Tensor
    scale: torch.Tensor  # (out, in / group)
    zero: torch.Tensor
    group: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def values(self) -> torch.Tensor:
        """The float32 values (out, in)."""
        expand = lambda t: t.repeat_interleave(self.group, dim=-1)  # noqa: E731
        return (self.q.to(torch.float32) - 8) * expand(self.scale) + expand(self.zero)

    def int4(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nibbles (out, in / 2), scales_and_zeros (in / group, out, 2)) as Int4Linear holds them."""
        return pack_nibbles(self.q), torch.stack([self.scale.T, self.zero.T], -1).contiguous()


class CompressedTensors(Shards):
    """A compressed-tensors checkpoint's quantized weights and their parts, wherever their shard is."""

    def __init__(self, where: dict[str, str], weights: dict):
        super().__init__(where)  # part name -> its file
        self.args = weights  # the config groups' weight arguments

    @classmethod
    def of(cls, names_by_file: dict[str, list[str]], quant: dict) -> CompressedTensors:
        """The checkpoint's parts (its tensor names, file by file) and its quantization_config's weight arguments
        (one set for every group: checkpoints mixing schemes are refused by field)."""
        groups = quant.get("config_groups") or {}
        formats = {g.get("format") or quant.get("format") for g in groups.values() if isinstance(g, dict)}
        if not isinstance(groups, dict) or not groups or not formats <= set(FORMATS):
            raise CheckpointError(f"quantization_config (compressed-tensors): config_groups / format {sorted(map(str, formats))} "
                                  f"not readable here (autolm reads {', '.join(FORMATS)})")  # fmt: skip
        weights = [g.get("weights") for g in groups.values()]
        weights = [w for w in weights if isinstance(w, dict)]
        keys = ("num_bits", "type", "symmetric", "strategy", "block_structure")
        if len({tuple(str(w.get(k)) for k in keys) for w in weights}) > 1:
            raise CheckpointError("quantization_config (compressed-tensors): config_groups quantize weights "
                                  "differently; autolm reads checkpoints with one weight scheme")  # fmt: skip
        where = {n: f for f, names in names_by_file.items() for n in names if n.endswith(PARTS)}
        return cls(where, weights[0] if weights else {})

    def take(self, name: str, get: Callable[[], torch.Tensor], keep=None) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as the model takes it: a quantized weight as float32 values under `<m>.weight`
        (4-bit codes in groups as Int4Codes where `keep(name)` asks for them); None for a weight's parts (taken
        with it) and activation scales."""
        if name.endswith(PARTS + DROPPED):
            return None
        if name.endswith(".weight_packed"):
            name = name.removesuffix("_packed")
            shape = self._part(name + "_shape")
            if shape is None:
                raise CheckpointError(f"tensor {name}_packed has no {name}_shape (the weight's (out, in))")
            rows, cols = (int(x) for x in shape.tolist())
            q = unpack_int32(get(), int(self.args.get("num_bits", 4)), cols).reshape(rows, cols)
            codes = self._codes(name, q) if keep is not None and keep(name) else None
            if codes is not None:
                return name, codes
        elif name + "_scale" in self.where:
            q = get()
        else:
            return name, get()
        return name, self._dequantize(name, q.to(torch.float32))

    def int4_group(self) -> int | None:
        """The group size of 4-bit integer weights in groups (what quantization "int4" keeps exactly), else None."""
        a = self.args
        plain = a.get("num_bits") == 4 and a.get("type") == "int" and a.get("strategy") == "group"
        return a.get("group_size") if plain and not a.get("actorder") else None

    def _codes(self, name: str, q: torch.Tensor) -> Int4Codes | None:
        """q (signed, -8..7) with its scale and zero point as Int4Codes, where they are 4-bit groups in order."""
        group = self.int4_group()
        if group is None or name + "_g_idx" in self.where or q.shape[-1] % group:
            return None
        scale = self._part(name + "_scale").to(torch.float32)
        zero = self._part(name + "_zero_point")
        if zero is not None:  # value = (q - zp) * scale = ((q + 8) - 8) * scale - zp * scale
            zero = unpack_int32(zero.T.contiguous(), 4, q.shape[0]).T if zero.dtype == torch.int32 else zero
            zero = -zero.to(torch.float32) * scale
        return Int4Codes(
            (q + 8).to(torch.uint8), scale, torch.zeros_like(scale) if zero is None else zero, group
        )

    def _dequantize(self, name: str, q: torch.Tensor) -> torch.Tensor:
        scale, zero = self._part(name + "_scale"), self._part(name + "_zero_point")
        if self.args.get("strategy") == "block":
            if zero is not None:
                raise CheckpointError(f"tensor {name!r}: asymmetric block quantization is not readable here")
            return dequantize_fp8(q, scale, tuple(self.args.get("block_structure") or ()) or None, name)
        rows, cols = q.shape[-2:]
        g_idx = self._part(name + "_g_idx")
        if zero is not None:
            if zero.dtype == torch.int32 and name + "_shape" in self.where:  # packed down the rows
                zero = unpack_int32(zero.T.contiguous(), int(self.args.get("num_bits", 4)), rows).T
            q = q - _expand(zero.to(torch.float32), rows, cols, g_idx, name)
        return q * _expand(scale.to(torch.float32), rows, cols, g_idx, name)
