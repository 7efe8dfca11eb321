"""bitsandbytes checkpoints (quantization_config quant_method "bitsandbytes": the "-bnb-4bit" releases, and any
model transformers quantized with a BitsAndBytesConfig and saved), dequantized while loading, as the other stored
formats are (sources.fp8): the model holds, and saves, floats.

A 4-bit linear `<m>` stores `<m>.weight`, uint8 (n / 2, 1): the weight's n codes flattened, two a byte, the first
in the high nibble; `<m>.weight.quant_map` (16,): each code's value (NF4's or FP4's table); `<m>.weight.absmax`:
one scale per block of `blocksize` codes; and `<m>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON
object in bytes (quant_type, blocksize, dtype, shape). With double quantization ("nested") the scales are
themselves 8-bit codes: absmax = nested_quant_map[code] * nested_absmax[block of nested_blocksize] +
nested_offset. The value is quant_map[code] * absmax[block]. An 8-bit linear stores `<m>.weight` int8 (out, in)
and `<m>.SCB` (out,): value = weight * SCB / 127 (LLM.int8's row-wise absmax); its `weight_format` is dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from ..errors import CheckpointError
from .safetensors import Shards

STATE = ".quant_state.bitsandbytes__"
PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def _blocks(values: torch.Tensor, scales: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """values (n,) times one scale per `block` of them (the last block cut short)."""
    if scales.numel() != math.ceil(values.numel() / block):
        raise CheckpointError(f"tensor {name!r}: {scales.numel()} scales for {values.numel()} values in blocks "
                              f"of {block}")  # fmt: skip
    return values * scales.reshape(-1).repeat_interleave(block)[: values.numel()]


def dequantize_4bit(
    packed: torch.Tensor, parts: dict[str, torch.Tensor], state: dict, name: str
) -> torch.Tensor:
    """A 4-bit weight's bytes, its parts (absmax, quant_map, nested_*) and its quant state -> float32 values."""
    shape = tuple(state.get("shape") or ())
    b = packed.reshape(-1).to(torch.long)
    codes = torch.stack([b >> 4, b & 0xF], -1).reshape(-1)[: math.prod(shape)]
    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        nested = parts["nested_quant_map"].to(torch.float32)[absmax.reshape(-1).long()]
        absmax = _blocks(nested, parts["nested_absmax"].float(), int(state["nested_blocksize"]), name)
        absmax = absmax + float(state.get("nested_offset", 0.0))
    values = parts["quant_map"].to(torch.float32)[codes]
    return _blocks(values, absmax.to(torch.float32), int(state["blocksize"]), name).reshape(shape)


class Bitsandbytes(Shards):
    """A bitsandbytes checkpoint's quantized linears and their parts, wherever their shard is."""

    @classmethod
    def of(cls, names_by_file: dict[str, list[str]]) -> Bitsandbytes:
        parts = (*PARTS, STATE + "nf4", STATE + "fp4")
        return cls({n: f for f, names in names_by_file.items() for n in names if n.endswith(parts)})

    def take(self, name: str, get: Callable[[], torch.Tensor], keep=None) -> tuple[str, torch.Tensor] | None:
        """A checkpoint tensor as the model takes it: a quantized weight as float32 values; None for its parts."""
        if name.endswith(PARTS) or STATE in name:
            return None
        module = name.removesuffix(".weight")
        scb = self._part(module + ".SCB") if module != name else None
        if scb is not None:  # LLM.int8
            return name, get().to(torch.float32) * scb.to(torch.float32)[:, None] * (
                1 / 127
            )  # as bitsandbytes
        state = next(
            (self._part(name + STATE + k) for k in ("nf4", "fp4") if name + STATE + k in self.where), None
        )
        if state is None:
            return name, get()
        try:
            info = json.loads(bytes(state.tolist()))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"tensor {name!r}: its quant_state is not a JSON object") from None
        keys = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
        parts = {k: t for k in keys if (t := self._part(f"{name}.{k}")) is not None}
        if (
            "absmax" not in parts
            or "quant_map" not in parts
            or "blocksize" not in info
            or not info.get("shape")
        ):
            raise CheckpointError(f"tensor {name!r}: a 4-bit weight needs its absmax, quant_map and quant_state's "
                                  "blocksize and shape")  # fmt: skip
        return name, dequantize_4bit(get(), parts, info, name)
