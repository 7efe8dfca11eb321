"""Linear layers behind autolm's kernel dispatch, and modules that read one input computed as one matmul.

`packed(x, modules)` is how a model computes q/k/v or gate/up: where the modules' weights are consecutive
views of one tensor (`fuse` makes them so, without changing names, state dicts or memory), one matmul gives
all outputs; otherwise, and under autograd, hooks or a compiler, each module runs as it is.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .. import kernels


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through autolm's kernel dispatch (same arithmetic, faster kernels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)

    @classmethod
    def concat(cls, modules: list[Linear], copy: bool = True) -> Linear | None:
        """One Linear computing the concatenated outputs of `modules` (see fuse); with copy=False only where
        their tensors already are consecutive views of one tensor."""
        if len({m.bias is None for m in modules}) != 1 or not shareable(modules, ["weight", "bias"]):
            return None
        weight = share_concatenated(modules, "weight", copy=copy)
        bias = None if modules[0].bias is None else share_concatenated(modules, "bias", copy=copy)
        if weight is None or (modules[0].bias is not None and bias is None):
            return None
        fused = cls(modules[0].in_features, weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first module -> (signature, fused or None)


def _signature(modules: Sequence[nn.Module]) -> tuple:
    """What a fused module depends on: the modules and where their tensors live."""
    return tuple(
        (
            id(m),
            *(t.data_ptr() for t in m._parameters.values() if t is not None),
            *(t.data_ptr() for t in m._buffers.values() if t is not None),
        )
        for m in modules
    )


def _hooked(modules: Sequence[nn.Module]) -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules
    )


def _trains(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """Whether autograd records this call: the fused tensor is a plain tensor that carries no gradient."""
    return x.requires_grad or any(
        p.requires_grad for m in modules for p in m._parameters.values() if p is not None
    )


def packed(x: torch.Tensor, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The outputs of modules that read the same input x (q/k/v, gate/up): one matmul where their weights are
    consecutive views of one tensor, else one call each (also under autograd, hooks and compilers)."""
    if torch.compiler.is_compiling() or _hooked(modules) or (torch.is_grad_enabled() and _trains(x, modules)):
        return [m(x) for m in modules]
    cls = type(modules[0])
    if not hasattr(cls, "concat") or any(type(m) is not cls for m in modules):
        return [m(x) for m in modules]
    sig = _signature(modules)
    cached = _PACKED.get(modules[0])
    if cached is None or cached[0] != sig:
        cached = (sig, cls.concat(list(modules), copy=False))
        _PACKED[modules[0]] = cached
    if cached[1] is None:
        return [m(x) for m in modules]
    return list(cached[1](x).split([m.out_features for m in modules], -1))


def fuse(modules: Sequence[nn.Module]) -> bool:
    """Lay the tensors of `modules` (same class, same input) out as consecutive views of one tensor, so that
    packed() computes them in one matmul. Names, values, parameter objects and state dicts are unchanged; a
    copy is made once (none where they already are). Returns whether they are fused."""
    cls = type(modules[0])
    if len(modules) < 2 or not hasattr(cls, "concat") or any(type(m) is not cls for m in modules):
        return False
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: autograd must accept them later
        return cls.concat(list(modules), copy=True) is not None


def shareable(modules: list[nn.Module], names: list[str]) -> bool:
    """Whether these tensors of `modules` are plain tensors of one dtype on one device (so they can be fused)."""
    tensors = [getattr(m, n) for m in modules for n in names if getattr(m, n, None) is not None]
    return (
        all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        and len({(t.dtype, t.device) for t in tensors}) == 1
        and tensors[0].device.type != "meta"
    )


def share_concatenated(
    modules: list[nn.Module], name: str, dim: int = 0, copy: bool = True
) -> torch.Tensor | None:
    """Concatenate the tensor `name` of each module along dim, then make each module's tensor a view of the
    result (a Parameter keeps its identity: its .data is replaced)."""
    parts = [getattr(m, name) for m in modules]
    fused = _adjacent(parts, dim)
    if fused is not None or not copy:  # fused before: the parts already are views of it
        return fused
    fused = torch.cat([t.detach() for t in parts], dim)
    start = 0
    for m, t in zip(modules, parts):
        view = fused.narrow(dim, start, t.shape[dim])
        if isinstance(t, nn.Parameter):
            t.data = view
        else:
            setattr(m, name, view)
        start += t.shape[dim]
    return fused


def _adjacent(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The contiguous tensor the parts are consecutive views of along dim (what torch.cat would give, without
    copying), or None where they are not."""
    first = parts[0]
    start = 0
    for t in parts:
        others = t.shape[:dim] + t.shape[dim + 1 :]
        if (
            t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.dtype != first.dtype
            or t.stride() != first.stride()
            or others != first.shape[:dim] + first.shape[dim + 1 :]
            or t.storage_offset() != first.storage_offset() + start * first.stride(dim)
        ):
            return None
        start += t.shape[dim]
    shape = list(first.shape)
    shape[dim] = start  # ends where the last part ends, inside the storage
    fused = first.detach().as_strided(shape, first.stride(), first.storage_offset())
    return fused if fused.is_contiguous() else None


def embedding(num: int, dim: int) -> nn.Embedding:
    if torch.get_default_device().type == "meta":
        # Weights come from the checkpoint; skipping normal_() on meta saves ~1 s of first-call setup.
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def resized_rows(old: torch.Tensor, n: int, mean_resizing: bool = True, std: float = 0.02) -> torch.Tensor:
    """`old` (vocab, dim) cut or grown to n rows, as transformers resizes embeddings: added rows are drawn
    from a normal with the old rows' mean and 1e-9 times their covariance (the mean itself when that is
    not positive definite), or from N(0, std) without mean_resizing."""
    new = old.new_empty(n, old.shape[1])
    keep = min(n, old.shape[0])
    new[:keep] = old[:keep]
    added = n - keep
    if added > 0:
        w = old.detach().float()
        if mean_resizing:
            mean = w.mean(0)
            cov = 1e-9 * (w - mean).T @ (w - mean) / w.shape[0]
            if torch.distributions.constraints.positive_definite.check(cov).all():
                rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((added,))
            else:
                rows = mean.expand(added, -1)
        else:
            rows = torch.randn(added, old.shape[1], device=old.device) * std
        new[keep:] = rows.to(old.dtype)
    return new


def resize_bias(head: nn.Module, bias: torch.Tensor | None, n: int, mean: bool) -> None:
    """Give `head` (whose vocabulary was resized to n) its bias from before the resizing, `bias`, cut or grown to n
    entries as transformers resizes a head's bias: added entries the old entries' mean where `mean`, else zeros."""
    if bias is None or (head.bias is not None and head.bias.shape[0] == n):
        return
    keep = min(n, bias.shape[0])
    with torch.no_grad():
        new = bias.new_zeros(n)
        new[:keep] = bias[:keep]
        if mean and n > keep:
            new[keep:] = bias.float().mean().to(bias.dtype)
    head.bias = nn.Parameter(new, requires_grad=bias.requires_grad)
    head.out_features = n
