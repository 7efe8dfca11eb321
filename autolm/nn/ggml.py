"""Layers that hold a weight in llama.cpp's own blocks (a GGUF file's tensor as it is on disk) and compute on it
through autolm's kernels (kernels.ggml): a linear layer, an embedding table, and a mixture-of-experts layer's
stacked experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import ConfigError
from ..kernels.ggml import BLOCKS, LOW, PLANAR
from ..kernels.ggml_quantize import quantizable, quantize_blocks
from ..kernels.ggml_repack import planar
from .moe import Experts


def row_bytes(columns: int, kind: int) -> int:
    """Bytes of one row of `columns` weights in ggml type `kind`."""
    block, size = BLOCKS[kind]
    return columns // block * size


class GGMLLinear(nn.Module):
    """y = x @ W.T + b with W (out_features, in_features) kept in a GGUF file's quantization `kind`. For the types
    of 5 to 8 bits (kernels.ggml.PLANAR) `weight` holds the quants as int8 (out_features, in_features) and
    `scales` / `low` float32 per group of columns (kernels.ggml_repack.planar: the blocks' exact values, repacked while
    loading); for the others `weight` is the blocks themselves, uint8 (out_features, bytes per row), usually a
    view of the file's memory map, and `scales` and `low` are None. `planes=False` keeps a PLANAR type's blocks
    too (where kernels.native computes on them). `heads`, set by the loader: the blocks' rows are in llama.cpp's
    permuted q/k order for that many heads, kept so over the file's map; the outputs (and `dequantize()`) come
    in the model's order (kernels.llama_qk_order)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        kind: int,
        dtype: torch.dtype,
        planes: bool = True,
    ):
        super().__init__()
        self.in_features, self.out_features, self.ggml_type, self.heads = in_features, out_features, kind, 0
        self.float_shape = (out_features, in_features)  # the weight these blocks stand for
        planar, groups = planes and kind in PLANAR, in_features // PLANAR.get(kind, 1)
        shape, wtype = (in_features, torch.int8) if planar else (row_bytes(in_features, kind), torch.uint8)
        self.register_buffer("weight", torch.empty(out_features, shape, dtype=wtype))
        self.register_buffer("scales", torch.empty(out_features, groups) if planar else None)
        self.register_buffer("low", torch.empty(out_features, groups) if planar and kind in LOW else None)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 (out_features, in_features) weight these blocks stand for."""
        if self.scales is not None:
            return kernels.group_weight(self.weight, self.scales, self.low)
        w = kernels.ggml_dequantize(self.weight, self.ggml_type)
        return kernels.llama_qk_order(w, self.heads) if self.heads else w

    @property
    def requantizable(self) -> bool:
        """Whether autolm quantizes to this layer's type (a LoRA merge keeps the merged weight in it)."""
        return quantizable(self.ggml_type)

    def requantize(self, w: torch.Tensor) -> None:
        """Hold float weight w (out_features, in_features; the model's row order) in this layer's type: w quantized
        to its blocks (kernels.ggml_quantize) and kept as the load keeps them (repacked to planes, or the blocks,
        now in memory rather than over the file's map), as peft quantizes a merged 4- or 8-bit weight again."""
        raw = torch.from_numpy(quantize_blocks(w.detach().float().cpu().numpy(), self.ggml_type))
        raw = raw.to(self.weight.device)
        if self.scales is None:
            self.weight, self.heads = raw, 0  # the rows now in the model's order
            return
        self.weight, self.scales, low = planar(raw, self.ggml_type)
        if low is not None:
            self.low = low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.needs_grad(x):  # a gradient for x (LoRA above this layer): through the dequantized weight
            return F.linear(x, self.dequantize().to(x.dtype), self.bias)
        if self.scales is not None:
            return kernels.group_linear(x, self.weight, self.scales, self.low, self.bias)
        return kernels.ggml_linear(x, self.weight, self.ggml_type, self.bias, self.heads)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.ggml_type}"


