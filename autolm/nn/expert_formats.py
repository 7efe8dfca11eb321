"""How checkpoints other than transformers' own store stacked experts, as checkpoint rules (nn.checkpoint) that
assemble the model's parameter from the pieces: `MXFP4` (gpt-oss on the Hub), `GGUFExperts` (llama.cpp) and
`InOutExperts` (Qwen3-VL-MoE on the Hub).

MXFP4 experts (quantization_config quant_method "mxfp4") are dequantized while loading as transformers does
(integrations/mxfp4.py, convert_moe_packed_tensors).

A stacked expert weight `<name>` is stored as `<name>_blocks`, uint8 (E, out, G, 16): 32 four-bit values per
block, the even element in the low nibble, each an index into FP4_VALUES; and `<name>_scales`, uint8 (E, out, G):
a power of two per block, biased by 127. The values are (E, out, in = 32 G); the model holds them transposed,
(E, in, out). `MXFP4` pairs the two and assembles the parameter.

llama.cpp's converter writes each layer's experts as three stacked tensors, ffn_gate_exps and ffn_up_exps
(E, I, h) and ffn_down_exps (E, h, I) (gpt-oss: with biases, its gate/up rows de-interleaved and its weights
transposed back); the GGUF reader names them `mlp.experts.gate_proj`, `up_proj` and `down_proj`, and
`GGUFExperts` joins them into the model's gate_up_proj / down_proj.

Qwen3-VL-MoE's files on the Hub hold each layer's experts stacked under the model's own names but (E, in, out):
`mlp.experts.gate_up_proj` (E, h, 2I, [gate | up] along the last axis) and `down_proj` (E, I, h); transformers 5
saves them as its model holds them, (E, 2I, h) / (E, h, I). `InOutExperts` takes either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """blocks (..., G, 16) uint8 and scales (..., G) uint8 -> values (..., 32 G) in `dtype` (bf16 holds every
    MXFP4 value exactly)."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=dtype)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out.float(), (scales.to(torch.int32) - 127).unsqueeze(-1)).to(dtype)
    return out.flatten(-2)


@dataclass(frozen=True)
class MXFP4:
    """Checkpoint rule: `<...>.experts.<proj>_blocks` and `_scales` -> the model's `<...>.experts.<proj>`, held
    (E, in, out)."""

    def pieces(self, name: str) -> int:
        """How many pieces make the parameter `name`."""
        return 2

    def piece(self, name: str) -> tuple[str, str] | None:
        """(model name, "blocks" | "scales") for an MXFP4 piece of an experts' weight, else None."""
        for kind in ("blocks", "scales"):
            if ".experts." in name and name.endswith(f"_{kind}"):
                return name.removesuffix(f"_{kind}"), kind
        return None

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        """The (E, in, out) parameter from its blocks and scales, one expert at a time (small temporaries)."""
        blocks, scales = got["blocks"], got["scales"]
        E, K, N = shape
        want = (E, N, K // 32, 16)
        if (
            K % 32
            or blocks.dtype != torch.uint8
            or tuple(blocks.shape) != want
            or tuple(scales.shape) != want[:3]
        ):
            raise CheckpointError(
                f"{source}: MXFP4 {name!r}: blocks {tuple(blocks.shape)} {blocks.dtype} and scales "
                f"{tuple(scales.shape)}; the model's {tuple(shape)} weight needs uint8 blocks {want} and scales {want[:3]}"
            )
        return torch.stack([dequantize_mxfp4(blocks[e], scales[e]).t() for e in range(E)])


@dataclass(frozen=True)
class GGUFExperts:
    """Checkpoint rule: `<...>.experts.{gate,up,down}_proj.{weight,bias}` (llama.cpp's stacked tensors, as the GGUF
    reader names them) -> the model's gate_up_proj (gate and up joined; `interleaved`: row by row), down_proj and
    their biases; `transposed`: the model holds its weights (E, in, out)."""

    transposed: bool = False
    interleaved: bool = False

    def piece(self, name: str) -> tuple[str, str] | None:
        """(model name, "gate" | "up" | "down") for a piece of llama.cpp's stacked experts, else None."""
        m = re.fullmatch(r"(.+\.experts)\.(gate|up|down)_proj\.(weight|bias)", name)
        if m is None:
            return None
        target = "down_proj" if m.group(2) == "down" else "gate_up_proj"
        return f"{m.group(1)}.{target}{'_bias' if m.group(3) == 'bias' else ''}", m.group(2)

    def pieces(self, name: str) -> int:
        return 2 if ".gate_up_proj" in name else 1

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """The inverse of `assemble` (GGUF out): the model's gate_up_proj / down_proj (and biases) `name` ->
        [(llama.cpp's piece as the reader names it, tensor (E, rows, ...))], else None."""
        m = re.fullmatch(r"(.+\.experts)\.(gate_up|down)_proj(_bias)?", name)
        if m is None:
            return None
        kind = "bias" if m.group(3) else "weight"
        if kind == "weight" and self.transposed:
            t = t.transpose(1, 2)
        if m.group(2) == "down":
            return [(f"{m.group(1)}.down_proj.{kind}", t)]
        gate, up = (t[:, 0::2], t[:, 1::2]) if self.interleaved else t.chunk(2, 1)
        return [(f"{m.group(1)}.gate_proj.{kind}", gate), (f"{m.group(1)}.up_proj.{kind}", up)]

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        """The model's parameter from llama.cpp's pieces (E, rows, ...): joined, interleaved, transposed as declared."""
        weight = not name.endswith("_bias")
        if "down" in got:
            t = got["down"]
        elif self.interleaved:  # (E, I, ...) twice -> rows gate0, up0, gate1, ...
            t = torch.stack([got["gate"], got["up"]], 2).flatten(1, 2)
        else:
            t = torch.cat([got["gate"], got["up"]], 1)
        if weight and self.transposed:
            t = t.transpose(1, 2)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: the experts' {name!r} assembled from llama.cpp's stacked tensors "
                                  f"{ {k: tuple(v.shape) for k, v in got.items()} } is {tuple(t.shape)}; the model "
                                  f"expects {tuple(shape)}")  # fmt: skip
        return t.contiguous()


@dataclass(frozen=True)
class InOutExperts:
    """Checkpoint rule: `<...>.experts.{gate_up,down}_proj` stacked under the model's names, stored (E, in, out) ->
    the model's (E, out, in); one already the model's shape is taken as it is (as transformers does: a square
    per-expert matrix is read as the model's)."""

    def pieces(self, name: str) -> int:
        return 1

    def piece(self, name: str) -> tuple[str, str] | None:
        return (name, "t") if re.fullmatch(r".+\.experts\.(gate_up|down)_proj", name) else None

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = got["t"]
        if tuple(t.shape) != tuple(shape):
            t = t.transpose(1, 2)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: the experts' {name!r} is {tuple(got['t'].shape)}; the model expects "
                                  f"{tuple(shape)} (experts, out, in) or its transpose")  # fmt: skip
        return t.contiguous()
