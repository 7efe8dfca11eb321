"""The causal depthwise convolution of the recurrent layers (LFM2's short convolutions, Mamba-1 and Mamba-2,
Gated DeltaNet): each channel convolved over its last K inputs, continuing from the previous piece's last K - 1
inputs, which the cache keeps as the layer's conv state."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T) after `state` (B, C, K - 1), the previous inputs (None: zeros), through the depthwise weight
    (C, 1, K) and bias (C,) or None -> (the convolution (B, C, T) in the weight's dtype, the last K - 1 inputs
    (B, C, K - 1) in x's dtype: the next piece's state; a copy, so the cache does not keep the whole input)."""
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    full = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K - 1 + T)
    y = F.conv1d(full.to(weight.dtype), weight, bias, groups=x.shape[1])  # (B, C, T)
    return y, full[:, :, full.shape[-1] - (K - 1) :].clone()