class GGMLEmbedding(nn.Module):
    """An embedding table kept as ggml blocks (`blocks`, uint8 (num_embeddings, bytes per row)); a lookup
    dequantizes only the rows it reads. `weight` describes the float table (its shape, dtype and device, for
    code that asks) without holding it: its values are zeros; `dequantize()` gives the real table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, kind: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ggml_type, self.dtype = (
            num_embeddings,
            embedding_dim,
            kind,
            dtype,
        )
        self.float_shape = (num_embeddings, embedding_dim)
        self.register_buffer(
            "blocks", torch.empty(num_embeddings, row_bytes(embedding_dim, kind), dtype=torch.uint8)
        )

    @property
    def weight(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.blocks.device).expand(
            self.num_embeddings, self.embedding_dim
        )

    def dequantize(self) -> torch.Tensor:
        return kernels.ggml_dequantize(self.blocks, self.ggml_type)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.ggml_rows(self.blocks, self.ggml_type, ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={self.ggml_type}"


class GGMLStack(nn.Module):
    """One projection of every expert, kept as a GGUF file stacks it (llama.cpp's ffn_gate_exps, ffn_up_exps or
    ffn_down_exps): `weight` uint8 (experts, out_features, bytes per row) of ggml type `kind`, a view of the file's
    memory map; `bias` (experts, out_features) where the family has one."""

    def __init__(self, experts: int, in_features: int, out_features: int, kind: int, bias: bool, dtype):
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, kind
        self.float_shape = (experts, out_features, in_features)
        self.register_buffer(
            "weight", torch.empty(experts, out_features, row_bytes(in_features, kind), dtype=torch.uint8)
        )
        self.bias = (
            nn.Parameter(torch.empty(experts, out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """x @ W[e].T + b[e]: e an int (x: that expert's rows), or one expert id per row."""
        return kernels.ggml_expert_linear(x, self.weight, self.ggml_type, e, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 (experts, out_features, in_features) weights these blocks stand for."""
        return kernels.ggml_dequantize(self.weight, self.ggml_type)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} x ({self.in_features} -> {self.out_features}), ggml_type={self.ggml_type}"


class GGMLExperts(Experts):
    """A mixture-of-experts layer's experts kept in a GGUF file's blocks, as llama.cpp keeps them: gate_proj,
    up_proj (experts, I, h) and down_proj (experts, h, I) stacks (GGMLStack, each of its own type, under the names
    the GGUF reader gives llama.cpp's tensors), computed on by autolm's C++ kernel; non-gated experts (Nemotron 3's
    down(act(up(x)))) have no gate_proj (`kinds` without it). The routing and arithmetic are Experts'
    (kernels.mixture, the family's activation); `like` gives the sizes and the activation."""

    def __init__(self, like: Experts, kinds: dict[str, int], dtype: torch.dtype):
        nn.Module.__init__(self)
        E, h, i = like.num_experts, like.hidden_size, like.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, h, i
        self.act_fn, self.limit, self.alpha = like.act_fn, like.limit, like.alpha
        self.transposed = self.interleaved = False
        self.tp = None
        bias = hasattr(like, "gate_up_proj_bias")
        self.gate_proj = GGMLStack(E, h, i, kinds["gate_proj"], bias, dtype) if "gate_proj" in kinds else None
        self.up_proj = GGMLStack(E, h, i, kinds["up_proj"], bias, dtype)
        self.down_proj = GGMLStack(E, i, h, kinds["down_proj"], bias, dtype)

    by_row = True  # one token's experts in one call of the kernel per projection (ggml_mm_id)

    def expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x, e)), e)
        return self.down_proj(self.gated(self.gate_proj(x, e), self.up_proj(x, e)), e)

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        raise ConfigError("experts kept in a GGUF file's blocks are not split for tensor parallelism: load with "
                          "quantization=None (or int8 / int4) to shard them")  # fmt: skip
