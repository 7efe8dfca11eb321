"""Feed-forward blocks: the gated MLP of most families and the plain two-layer MLP; activations by their
config names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, packed


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation, as PyTorch computes it (transformers' gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GeLU, written out as transformers' NewGELUActivation computes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """transformers' FastGELUActivation."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2, transformers' ReLUSquaredActivation ("relu2": Arcee, Nemotron)."""
    return torch.square(F.relu(x))


# config.json's activation names -> the function (transformers' ACT2FN entries the supported families use)
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "relu": F.relu,
    "relu2": relu_squared,
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with transformers' names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)


class MLP(nn.Module):
    """down(act(up(x))), no gate, with transformers' names (up_proj, down_proj): Arcee's and Nemotron's MLP."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))
