"""The kernels' shared pieces: private ops looked up once, the autograd check, fp32 linear layers and the
matrix-vector form used inside compiled graphs."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from . import native

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

    def call(self, *args):
        """The op's result, or None where it is missing or fails (then never tried again)."""
        op = self.get()
        if op is None:
            return None
        try:
            return op(*args)
        except RuntimeError as e:
            self.failed(e)
            return None


ONEDNN_LINEAR = PrivateOp("mkldnn", "_linear_pointwise")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not DTensor or other tensor subclasses
# While a graph is traced for ahead-of-time compiling: (the matmul inputs collected, whether its rows are many)
_TRACING: list[tuple[list, bool]] = []


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dimension in fp32 (F.rms_norm of x.float()): eagerly on the CPU
    one call of autolm's C++ kernel where it is built (PyTorch's composite dispatches five ops). Under autocast
    F.rms_norm, which autocast runs in its lower precision, as transformers' norm does."""
    if eager_cpu(x) and native.ready():
        return native.rms_norm(x, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """RoPE of x (B, H, T, hd) by autolm's C++ kernel (one call for six PyTorch ops, the same rounding) where it
    takes it: eagerly on the CPU, the library built; else None (nn.rope computes it)."""
    if x.dim() == 4 and x.stride(-1) == 1 and cos.dtype == x.dtype and eager_cpu(x) and native.ready():
        return native.rotary(x, cos, sin)
    return None


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether an op on x may take one of autolm's eager CPU kernels: on the CPU, outside compilers, autograd and
    autocast (whose casts those kernels do not make)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not needs_grad(x)
        and not torch.is_autocast_enabled("cpu")
    )


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (the CPU fast paths have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@contextlib.contextmanager
def realized_inputs(batched: bool = False):
    """While a graph is traced for ahead-of-time compiling: collect the input of every one-row matmul inside (a
    graph that returns them makes inductor write each once, where it would otherwise recompute it — a norm,
    an activation — inside the matrix-vector loop, once per output row). `batched`: the graph's rows are a
    dynamic number of sequences, so matmuls stay matrix products (the weights read once for all rows)."""
    _TRACING.append(([], batched))
    try:
        yield _TRACING[-1][0]
    finally:
        _TRACING.pop()


def batched_graph() -> bool:
    """Whether the graph being traced runs many rows (see realized_inputs)."""
    return bool(_TRACING) and _TRACING[-1][1] and torch.compiler.is_compiling()


def realize(x: torch.Tensor) -> torch.Tensor:
    """Mark a matmul input to be written once inside a compiled graph (see realized_inputs)."""
    if _TRACING and torch.compiler.is_compiling():
        _TRACING[-1][0].append(x)
    return x


def matvec(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b as multiply-and-sum in fp32: inside a compiler, one loop that streams w once."""
    y = (realize(x).float().unsqueeze(-2) * w.float()).sum(-1)
    return (y if b is None else y + b.float()).to(x.dtype)


@functools.cache
def mkl_leads() -> bool:
    """Whether F.linear's fp32 kernel (MKL's sgemm) is the faster one on this CPU: on Intel's it is (a Xeon: equal
    to oneDNN's at 512 rows, 1.5-5x at one to four rows: 3.7 against 19.9 us for one row of 1024 x 32), on AMD's
    it runs at half oneDNN's speed (a Zen 5: 150-200 against 360-450 GFLOP/s at 512 rows); elsewhere (no MKL, other
    vendors) oneDNN, as measured on the AMD CPU."""
    return torch.backends.mkl.is_available() and native.cpu_info("vendor_id") == "GenuineIntel"


# multiply-adds below which oneDNN's fp32 matmul costs more to set up than MKL's whole product: on an AMD Zen 4, one
# row of 1024 x 32 (a router) 4.2x F.linear's time, of 576 x 576 1.3x, of 1536 x 576 0.84x, 2 rows of 576 x 576 0.88x
ONEDNN_FROM = 1 << 19


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b, by the fastest kernel for these inputs (same arithmetic, another summation order): fp32 on a
    CPU on oneDNN's matmul unless MKL's leads there (mkl_leads) or the product is small (ONEDNN_FROM)."""
    if torch.compiler.is_compiling():
        if x.device.type == "cpu" and not batched_graph() and x.shape[:-1].numel() <= 4:
            return matvec(x, w, b)
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
        and not torch.is_autocast_enabled("cpu")  # autocast: F.linear, in its dtype (as transformers)
        and torch.backends.mkldnn.is_available()
        and not mkl_leads()
        and x.shape[:-1].numel() * w.numel() >= ONEDNN_FROM
    ):
        y = ONEDNN_LINEAR.call(x, w, b, "none", [], "")
        if y is not None:
            return y
    return F.linear(x, w, b)
