"""The Mamba-1 mixer (the selective scan) of Mamba, Falcon-Mamba and Jamba, with transformers' module and parameter
names: `in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj` (and Jamba's `dt_layernorm`,
`b_layernorm`, `c_layernorm`).

Per token t, with I = expand * hidden channels, each with its own N-wide state, and a rank-R time step:

    x, z = in_proj(u_t)                                the scan's input (I) and the gate (I)
    x = act(causal depthwise conv(x))                  over the last K inputs (the conv keeps the K-1 before t)
    dt, B, C = x_proj(x)                               R, N and N wide (Falcon-Mamba, Jamba: RMS-normed each)
    dt = softplus(dt_proj(dt)) (float32);  A = -exp(A_log)  (I, N)
    h_t = exp(dt * A) * h_{t-1} + (dt * x_t) B_t       per channel an N-wide state, float32
    y_t = h_t C_t + D * x_t
    out = out_proj(y_t * silu(z_t))

Unlike Mamba-2, A is a matrix (one decay per channel and state entry), so the scan runs the recurrence itself,
token after token (`selective_scan`), from the state the cache holds (any number of new tokens: the server
prefills long prompts in pieces, a user may continue from past_key_values), in blocks of tokens whose per-token
tensors it makes at once; one token after a state is `selective_step`, the same arithmetic. The cache keeps
(conv_state (B, I, K-1) in the model's dtype, ssm_state (B, I, N) in float32), as transformers'. Padding tokens
(a left-padded batch) have their inputs zeroed before in_proj and after the conv, as transformers does, so a
padded row's state is its unpadded one (where in_proj has a bias, `use_bias`, that bias still reaches the conv at
padding positions, in transformers too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .causal_conv import causal_conv1d
from .linear import Linear
from .mlp import ACTIVATIONS
from .norms import RMSNorm

SCAN_BLOCK = 128  # tokens whose discretized A and B (b, block, I, N) exist at once


def selective_step(x, dt, A, B, C, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence in float32: x and dt (b, I), A (I, N), B and C (b, N), state (b, I, N) ->
    y (b, I) (without the D skip), the new state."""
    state = torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B[:, None, :]
    return torch.einsum("bin,bn->bi", state, C), state


