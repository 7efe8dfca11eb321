"""The Mamba-2 mixer (state-space duality, SSD) of the hybrid families, with transformers' module and parameter
names: `in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm` (a gated RMSNorm over `n_groups` groups) and
`out_proj`.

Per token t, with H heads of P channels each and an N-wide state per head (heads share their B and C within
one of G groups):

    z, xBC, dt = in_proj(x_t)                      the gate (H*P), the conv's input (H*P + 2*G*N), one dt per head
    x, B, C = silu(causal depthwise conv(xBC))     over the last K inputs (the conv keeps the K-1 before t)
    dt = clamp(softplus(dt + dt_bias), time_step_limit);  A = -exp(A_log)
    h_t = exp(dt * A) * h_{t-1} + dt * x_t B_t^T   (per head: a P x N state, float32)
    y_t = h_t C_t + D * x_t
    out = out_proj(gated_rms_norm(y_t, z_t))       norm(y * silu(z)) within each group, times the weight

A forward of T tokens runs the chunked form (`ssd_scan`): within chunks of `chunk_size` tokens the recurrence
is a masked matrix product; across chunks the states are carried by the recurrence itself, starting from the
state the cache holds (any T: the server prefills long prompts in pieces, a user may continue from
past_key_values). One token after a state takes the recurrence directly (`ssd_step`); both agree (dt is
clamped to time_step_limit in both, where transformers' one-token path leaves it unclamped: the same for the
default (0, inf)). The cache
keeps (conv_state (B, conv_dim, K-1) in the model's dtype, ssm_state (B, H, P, N) in float32), as transformers'
does. Padding tokens (a left-padded batch) have their inputs zeroed before in_proj and after the conv, as
transformers does, so a padded row's state is its unpadded one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .causal_conv import causal_conv1d
from .linear import Linear
from .mlp import ACTIVATIONS


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(gate) in float32 over each of `n_groups` equal groups of the channels, times `weight`
    (transformers' MambaRMSNormGated with group_size = width / n_groups)."""

    def __init__(self, width: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.eps = width // n_groups, eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """y, gate (..., width) -> float32 (..., width) unless the weight is wider."""
        dtype = y.dtype
        y = y.float() * F.silu(gate.float())
        groups = y.view(*y.shape[:-1], -1, self.group_size)  # (..., G, width / G)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.view(y.shape).to(dtype)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a (..., L) -> (..., L, L): out[..., i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf
    above it; exp() of it is the decay from position j to position i. Cumulative sums of masked copies rather
    than differences of one cumulative sum, which lose precision."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [..., k, j] = a[k]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(a.masked_fill(~below, 0), dim=-2)  # [..., i, j] = sum of a[k] for j < k <= i
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk: int, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan (without the D skip), in float32.

    x (b, t, h, p), dt (b, t, h) (after softplus), A (h,), B and C (b, t, h, n) (one copy per head),
    state (b, h, p, n) before the first token or None (zeros) -> y (b, t, h, p), the state after the last token.
    The sequence is padded with dt = 0 (no decay, no input) to whole chunks of `chunk` tokens; letters in the
    einsums: c chunk, l and s positions in a chunk, z a source chunk.
    """
    b, t, h, p = x.shape
    pad = (-t) % chunk

    def chunks(v: torch.Tensor) -> torch.Tensor:  # (b, t, ...) -> (b, c, l, ...)
        v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
        return v.view(b, -1, chunk, *v.shape[2:])

    xdt = chunks(x * dt[..., None])  # the discretized input dt * x
    a = chunks(dt * A).permute(0, 3, 1, 2)  # (b, h, c, l): log of each step's decay
    B, C = chunks(B), chunks(C)
    a_cum = torch.cumsum(a, dim=-1)  # (b, h, c, l)

    # 1. within each chunk: y_l = sum over s <= l of (C_l . B_s) decay(s -> l) xdt_s
    decay = torch.exp(segment_sum(a))  # (b, h, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end: sum over l of decay(l -> end) xdt_l B_l^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    B_decayed = B * to_end.permute(0, 2, 3, 1)[..., None]
    own = torch.einsum("bclhn,bclhp->bchpn", B_decayed, xdt)  # (b, c, h, p, n)

    # 3. across chunks: the state at each chunk's start, from the initial state and the chunks before
    start = torch.zeros_like(own[:, :1]) if state is None else state[:, None].to(own)
    own = torch.cat([start, own], dim=1)  # (b, c + 1, h, p, n)
    across = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c + 1, c + 1): chunk z -> chunk c
    states = torch.einsum("bhcz,bzhpn->bchpn", across, own)
    states, final = states[:, :-1], states[:, -1]

    # 4. what each chunk's start state gives its positions: C_l . state, decayed to l
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).reshape(b, -1, h, p)[:, :t]
    return y, final


def ssd_step(x, dt, A, B, C, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence in float32: x (b, h, p), dt (b, h), A (h,), B and C (b, h, n), state
    (b, h, p, n) -> y (b, h, p) (without the D skip), the new state."""
    state = state * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


class Mamba2Mixer(nn.Module):
    """transformers' Mamba-2 mixer (GraniteMoeHybridMambaLayer, BambaMixer, NemotronHMamba2Mixer): `forward(x,
    ctx)` over a general forward's context (T >= 1 new tokens, the state in its cache)."""

    def __init__(self, hidden: int, n_heads: int, head_dim: int, d_state: int, n_groups: int, d_conv: int,
                 chunk_size: int, layer_idx: int, *, eps: float = 1e-6, conv_bias: bool = True,
                 proj_bias: bool = False, time_step_limit=(0.0, float("inf")), act: str = "silu",
                 gated_norm: bool = True):  # fmt: skip
        super().__init__()
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, n_heads, head_dim
        self.ssm_state_size, self.n_groups, self.chunk_size = d_state, n_groups, chunk_size
        self.conv_kernel_size = d_conv
        self.intermediate_size = n_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * d_state
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.act = ACTIVATIONS[act]
        self.in_proj = Linear(hidden, self.intermediate_size + self.conv_dim + n_heads, bias=proj_bias)
        # in_proj's bias reaches the conv at padding positions: a padded row's state is not its own (serve.rows)
        self.rows_apart = proj_bias
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias)  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(n_heads))
        if gated_norm:  # else (Falcon-H1's mamba_rms_norm=False) y * silu(z), no norm
            self.norm = GatedRMSNorm(self.intermediate_size, n_groups, eps)
        self.out_proj = Linear(self.intermediate_size, hidden, bias=proj_bias)

    def conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal depthwise conv and its activation: xBC (b, t, conv_dim) after the K-1 inputs of conv_state
        (b, conv_dim, K-1), or zeros -> (output (b, t, conv_dim), the last K-1 inputs)."""
        y, state = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state)
        return self.act(y).to(xBC.dtype).transpose(1, 2), state

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x (b, t, hidden) -> (b, t, hidden); the state after the new tokens goes to ctx's cache."""
        b, t, _ = x.shape
        H, P, N, G = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
        real = ctx.real_tokens()  # (b, t) or None
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        gate, xBC, dt = self.project(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        state = ctx.state(self.layer_idx)
        conv_state, ssm_state = (None, None) if state is None else state
        xBC, conv_state = self.conv(xBC, conv_state)
        if real is not None:
            xBC = xBC * real[..., None].to(xBC.dtype)
        xs, B, C = xBC.split([self.intermediate_size, G * N, G * N], dim=-1)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(*self.time_step_limit).float()  # (b, t, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        xs = xs.reshape(b, t, H, P).float()
        # each group's B and C serve H / G consecutive heads
        B = B.reshape(b, t, G, N).float().repeat_interleave(H // G, dim=2)  # (b, t, H, N)
        C = C.reshape(b, t, G, N).float().repeat_interleave(H // G, dim=2)
        if ssm_state is not None and t == 1:
            y, ssm_state = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)
            y = y[:, None]
        else:
            y, ssm_state = ssd_scan(xs, dt, A, B, C, self.chunk_size, ssm_state)
        y = y + xs * self.D.float()[:, None]  # the skip, (b, t, H, P)
        ctx.keep_state(self.layer_idx, (conv_state, ssm_state))
        y = y.reshape(b, t, -1)
        y = self.norm(y, gate) if hasattr(self, "norm") else y * F.silu(gate.float())
        return self.out_proj(y.to(x.dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(b, t, hidden) -> (b, t, gate | xBC | dt): in_proj (where a family scales the projection, Falcon-H1's
        multipliers, it overrides this)."""
        return self.in_proj(x)
