"""GPTQ and AWQ checkpoints (quantization_config quant_method "gptq" / "awq": TheBloke's and Qwen's -GPTQ-Int4 and
-AWQ releases), dequantized while loading, as the other quantized formats are (sources.fp8): the model holds, and
saves, floats.

A quantized linear `<m>` (in, out features) stores int32 words, each value `bits` wide from the lowest bits up:
- GPTQ: `<m>.qweight` (in * bits / 32, out) packed down the input rows; `<m>.qzeros` (groups, out * bits / 32)
  packed along the outputs; `<m>.scales` (groups, out); `<m>.g_idx` (in,) the group of each input row (act-order,
  `desc_act`; without it row i is in group i // group_size); `<m>.bias` where the layer has one. 3-bit values
  straddle words: 32 of them fill 3 words, as one little-endian stream. In checkpoint_format "gptq" (v1, the
  common one) the quantizers store each zero minus 1, and the zero is (stored + 1) mod 2 ** bits, as AutoGPTQ reads
  it; "gptq_v2" stores the zero itself.
- AWQ (version "gemm"): `<m>.qweight` (in, out / 8) and `<m>.qzeros` (groups, out / 8), eight 4-bit values a word
  in AWQ's order (the word's values are outputs 0, 2, 4, 6, 1, 3, 5, 7 of its eight); `<m>.scales` (groups, out).
The value of input i, output o is scales[g, o] * (q[i, o] - zero[g, o]) for i's group g; the model's weight is its
transpose (out, in). Modules the quantizer left alone (`modules_to_not_convert`, lm_head) are stored as floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import CheckpointError
from .compressed import Int4Codes
from .safetensors import Shards

METHODS = ("gptq", "awq")
PARTS = (".qzeros", ".scales", ".g_idx")
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each of a word's values holds, from its lowest bits


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(..., n) int32 words -> (..., count) unsigned values, `bits` wide, read as one little-endian stream of bits
    (a value may straddle two words, as GPTQ's 3-bit ones do)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if count * bits > 32 * w.shape[-1]:
        raise CheckpointError(f"{w.shape[-1]} words hold fewer than {count} values of {bits} bits")
    start = torch.arange(count, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    low = w[..., word] >> shift
    high = w[..., (word + 1).clamp(max=w.shape[-1] - 1)] << (
        32 - shift
    )  # the bits a straddling value continues in
    return (low | high) & ((1 << bits) - 1)


def _groups(g_idx: torch.Tensor | None, rows: int, groups: int, group_size: int, name: str) -> torch.Tensor:
    """Each input row's group: the checkpoint's g_idx, or consecutive groups of group_size rows."""
    if g_idx is None:
        size = rows if group_size <= 0 else group_size
        if math.ceil(rows / size) != groups:
            raise CheckpointError(f"tensor {name!r}: {groups} groups of scales do not fit {rows} input rows in "
                                  f"groups of {size} (quantization_config group_size)")  # fmt: skip
        return torch.arange(rows) // size
    g = g_idx.long().reshape(-1)
    if g.numel() != rows or (rows and (g.min() < 0 or g.max() >= groups)):
        raise CheckpointError(f"tensor {name!r}: g_idx {tuple(g_idx.shape)} does not give each of {rows} input "
                              f"rows one of {groups} groups")  # fmt: skip
    return g


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, group_size: int, v1: bool, name: str):
    """GPTQ's packed `<m>` -> its (out, in) float32 weight."""
    return _values(*gptq_parts(qweight, qzeros, scales, g_idx, bits, group_size, v1, name), scales)


