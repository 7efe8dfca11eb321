"""Mixture-of-experts arithmetic: each token's top-k experts, computed as grouped matrix products.

`mixture` runs a stack of experts over the rows routed to them. Eager, the (token, slot) pairs are sorted by
expert and each expert that got any runs its rows as one matmul (a loop over experts, never over tokens; the
expert's weights are views, read once). Inside a compiled graph the shapes must not depend on the routing, so
every (token, slot) pair reads its expert's weights by index: on the CPU as multiply-and-sum, which inductor
turns into one loop that streams each selected expert's weights once (no copy); elsewhere as a batched
matmul over the gathered weights.

`expert_linear` is the one projection both forms share: `e` an int (eager: one expert's rows) or a tensor of
expert ids, one per row (compiled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import native
from .core import batched_graph, linear, needs_grad, realize
from .ggml import dequantize, ggml_linear
from .quant import COMPUTE, INT4_MM, INT8_MM, int8_kernel_fits

Expert = Callable[[torch.Tensor, "int | torch.Tensor"], torch.Tensor]
# rows per expert (on average) below which a by-row kernel takes a batch's rows in one call; from there on each
# expert's rows are one matmul, where the kernel's many-row panels pay
FEW_ROWS = 16


def mixture(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    expert: Expert,
    by_row: bool = False,
) -> torch.Tensor:
    """sum_j weights[:, j] * expert(x, ids[:, j]) for x (N, h), ids and weights (N, k); `expert(rows, e)` runs
    expert e (an int) on its rows, or each row's own expert (e a (rows,) tensor) inside a compiler, and eagerly
    for one token or a few where `by_row` says the experts compute so in one call (GGUF's, llama.cpp's
    mul_mat_id; the rows sorted by expert). The weighted sum is taken in the weights' dtype, then cast to x's
    (transformers' order)."""
    N, k = ids.shape
    flat = ids.reshape(-1)  # (N * k,) in (token, slot) order
    if torch.compiler.is_compiling() or (by_row and N == 1):
        y = expert(x.repeat_interleave(k, 0), flat)
    elif N == 1:  # one token (decoding): its k experts in turn, nothing to sort
        y = torch.cat([expert(x, e) for e in flat.tolist()])
    else:
        order = torch.argsort(flat, stable=True)
        rows = x.index_select(0, order // k)  # sorted by expert
        # few rows per expert, by row: one call, the kernel takes each expert's run of rows at once
        if by_row and N * k < FEW_ROWS * num_experts:
            y = expert(rows, flat[order])
        else:
            counts = torch.bincount(flat, minlength=num_experts).tolist()
            parts, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    parts.append(expert(rows[start : start + n], e))
                    start += n
            y = torch.cat(parts)
        y = y.index_select(0, torch.argsort(order))  # back to (token, slot) order
    return (y.view(N, k, -1) * weights.unsqueeze(-1)).sum(1).to(x.dtype)


def expert_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    e: int | torch.Tensor,
    b: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """x @ w[e].T + b[e] for stacked weights w (E, out, in), or x @ w[e] + b[e] for transposed ones (E, in, out).
    e an int: x (n, in) are expert e's rows. e a tensor (rows,): each row has its own expert."""
    if isinstance(e, int):
        bias = None if b is None else b[e]
        if transposed:
            y = x @ w[e]
            return y if bias is None else y + bias
        return linear(x, w[e], bias)
    if x.device.type == "cpu":
        xf = realize(x).float()
        we = w[e].float()  # indexed inside the loop that reads it: no copy once compiled
        y = (xf.unsqueeze(-1) * we).sum(-2) if transposed else (xf.unsqueeze(-2) * we).sum(-1)
        return (y if b is None else y + b[e].float()).to(x.dtype)
    y = (
        torch.bmm(x.unsqueeze(1), w[e]).squeeze(1)
        if transposed
        else torch.bmm(w[e], x.unsqueeze(-1)).squeeze(-1)
    )
    return y if b is None else y + b[e]


def ggml_expert_linear(
    x: torch.Tensor, raw: torch.Tensor, kind: int, e: int | torch.Tensor, b: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ W[e].T + b[e] for experts kept in llama.cpp's blocks: raw uint8 (E, out, bytes per row) of ggml type
    `kind` (a GGUF file's stacked ffn_*_exps over its memory map). autolm's C++ kernel computes on the blocks: one
    expert's rows (e an int), or each row with its own expert (e a tensor, inside a compiled graph: llama.cpp's
    mul_mat_id); without it the expert's rows are dequantized."""
    if isinstance(e, int):  # one expert's rows: that expert's blocks as any GGUF weight
        return ggml_linear(x, raw[e], kind, None if b is None else b[e])
    if x.device.type == "cpu" and not needs_grad(x) and native.computes(kind, x.shape[-1]):
        y = native.ggml_mm_id(realize(x), raw, e, kind)
    else:
        y = (realize(x).float().unsqueeze(-2) * dequantize(raw[e], kind)).sum(-1).to(x.dtype)
    return y if b is None else y + b[e].to(y.dtype)


def int8_expert_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, e: int | torch.Tensor
) -> torch.Tensor | None:
    """x @ (q[e] * scales[e] + offsets[e]).T for int8 experts q (E, out, in) with per-row scales and offsets
    (E, out), rounded as kernels.int8_linear rounds; None where its kernel is missing (the caller dequantizes)."""
    if isinstance(e, int):
        if x.device.type != "cpu" or q[e].data_ptr() % 64 or not int8_kernel_fits(q):
            return None
        y = INT8_MM.call(x.to(COMPUTE), q[e], scales[e].to(COMPUTE))
        if y is None:
            return None
        total = x.sum(-1, keepdim=True, dtype=torch.float32).to(x.dtype)
        return torch.addcmul(y.to(x.dtype), total, offsets[e].to(x.dtype))
    x = realize(x)
    xb = x.to(COMPUTE).float()
    y = ((xb.unsqueeze(-2) * q[e].float()).sum(-1) * scales[e].to(COMPUTE).float()).to(COMPUTE)
    total = x.float().sum(-1, keepdim=True).to(x.dtype)
    return (y.to(x.dtype).float() + total.float() * offsets[e].to(x.dtype).float()).to(x.dtype)


def int4_expert_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_and_zeros: torch.Tensor,
    e: int | torch.Tensor,
) -> torch.Tensor | None:
    """x @ W[e].T for int4 experts in the CPU kernel's packed layout (one packed weight per expert, stacked) with
    scales_and_zeros (E, in / group, out, 2); None where the kernel is missing. Inside a compiler each row's
    expert is taken by its index (a data-dependent view, so the kernel reads the expert's weight in place)."""
    if isinstance(e, int):
        if x.device.type != "cpu":
            return None
        y = INT4_MM.call(x.to(COMPUTE), packed[e], group_size, scales_and_zeros[e])
        return None if y is None else y.to(x.dtype)
    if batched_graph():  # a dynamic number of rows: every expert over all rows, each row takes its own
        x2 = realize(x).to(COMPUTE)
        ys = [INT4_MM.call(x2, packed.select(0, i), group_size, scales_and_zeros.select(0, i))
              for i in range(packed.shape[0])]  # fmt: skip
        if any(y is None for y in ys):
            return None
        return torch.stack(ys, 1)[torch.arange(x.shape[0], device=x.device), e].to(x.dtype)
    rows = []
    for j in range(x.shape[0]):  # the few rows of one token's top-k
        i = e[j].item()
        torch._check(i >= 0)
        torch._check(i < packed.shape[0])
        y = INT4_MM.call(realize(x[j : j + 1]).to(COMPUTE), packed.select(0, i), group_size,
                         scales_and_zeros.select(0, i))  # fmt: skip
        if y is None:
            return None
        rows.append(y.to(x.dtype))
    return torch.cat(rows)
