"""Normalisation layers with transformers' arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, normalised in fp32 as transformers does (F.rms_norm without a weight is its
    x * rsqrt(mean(x^2) + eps) exactly, in one call instead of five). Where the weight comes in differs by family:

    - Llama (default): cast back to the input dtype, then times the weight;
    - `weight_in_fp32` (OLMo 2): times the weight in fp32, then cast back;
    - `offset=1.0` (Gemma): times (1 + weight) in fp32, then cast back; the weight starts at zero.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.weight_in_fp32 = eps, offset, weight_in_fp32 or bool(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = kernels.rms_norm(x, self.eps)
        if not self.weight_in_fp32:
            return self.weight * normed.to(x.dtype)
        w = self.weight.float()
        return (normed * (w + self.offset if self.offset else w)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")