def selective_scan(x, dt, A, B, C, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over t tokens in float32: x and dt (b, t, I), A (I, N), B and C (b, t, N), state (b, I, N)
    before the first token or None (zeros) -> y (b, t, I) (without the D skip), the state after the last token.
    Token by token, as selective_step computes it, in blocks of SCAN_BLOCK tokens."""
    b, t, width = x.shape
    if state is None:
        state = x.new_zeros(b, width, A.shape[-1])
    ys = []
    for start in range(0, t, SCAN_BLOCK):
        part = slice(start, start + SCAN_BLOCK)
        decay = torch.exp(dt[:, part, :, None] * A)  # (b, l, I, N)
        inputs = (dt[:, part] * x[:, part])[..., None] * B[:, part, None, :]  # (b, l, I, N)
        states = []
        for i in range(decay.shape[1]):
            state = decay[:, i] * state + inputs[:, i]
            states.append(state)
        ys.append(torch.einsum("blin,bln->bli", torch.stack(states, 1), C[:, part]))
    return torch.cat(ys, 1), state


def weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight, in float32, back in x's dtype (Falcon-Mamba's norms of dt, B and C)."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MambaMixer(nn.Module):
    """transformers' MambaMixer (FalconMambaMixer, JambaMambaMixer): `forward(x, ctx)` over a general forward's
    context (T >= 1 new tokens, the state in its cache). `bcdt_norm`: None (Mamba), "weightless" (Falcon-Mamba's
    RMS norms of dt, B and C without weights) or "weighted" (Jamba's dt_layernorm, b_layernorm, c_layernorm)."""

    def __init__(self, hidden: int, intermediate: int, d_state: int, d_conv: int, dt_rank: int, layer_idx: int, *,
                 conv_bias: bool = True, proj_bias: bool = False, act: str = "silu", bcdt_norm: str | None = None,
                 norm_eps: float = 1e-6):  # fmt: skip
        super().__init__()
        self.layer_idx, self.intermediate_size, self.ssm_state_size = layer_idx, intermediate, d_state
        self.conv_kernel_size, self.time_step_rank = d_conv, dt_rank
        self.act = ACTIVATIONS[act]
        self.bcdt_norm, self.norm_eps = bcdt_norm, norm_eps
        self.in_proj = Linear(hidden, 2 * intermediate, bias=proj_bias)
        # in_proj's bias reaches the conv at padding positions: a padded row's state is not its own (serve.rows)
        self.rows_apart = proj_bias
        self.conv1d = nn.Conv1d(intermediate, intermediate, d_conv, groups=intermediate, padding=d_conv - 1,
                                bias=conv_bias)  # fmt: skip
        self.x_proj = Linear(intermediate, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(dt_rank, intermediate, bias=True)
        A = torch.arange(1, d_state + 1, dtype=torch.float32)[None, :].expand(intermediate, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(intermediate))
        self.out_proj = Linear(intermediate, hidden, bias=proj_bias)
        if bcdt_norm == "weighted":
            self.dt_layernorm = RMSNorm(dt_rank, norm_eps)
            self.b_layernorm = RMSNorm(d_state, norm_eps)
            self.c_layernorm = RMSNorm(d_state, norm_eps)

    def conv(self, xs: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal depthwise conv and its activation: xs (b, t, I) after the K-1 inputs of conv_state
        (b, I, K-1), or zeros -> (output (b, t, I), the last K-1 inputs)."""
        y, state = causal_conv1d(xs.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state)
        return self.act(y).to(xs.dtype).transpose(1, 2), state

    def normed(self, dt, B, C) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (b, t, R), B and C (b, t, N) as the family norms them before the scan."""
        if self.bcdt_norm == "weighted":
            return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        if self.bcdt_norm == "weightless":
            return tuple(weightless_rms(v, self.norm_eps) for v in (dt, B, C))
        return dt, B, C

    def time_step(self, dt: torch.Tensor) -> torch.Tensor:
        """(b, t, R) -> float32 (b, t, I) before softplus: as transformers, dt_proj's weight in the model's dtype
        and its bias added in float32 (a quantized dt_proj: the module with its bias)."""
        proj = self.dt_proj
        if type(proj) is Linear:
            return kernels.linear(dt, proj.weight).float() + proj.bias.float()
        return proj(dt).float()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x (b, t, hidden) -> (b, t, hidden); the state after the new tokens goes to ctx's cache."""
        t = x.shape[1]
        N, R = self.ssm_state_size, self.time_step_rank
        real = ctx.real_tokens()  # (b, t) or None
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        xs, gate = self.in_proj(x).chunk(2, dim=-1)  # (b, t, I) each
        state = ctx.state(self.layer_idx)
        conv_state, ssm_state = (None, None) if state is None else state
        xs, conv_state = self.conv(xs, conv_state)
        if real is not None:
            xs = xs * real[..., None].to(xs.dtype)
        dt, B, C = self.normed(*self.x_proj(xs).split([R, N, N], dim=-1))
        dt = F.softplus(self.time_step(dt))  # (b, t, I) float32
        A = -torch.exp(self.A_log.float())  # (I, N)
        xf, B, C = xs.float(), B.float(), C.float()
        if ssm_state is not None and t == 1:
            y, ssm_state = selective_step(xf[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)
            y = y[:, None]
        else:
            y, ssm_state = selective_scan(xf, dt, A, B, C, ssm_state)
        ctx.keep_state(self.layer_idx, (conv_state, ssm_state))
        y = (y + xf * self.D.float()) * F.silu(gate.float())  # the skip, the gate: (b, t, I)
        return self.out_proj(y.to(x.dtype))
