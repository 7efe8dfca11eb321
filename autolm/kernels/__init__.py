"""The one dispatch point for compute kernels: linear layers, attention and weight-only quantized matmuls.

Each function picks the fastest path for its inputs and falls back to PyTorch's public ops:

- fp32 linear layers on the CPU (eager inference) call oneDNN's matmul
  (`torch.ops.mkldnn._linear_pointwise`): on AMD CPUs PyTorch's F.linear goes to MKL's sgemm at
  under half of oneDNN's speed. Inside torch.compile, inputs of up to 4 rows are written as
  multiply-and-sum, which inductor fuses into a matrix-vector loop that streams the weight once.
- attention: bf16 prompts on the CPU go to `blocked_attention` (transformers' eager arithmetic,
  2.5-2.8x PyTorch's flash kernel there); one query per row to `grouped_attention` (no repeated
  K/V); everything else to `F.scaled_dot_product_attention`.
- int8 / int4 weight-only matmuls use PyTorch's CPU kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`); elsewhere the layers dequantize.

Private ops are looked up once, at first use. A missing or failing one (they can be renamed between
torch releases) makes autolm slower, never broken: the public fallback runs and a warning says so.
Checked on torch 2.13.0.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .attention import blocked_attention, grouped_attention

logger = logging.getLogger("autolm")
_UNSET = object()


class PrivateOp:
    """A `torch.ops` entry looked up by name on first use; None when this torch build lacks it."""

    def __init__(self, namespace: str, name: str):
        self.namespace, self.name, self._op = namespace, name, _UNSET

    def get(self):
        if self._op is _UNSET:
            try:
                packet = getattr(getattr(torch.ops, self.namespace), self.name)
                self._op = packet.default
            except (AttributeError, RuntimeError):
                self._op = None
                logger.warning(
                    "torch.ops.%s.%s is not in this torch build; using the slower public op",
                    self.namespace,
                    self.name,
                )
        return self._op

    def failed(self, error: Exception) -> None:
        """Stop using an op that raised (a changed signature, an unsupported build): fall back from now on."""
        logger.warning(
            "torch.ops.%s.%s failed (%s); using the slower public op from now on",
            self.namespace,
            self.name,
            error,
        )
        self._op = None


ONEDNN_LINEAR = PrivateOp("mkldnn", "_linear_pointwise")
INT8_MM = PrivateOp("aten", "_weight_int8pack_mm")
INT4_MM = PrivateOp("aten", "_weight_int4pack_mm_for_cpu")
INT4_PACK = PrivateOp("aten", "_convert_weight_to_int4pack_for_cpu")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not DTensor or other tensor subclasses


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (the CPU fast paths have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b, by the fastest kernel for these inputs (same arithmetic, another summation order)."""
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and x.shape[:-1].numel() <= 4:
            y = (x.float().unsqueeze(-2) * w.float()).sum(-1)
            return (y if b is None else y + b.float()).to(x.dtype)
        return F.linear(x, w, b)
    if (
        x.dtype is torch.float32
        and w.dtype is torch.float32
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and type(x) in _PLAIN
        and type(w) in _PLAIN
        and (b is None or type(b) in _PLAIN)
        and not needs_grad(x, w, b)
        and torch.backends.mkldnn.is_available()
    ):
        op = ONEDNN_LINEAR.get()
        if op is not None:
            try:
                return op(x, w, b, "none", [], "")
            except RuntimeError as e:
                ONEDNN_LINEAR.failed(e)
    return F.linear(x, w, b)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, weights: list | None = None
) -> torch.Tensor:
    """Attention of q (B, nh, T, hd) over k, v (B, n_kv, S, hd), n_kv dividing nh; mask a boolean
    (B, 1, T, S) or None for plain causal attention. Returns (B, T, nh, hd), the layout o_proj reads.
    With a `weights` list the eager path runs and appends its probabilities (B, nh, T, S)."""
    _B, nh, T, _hd = q.shape
    n_kv = k.shape[1]
    if weights is not None:
        return eager_attention(q, k, v, mask, weights)
    if T == 1 and mask is not None:
        return grouped_attention(q, k, v, mask)
    if T > 1 and q.dtype is torch.bfloat16 and q.device.type == "cpu" and not needs_grad(q, k, v):
        return blocked_attention(q, k, v, mask)
    if n_kv != nh:
        k, v = k.repeat_interleave(nh // n_kv, dim=1), v.repeat_interleave(nh // n_kv, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
    return y.transpose(1, 2)


def eager_attention(q, k, v, mask, weights: list) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v written out, as transformers' eager attention; appends the
    probabilities to `weights`."""
    nh, T, S = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != nh:
        k, v = k.repeat_interleave(nh // k.shape[1], dim=1), v.repeat_interleave(nh // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights.append(probs)
    return (probs @ v).transpose(1, 2)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) bf16 @ (q (N, K) int8 * scales (N,)).T with PyTorch's CPU kernel; None where it is missing."""
    op = INT8_MM.get() if x.device.type == "cpu" else None
    if op is not None:
        try:
            return op(x, q, scales)
        except RuntimeError as e:
            INT8_MM.failed(e)
    return None


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """x (M, K) bf16 @ an int4 weight in the CPU kernel's packed layout; None where the kernel is missing."""
    op = INT4_MM.get()
    if op is not None:
        try:
            return op(x, packed, group_size, scales_and_zeros)
        except RuntimeError as e:
            INT4_MM.failed(e)
    return None


def int4_pack(q: torch.Tensor) -> torch.Tensor | None:
    """q (N, K) int32 in 0..15 -> the CPU int4 kernel's packed layout; None where the kernel is missing."""
    op = INT4_PACK.get() if INT4_MM.get() is not None else None
    return op(q, 1) if op is not None else None


def one_row(module, dtype: torch.dtype):
    """For batch-1 decoding: a callable equal to `module.forward` on 2-D inputs (1, K) of `dtype`, with the
    per-call checks done once (dtype, device, which kernel, the private op's lookup); module.forward where
    no shortcut applies. The module's tensors are captured: build it again when they change."""
    make = getattr(module, "one_row_kernel", None)
    run = make(dtype) if make is not None else None
    if run is None:
        return module.forward
    op_entry, call = run

    def guarded(x: torch.Tensor) -> torch.Tensor:
        try:
            return call(x)
        except RuntimeError as e:  # a private op that fails: fall back for good
            op_entry.failed(e)
            return module.forward(x)

    return guarded


def linear_one_row(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype):
    """(op entry, call) for linear() on (1, K) inputs of `dtype`: oneDNN for fp32 on the CPU, else None."""
    op = (
        ONEDNN_LINEAR.get()
        if dtype is torch.float32
        and w.dtype is torch.float32
        and w.device.type == "cpu"
        and type(w) in _PLAIN
        and torch.backends.mkldnn.is_available()
        else None
    )
    return None if op is None else (ONEDNN_LINEAR, lambda x: op(x, w, b, "none", [], ""))


def int8_one_row(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype):
    """(op entry, call) for an int8 weight q * scales + offsets on (1, K) bf16 inputs on the CPU, else None."""
    op = (
        INT8_MM.get()
        if dtype is torch.bfloat16 and q.device.type == "cpu" and scales.dtype is dtype
        else None
    )
    if op is None or offsets.dtype is not dtype:
        return None
    return INT8_MM, lambda x: torch.addcmul(
        op(x, q, scales), x.sum(-1, keepdim=True, dtype=torch.float32).to(dtype), offsets
    )


def int4_one_row(packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor, dtype: torch.dtype):
    """(op entry, call) for a packed int4 weight on (1, K) bf16 inputs, else None."""
    op = INT4_MM.get() if dtype is torch.bfloat16 and scales_and_zeros.is_contiguous() else None
    if op is None:
        return None
    return INT4_MM, lambda x: op(x, packed, group_size, scales_and_zeros)


def linear_graph(w: torch.Tensor, b: torch.Tensor | None):
    """(tensors, fn) for linear() on (1, K) inputs inside a compiled graph (kernels.aot): fn(x, *tensors) is a
    multiply-and-sum, which inductor turns into one loop that streams the weight once."""

    def fn(x, w, b=None):
        y = (x.float().unsqueeze(-2) * w.float()).sum(-1)
        return (y if b is None else y + b.float()).to(x.dtype)

    return ((w,) if b is None else (w, b)), fn


def int8_graph(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None):
    """(tensors, fn) for an int8 weight q * scales + offsets (+ bias) inside a compiled graph, rounded as
    Int8Linear's eager path rounds (x in bf16, x @ (q * s) in bf16, then + sum(x) * offsets in x's dtype)."""

    def fn(x, q, scales, offsets, bias=None):
        xb = x.to(torch.bfloat16).float()
        y = ((xb.unsqueeze(-2) * q.float()).sum(-1) * scales.to(torch.bfloat16).float()).to(torch.bfloat16)
        total = x.float().sum(-1, keepdim=True).to(x.dtype)
        y = (y.to(x.dtype).float() + total.float() * offsets.to(x.dtype).float()).to(x.dtype)
        return y if bias is None else y + bias

    return (q, scales, offsets) + (() if bias is None else (bias,)), fn


def int4_graph(
    packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None
):
    """(tensors, fn) for a packed int4 weight (+ bias) inside a compiled graph (PyTorch's CPU kernel, called
    from the compiled code); None where the kernel is missing."""
    op = INT4_MM.get()
    if op is None:
        return None

    def fn(x, packed, scales_and_zeros, bias=None):
        y = op(x.to(torch.bfloat16), packed, group_size, scales_and_zeros).to(x.dtype)
        return y if bias is None else y + bias

    return (packed, scales_and_zeros) + (() if bias is None else (bias,)), fn


def concat_graph(kernels: list[tuple]):
    """(tensors, fn) of the concatenated outputs of several (tensors, fn) kernels on the same input."""
    counts = [len(t) for t, _ in kernels]

    def fn(x, *tensors):
        outs, start = [], 0
        for (_, f), n in zip(kernels, counts):
            outs.append(f(x, *tensors[start : start + n]))
            start += n
        return torch.cat(outs, -1)

    return tuple(t for ts, _ in kernels for t in ts), fn


__all__ = [
    "attention",
    "blocked_attention",
    "concat_graph",
    "grouped_attention",
    "int4_graph",
    "int4_matmul",
    "int4_one_row",
    "int4_pack",
    "int8_graph",
    "int8_matmul",
    "int8_one_row",
    "linear",
    "linear_graph",
    "linear_one_row",
    "needs_grad",
    "one_row",
]
