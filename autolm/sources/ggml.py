"""GGUF tensors handed over in their own blocks (llama.cpp's quantization types), without a float round trip.

`blocks(g, t, config)` gives a tensor's rows as raw bytes over the file's memory map, in the file's order (the q/k
rows llama's converter permuted say so: `GGMLBlocks.heads`; `in_order()` copies them into the model's order);
a weight copied into another layout gives the file's pages behind it back (`GGMLBlocks.release`), so memory holds each weight once; `to_int4` repacks the types whose
blocks are exactly autolm's int4 layout (4-bit quants in groups of 32 with a scale and an offset: Q4_0, Q4_1,
Q4_K) into the int4 layers' entries. The other types are computed on by autolm.nn.ggml.
"""

from __future__ import annotations

import contextlib
import mmap
import weakref
from typing import NamedTuple

import torch

from ..errors import GGUFError
from ..kernels import ggml as K
from ..kernels import ggml_repack

INT4_TYPES = tuple(ggml_repack.INT4)  # exactly int4 with groups of 32 (scales rounded to bf16)
_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GGUFFile -> uint8 tensor over the whole file


def type_name(kind: int) -> str:
    if kind in K.NAMES:
        return K.NAMES[kind]
    import gguf

    try:
        return gguf.GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def keepable(kind: int) -> bool:
    """Whether autolm computes on this ggml type's blocks (else its tensors are dequantized while loading)."""
    return kind in K.BLOCKS


class GGMLBlocks(NamedTuple):
    """A weight (shape (N, K), or (experts, N, K) for llama.cpp's stacked experts) of ggml type `kind` as its rows
    of raw blocks: uint8 (N, bytes per row), or (experts, N, bytes per row)."""

    raw: torch.Tensor
    kind: int
    shape: tuple[int, ...]
    name: str  # the tensor's name in the GGUF file, for errors
    span: tuple = ()  # (memory map, offset, bytes) of the file's pages behind raw
    heads: int = 0  # rows in llama.cpp's permuted q/k order for this many heads (0: the model's order)

    def is_floating_point(self) -> bool:
        return False

    def in_order(self) -> GGMLBlocks:
        """These blocks with their rows in the model's order: a copy where they were permuted (the file's pages
        behind them then given back)."""
        if not self.heads:
            return self
        raw = K.llama_qk_order(self.raw, self.heads).clone()
        self.release()
        return self._replace(raw=raw, span=(), heads=0)

    def release(self) -> None:
        """Drop the file's pages behind these blocks from this process's memory (once they were copied into
        another layout): read again from the file if ever touched again."""
        if self.span:
            m, offset, n = self.span
            page = mmap.PAGESIZE
            start, end = -(-offset // page) * page, (offset + n) // page * page
            if end > start:
                m.madvise(mmap.MADV_DONTNEED, start, end - start)


def file_map(g) -> tuple[torch.Tensor, mmap.mmap | None]:
    """The whole GGUF file as a uint8 tensor over a private (copy-on-write) memory map, made once per file.

    The map is advised to use huge pages (for this mapping only): where the OS keeps the file's page cache in
    2 MiB folios (Linux 6.x on ext4 / xfs, for a file read from disk), the blocks are then mapped 2 MiB at a
    time, and a kernel streaming them meets a TLB miss every 2 MiB, not every 4 KiB (a 1.1B Q4_K_M file's decode:
    24.5 -> 17-20 ms per token); where it does not, this changes nothing. With AUTOLM_NO_MMAP=1 the file was read
    into memory of its own (GGUFFile.memory), and that is returned."""
    if g not in _MAPS and g.memory is not None:  # read into memory (AUTOLM_NO_MMAP): nothing to map
        _MAPS[g] = (torch.from_numpy(g.memory), None)
    if g not in _MAPS:
        with open(g.path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(m) and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # no transparent huge pages: 4 KiB pages
                m.madvise(mmap.MADV_HUGEPAGE)
        _MAPS[g] = (
            (torch.frombuffer(m, dtype=torch.uint8), m)
            if len(m)
            else (torch.empty(0, dtype=torch.uint8), None)
        )
    return _MAPS[g]


def permuted_heads(g, t, config) -> int:
    """The number of heads whose q/k rows the family's converter permuted in tensor `t` of GGUF file `g` (llama's
    q and k), else 0."""
    if not g.layout.permute_qk:
        return 0
    if ".attn_q." in t.name:
        return config.num_attention_heads
    return config.num_key_value_heads if ".attn_k." in t.name else 0


def row_order(g, t, config) -> torch.Tensor | None:
    """For each of the model's rows of tensor `t`, its row in GGUF file `g`, where the family's converter regrouped
    them (GGUFLayout.row_order: GPT-NeoX's fused q/k/v), else None."""
    return g.layout.rows(t.name, config)


def blocks(g, t, config) -> GGMLBlocks:
    """Tensor `t` (a sources.gguf.TensorInfo, of 1 to 3 dimensions) of GGUF file `g` as raw blocks over the
    file's map, rows in the file's order (rows the converter regrouped: copied back in the model's order)."""
    if not keepable(int(t.tensor_type)):
        raise GGUFError(
            f"{g.path}: tensor {t.name!r} has type {type_name(t.tensor_type)}, not kept in blocks"
        )
    shape = tuple(int(x) for x in reversed(t.shape)) if len(t.shape) > 1 else (1, int(t.shape[0]))
    whole, m = file_map(g)
    raw = whole[t.data_offset : t.data_offset + t.n_bytes].view(*shape[:-1], -1)
    span = (m, t.data_offset, t.n_bytes) if m is not None else ()
    b = GGMLBlocks(raw, int(t.tensor_type), shape, t.name, span, permuted_heads(g, t, config))
    order = row_order(g, t, config) if len(t.shape) == 2 else None
    if order is None:
        return b
    ordered = b._replace(raw=raw[order], span=())
    b.release()
    return ordered


def to_int4(b: GGMLBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks -> (nibbles uint8 (N, K / 2), even columns in the low nibbles, as
    kernels.quant.pack_nibbles; scales_and_zeros (K / 32, N, 2) float32) with value = (q - 8) * scale + zero: the
    same weights, only the layers' bf16 scales round them."""
    nibbles, scale, low = ggml_repack.int4_parts(b.raw, b.kind)
    sz = torch.empty(scale.shape[1], scale.shape[0], 2, device=scale.device)
    sz[..., 0] = scale.T
    # Q4_0: value = scale * (q - 8), zero 0; else value = scale * q + low = (q - 8) * scale + 8 * scale + low
    if low is None:
        sz[..., 1] = 0
    else:
        torch.add(low.T, scale.T, alpha=8, out=sz[..., 1])
    return nibbles, sz