def _values(q: torch.Tensor, z: torch.Tensor, g: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes q (in, out), zeros z (groups, out) and each input row's group g -> the (out, in) float32 weight."""
    return ((q - z[g]).to(torch.float32) * scales.to(torch.float32)[g]).T


def gptq_parts(qweight, qzeros, scales, g_idx, bits: int, group_size: int, v1: bool, name: str):
    """GPTQ's packed `<m>` -> (codes (in, out), zeros (groups, out), each input row's group)."""
    out = scales.shape[-1]
    rows = qweight.shape[0] * 32 // bits
    if qweight.shape[-1] != out or qzeros.shape[0] != scales.shape[0]:
        raise CheckpointError(f"tensor {name!r}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and "
                              f"scales {tuple(scales.shape)} do not fit together at {bits} bits")  # fmt: skip
    q = unpack_bits(qweight.T, bits, rows).T  # (in, out)
    z = unpack_bits(qzeros, bits, out)
    if v1:
        z = (z + 1) & ((1 << bits) - 1)
    return q, z, _groups(g_idx, rows, scales.shape[0], group_size, name)


def dequantize_awq(qweight, qzeros, scales, bits: int, group_size: int, name: str):
    """AWQ's GEMM-packed `<m>` -> its (out, in) float32 weight."""
    return _values(*awq_parts(qweight, qzeros, scales, bits, group_size, name), scales)


def awq_parts(qweight, qzeros, scales, bits: int, group_size: int, name: str):
    """AWQ's GEMM-packed `<m>` -> (codes (in, out), zeros (groups, out), each input row's group)."""
    rows, out = qweight.shape[0], scales.shape[-1]
    if qweight.shape[-1] * 32 // bits != out or qzeros.shape != (scales.shape[0], qweight.shape[-1]):
        raise CheckpointError(f"tensor {name!r}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and "
                              f"scales {tuple(scales.shape)} do not fit together at {bits} bits")  # fmt: skip
    order = torch.tensor(AWQ_ORDER)
    columns = (torch.arange(out).reshape(-1, len(order))[:, order.argsort()]).reshape(-1)
    q, z = unpack_bits(qweight, bits, out)[:, columns], unpack_bits(qzeros, bits, out)[:, columns]
    return q, z, _groups(None, rows, scales.shape[0], group_size, name)


def _field(quant: dict, *keys: str, default=None):
    """The first of `keys` the config sets (AutoAWQ's own files say w_bit / q_group_size)."""
    return next((quant[k] for k in keys if quant.get(k) is not None), default)


class PackedLinears(Shards):
    """A GPTQ or AWQ checkpoint's packed linears and their parts, wherever their shard is."""

    def __init__(self, where: dict[str, str], method: str, bits: int, group_size: int, v1: bool):
        super().__init__(where)
        self.method, self.bits, self.group_size, self.v1 = method, bits, group_size, v1

    @classmethod
    def of(cls, names_by_file: dict[str, list[str]], quant: dict) -> PackedLinears:
        """The checkpoint's parts (its tensor names, file by file) and its quantization_config's fields, refused by
        field where they name a layout autolm does not read."""
        method = quant["quant_method"]
        bits = _field(quant, "bits", "w_bit", default=4)
        group_size = _field(quant, "group_size", "q_group_size", default=128 if method == "awq" else -1)
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise CheckpointError(
                f"quantization_config ({method}): group_size must be an integer, found {group_size!r}"
            )
        v1 = True
        if method == "gptq":
            fmt = _field(quant, "checkpoint_format", "format", default="gptq")
            if fmt not in GPTQ_FORMATS:
                raise CheckpointError(f"quantization_config (gptq): checkpoint_format {fmt!r} is not readable here "
                                      f"(autolm reads {', '.join(GPTQ_FORMATS)})")  # fmt: skip
            if bits not in GPTQ_BITS:
                raise CheckpointError(f"quantization_config (gptq): bits {bits!r} is not readable here (autolm reads "
                                      f"{', '.join(map(str, GPTQ_BITS))})")  # fmt: skip
            if _field(quant, "pack_dtype", default="int32") != "int32":
                raise CheckpointError(f"quantization_config (gptq): pack_dtype {quant['pack_dtype']!r} is not "
                                      "readable here (autolm reads int32 words)")  # fmt: skip
            v1 = fmt == "gptq"
        else:
            version = str(quant.get("version") or "gemm").lower()
            if version not in AWQ_VERSIONS:
                raise CheckpointError(f"quantization_config (awq): version {quant.get('version')!r} is not readable "
                                      f"here (autolm reads AutoAWQ's {', '.join(AWQ_VERSIONS)} layout)")  # fmt: skip
            if bits != 4:
                raise CheckpointError(f"quantization_config (awq): bits {bits!r} is not readable here (AWQ's GEMM "
                                      "layout holds 4-bit values)")  # fmt: skip
            if quant.get("zero_point") is False:
                raise CheckpointError("quantization_config (awq): zero_point false is not readable here (AWQ's "
                                      "GEMM layout stores zero points)")  # fmt: skip
        where = {
            n: f for f, names in names_by_file.items() for n in names if n.endswith((".qweight", *PARTS))
        }
        return cls(where, method, bits, group_size, v1)

    def take(self, name: str, get: Callable[[], torch.Tensor], keep=None) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as the model takes it: a packed linear as its float32 weight under `<m>.weight`;
        None for its parts (taken with it) and for an all-zero bias of a packed linear (as transformers ignores the
        biases older AutoGPTQ files give a model that has none)."""
        module, _, part = name.rpartition(".")
        if module + ".qweight" in self.where and "." + part in PARTS:
            return None
        if part == "bias" and module + ".qweight" in self.where:
            bias = get()  # older AutoGPTQ files hold one, all zeros, for every linear of a model without any
            return (name, bias) if bias.any() else None
        if part != "qweight":
            return name, get()
        scales, zeros = self._part(module + ".scales"), self._part(module + ".qzeros")
        if scales is None or zeros is None:
            raise CheckpointError(f"tensor {name!r} has no {module}.scales or {module}.qzeros")
        if self.method == "awq":
            q, z, g = awq_parts(get(), zeros, scales, self.bits, self.group_size, module)
        else:
            g_idx = self._part(module + ".g_idx")
            q, z, g = gptq_parts(get(), zeros, scales, g_idx, self.bits, self.group_size, self.v1, module)
        group = self.int4_group()
        if (
            keep is not None
            and keep(module + ".weight")
            and group
            and torch.equal(g, torch.arange(len(g)) // group)
        ):
            # value = (q - z) * s = (q - 8) * s + (8 - z) * s, in autolm's int4 layout
            s = scales.to(torch.float32).T.contiguous()
            return module + ".weight", Int4Codes(
                q.T.to(torch.uint8).contiguous(), s, (8 - z).T.to(torch.float32) * s, group
            )
        return module + ".weight", _values(q, z, g, scales).contiguous()

    def int4_group(self) -> int | None:
        """The group size of 4-bit weights in groups (what quantization "int4" keeps exactly), else None."""
        return self.group_size if self.bits == 4 and self.group_size > 0 else None

    @staticmethod
    def shapes(shapes: dict[str, tuple[int, ...]], quant: dict) -> dict[str, tuple[int, ...]]:
        """The checkpoint's tensors as the model sees them, from the headers alone: `<m>.qweight` as `<m>.weight`
        (out, in), its parts gone."""
        bits = _field(quant, "bits", "w_bit", default=4)
        if not isinstance(bits, int) or bits <= 0:
            return shapes
        qweights = {n.removesuffix(".qweight") for n in shapes if n.endswith(".qweight")}
        out = {}
        for n, s in shapes.items():
            module, _, part = n.rpartition(".")
            if module in qweights and part == "qweight" and len(s) == 2:
                rows, cols = s
                gptq = quant.get("quant_method") == "gptq"
                out[module + ".weight"] = (cols, rows * 32 // bits) if gptq else (cols * 32 // bits, rows)
            elif not (module in qweights and "." + part in PARTS):
                out[n] = s
        return out
