"""transformers' Conv1D (GPT-2): a linear layer whose weight is stored transposed, (in_features, out_features).

It is a `Linear` so that everything that finds a model's linear layers finds it (LoRA targets, int8/int4
quantization), and it keeps the checkpoint's shape and name, so state dicts and saved files are what
transformers writes. Code that needs the (out, in) matrix of any linear layer reads it through `out_in`;
`fan_in_fan_out` is peft's name for a weight stored this way (peft sets it on the LoRA config of a Conv1D
target, and merges the transposed delta).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear


class Conv1D(Linear):
    """y = x @ weight + bias, weight (nx, nf): transformers' `Conv1D(nf, nx)` (nf outputs, nx inputs)."""

    fan_in_fan_out = True

    def __init__(self, nf: int, nx: int, bias: bool = True, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear's: its weight would be (out, in)
        self.in_features, self.out_features = nx, nf
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)  # transformers' initialisation of a new Conv1D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight
        # transformers' arithmetic: one addmm over the rows (B * T, nx) @ (nx, nf)
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    @classmethod
    def concat(cls, modules: list[Linear], copy: bool = True) -> None:
        """Conv1D layers are not packed by `packed`/`fuse` (GPT-2 already stores q/k/v as one c_attn)."""
        return None

    def extra_repr(self) -> str:
        return f"nf={self.out_features}, nx={self.in_features}, bias={self.bias is not None}"


def out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight as an (out_features, in_features) matrix: transposed for a Conv1D."""
    return weight.t() if getattr(module, "fan_in_fan_out", False) else weight
