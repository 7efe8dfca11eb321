"""Zamba (Zyphra's Zamba-7B-v1): a stack of multi-head Mamba-1 layers, some of which ("hybrid" in
`layers_block_type`) first run the one shared transformer block, as Zamba2 (autolm.models.zamba2) does:

    mamba layer:   x = x + mamba(input_layernorm(x))
    hybrid layer:  t = linear(shared_transf(x, e))                      e: the input embeddings, unchanged
                   x = x + mamba(input_layernorm(x + t))                 (module `mamba_decoder`)
    shared block:  h = self_attn(input_layernorm(cat(x, e)))             width 2 * hidden_size, back through o_proj
                   t = feed_forward(pre_ff_layernorm(h))                 no residual inside the block

- The mixer is Mamba-1 (autolm.nn.mamba1's scan) in `n_mamba_heads` heads of P = mamba_expand * hidden_size /
  n_mamba_heads channels, each head a Mamba-1 mixer of its own over its channels: in_proj's output interleaves the
  scan's input and the gate (channel c of each at 2c and 2c + 1); one causal depthwise conv (bias where
  `mamba_conv_bias`) and `hidden_mamba_act`; per head x_proj_weight (H, R + 2N, P) gives dt, B and C, and
  dt_proj_weight (H, P, R) with dt_proj_bias (H, P) the time steps (softplus); A_log (H, P, N), D (H, P). The
  heads fold into the batch of mamba1's scan; the state is (B, H, P, N) in float32. in_proj and out_proj have
  biases where `mamba_proj_bias`. R = mamba_dt_rank ("auto": ceil(hidden_size / 16)).
- Layers 0 and 1 are Mamba layers, layer 2 hybrid, and layer i >= 3 hybrid where (i - 3) % attn_layer_period ==
  attn_layer_offset (transformers' pattern) unless config.json lists `layers_block_type`.
- The shared block (`shared_transf`): attention over 2 * hidden_size in `num_attention_heads` heads of
  `attention_head_dim` (2 * hidden_size / heads), scores scaled by (head size / 2) ** -0.5, no RoPE, no biases;
  a SiLU/GELU-gated MLP with gate_proj, up_proj and down_proj. Every hybrid layer holds it; as transformers 5 ties
  them (where `tie_word_embeddings`), the later uses hold the first's parameters and checkpoints hold it once, under
  its first user (autolm.models.zamba2's tying). No adapters.
- The head is tied by default. The cache holds the hybrid layers' keys and values and every layer's conv and scan
  states. llama.cpp has no Zamba architecture: no GGUF layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, Linear, RMSNorm
from ..nn.causal_conv import causal_conv1d
from ..nn.mamba1 import selective_scan, selective_step
from .base import DecoderModel
from .zamba2 import MAMBA, Zamba2ForCausalLM, Zamba2Model

HYBRID = "hybrid"
_NOT_ZAMBA = ("rope_parameters", "rope_theta", "rope_scaling", "sliding_window")  # not in Zamba's config.json


@dataclass(repr=False)
class ZambaConfig(PretrainedConfig):
    """transformers' ZambaConfig and its defaults (`attention_head_dim` is head_dim)."""

    model_type: ClassVar[str] = "zamba"
    attribute_map: ClassVar[dict[str, str]] = {"head_dim": "attention_head_dim"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "use_mamba_kernels",
                                              "use_associative_scan", "mamba_conv_bias", "mamba_proj_bias")  # fmt: skip
    num_mem_blocks: ClassVar[int] = 1  # one shared block (Zamba2's tying reads it)

    vocab_size: int = 32000
    tie_word_embeddings: bool = True
    hidden_size: int = 3712
    attention_hidden_size: int | None = None
    intermediate_size: int = 14848
    num_hidden_layers: int = 76
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    n_mamba_heads: int = 2
    hidden_act: str = "gelu"
    hidden_mamba_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    max_position_embeddings: int = 4096
    attn_layer_period: int = 6
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Any = "auto"
    use_associative_scan: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    layers_block_type: list[str] | None = None

    def __post_init__(self) -> None:
        h, heads, n = self.hidden_size, self.num_attention_heads, self.num_hidden_layers
        if self.attention_hidden_size is None and _is_int(h):
            self.attention_hidden_size = 2 * h
        if self.head_dim is None and _is_int(h) and _is_int(heads) and heads > 0:
            self.head_dim = 2 * h // heads
        if self.mamba_dt_rank == "auto" and _is_int(h):
            self.mamba_dt_rank = math.ceil(h / 16)
        if self.layers_block_type is None and all(
            map(_is_int, (n, self.attn_layer_period, self.attn_layer_offset))
        ):
            p, o = self.attn_layer_period, self.attn_layer_offset
            rest = [HYBRID if p and i % p == o else "linear_attention" for i in range(n - 3)]
            self.layers_block_type = ["linear_attention", "linear_attention", HYBRID, *rest]
        super().__post_init__()

    @property
    def hybrid_layer_ids(self) -> list[int]:
        """The layers that run the shared block, in order."""
        return [i for i, kind in enumerate(self.layers_block_type) if kind == HYBRID]

    @property
    def mamba_head_dim(self) -> int:
        return self.mamba_expand * self.hidden_size // self.n_mamba_heads

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no position embedding

    def validate(self) -> None:
        src, kinds = self.source, self.layers_block_type
        super().validate()
        positive_ints(self, ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "n_mamba_heads",
                             "attn_layer_period", "num_logits_to_keep", "head_dim"), 1 << 16)  # fmt: skip
        if not (isinstance(kinds, list) and len(kinds) == self.num_hidden_layers
                and all(k in (*MAMBA, HYBRID) for k in kinds)):  # fmt: skip
            raise ConfigError(f"{src}: layers_block_type must list {self.num_hidden_layers} entries, each 'mamba', "
                              f"'linear_attention' or 'hybrid', found {str(kinds)[:200]}")  # fmt: skip
        if self.attention_hidden_size != 2 * self.hidden_size:
            raise ConfigError(f"{src}: attention_hidden_size must be 2 * hidden_size ({2 * self.hidden_size}: the "
                              f"layer's input and the embeddings), found {self.attention_hidden_size!r}")  # fmt: skip
        if (self.mamba_expand * self.hidden_size) % self.n_mamba_heads:
            raise ConfigError(f"{src}: n_mamba_heads ({self.n_mamba_heads}) must divide mamba_expand * hidden_size "
                              f"({self.mamba_expand * self.hidden_size})")  # fmt: skip
        if self.hidden_mamba_act not in ACTIVATIONS:
            raise ConfigError(f"{src}: hidden_mamba_act {self.hidden_mamba_act!r} is not supported "
                              f"(expected one of {tuple(ACTIVATIONS)})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_ZAMBA:
            out.pop(key, None)
        return out


class ZambaMambaMixer(nn.Module):
    """transformers' ZambaMambaMixer: Mamba-1 in `n_mamba_heads` heads (see the module docstring)."""

    def __init__(self, config: ZambaConfig, layer_idx: int):
        super().__init__()
        c = config
        width, H, R, N = c.mamba_expand * c.hidden_size, c.n_mamba_heads, c.mamba_dt_rank, c.mamba_d_state
        P = width // H
        self.layer_idx, self.n_mamba_heads, self.mamba_head_dim = layer_idx, H, P
        self.ssm_state_size, self.time_step_rank, self.conv_kernel_size = N, R, c.mamba_d_conv
        self.act = ACTIVATIONS[c.hidden_mamba_act]
        self.conv1d = nn.Conv1d(width, width, c.mamba_d_conv, groups=width, padding=c.mamba_d_conv - 1,
                                bias=c.mamba_conv_bias)  # fmt: skip
        self.in_proj = Linear(c.hidden_size, 2 * width, bias=c.mamba_proj_bias)
        # in_proj's bias reaches the conv at padding positions: a padded row's state is not its own (serve.rows)
        self.rows_apart = c.mamba_proj_bias
        self.x_proj_weight = nn.Parameter(torch.zeros(H, R + 2 * N, P))
        self.dt_proj_weight = nn.Parameter(torch.full((H, P, R), -1.0 / R**0.5))
        self.dt_proj_bias = nn.Parameter(torch.zeros(H, P))
        A = torch.arange(1, N + 1, dtype=torch.float32)[None, :].expand(width, -1)
        self.A_log = nn.Parameter(torch.log(A).reshape(H, P, N))
        self.D = nn.Parameter(torch.ones(H, P))
        self.out_proj = Linear(width, c.hidden_size, bias=c.mamba_proj_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """x (b, t, hidden) -> (b, t, hidden); the state after the new tokens goes to ctx's cache."""
        b, t, _ = x.shape
        H, P, N, R = self.n_mamba_heads, self.mamba_head_dim, self.ssm_state_size, self.time_step_rank
        real = ctx.real_tokens()  # (b, t) or None
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        xs, gate = self.in_proj(x).unflatten(-1, (-1, 2)).unbind(-1)  # interleaved: (b, t, I) each
        state = ctx.state(self.layer_idx)
        conv_state, ssm_state = (None, None) if state is None else state
        y, conv_state = causal_conv1d(xs.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state)
        xs = self.act(y).to(x.dtype).transpose(1, 2)
        if real is not None:
            xs = xs * real[..., None].to(xs.dtype)
        xs = xs.unflatten(-1, (H, P))  # (b, t, H, P)
        dt, B, C = torch.einsum("hkp,bthp->bthk", self.x_proj_weight, xs).split([R, N, N], dim=-1)
        dt = torch.einsum("hpr,bthr->bthp", self.dt_proj_weight, dt).float() + self.dt_proj_bias.float()
        # the heads fold into the batch: (b, t, H, ...) -> (b * H, t, ...), A (b * H, P, N)
        xf, dt, B, C = (v.float().transpose(1, 2).flatten(0, 1) for v in (xs, F.softplus(dt), B, C))
        A = (-torch.exp(self.A_log.float())).expand(b, H, P, N).flatten(0, 1)
        ssm_state = None if ssm_state is None else ssm_state.flatten(0, 1)
        if ssm_state is not None and t == 1:
            y, ssm_state = selective_step(xf[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state)
            y = y[:, None]
        else:
            y, ssm_state = selective_scan(xf, dt, A[:, None], B, C, ssm_state)  # A per row: (b * H, 1, P, N)
        ctx.keep_state(self.layer_idx, (conv_state, ssm_state.unflatten(0, (b, H))))
        y = (y + xf * self.D.float().repeat(b, 1)[:, None]).unflatten(0, (b, H))  # the skip: (b, H, t, P)
        y = y.transpose(1, 2).flatten(2) * F.silu(gate.float())
        return self.out_proj(y.to(x.dtype))


class ZambaAttention(Attention):
    """Attention over the concatenated 2 * hidden_size input, o_proj back to hidden_size, no RoPE; the keys and
    values of hybrid layer `layer_idx` in the cache."""

    def __init__(self, config: ZambaConfig, layer_idx: int):
        h, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        super().__init__(
            2 * h, heads, config.num_key_value_heads, hd, layer_idx, scale=(hd / 2) ** -0.5, rope=None
        )
        self.o_proj = Linear(heads * hd, h, bias=False)


class ZambaAttentionDecoderLayer(nn.Module):
    """The shared transformer block as hybrid layer `layer_idx` uses it (see the module docstring)."""

    def __init__(self, config: ZambaConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = ZambaAttention(config, layer_idx)
        self.feed_forward = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(2 * h, eps)
        self.pre_ff_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor, ctx) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(torch.cat([x, embeddings], dim=-1)), ctx)
        return self.feed_forward(self.pre_ff_layernorm(h))


class ZambaMambaDecoderLayer(nn.Module):
    """x + mamba(input_layernorm(x + t)), t the shared block's contribution (none in a plain Mamba layer)."""

    def __init__(self, config: ZambaConfig, layer_idx: int):
        super().__init__()
        self.mamba = ZambaMambaMixer(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx, shared: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mamba(self.input_layernorm(x if shared is None else x + shared), ctx)


class ZambaHybridLayer(nn.Module):
    """The shared block (`shared_transf`), `linear` into the residual width, then the Mamba layer (`mamba_decoder`)
    over the input plus that."""

    def __init__(self, config: ZambaConfig, layer_idx: int):
        super().__init__()
        self.shared_transf = ZambaAttentionDecoderLayer(config, layer_idx)
        self.linear = Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mamba_decoder = ZambaMambaDecoderLayer(config, layer_idx)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        shared = self.linear(self.shared_transf(x, ctx.embeddings, ctx))
        return self.mamba_decoder(x, ctx, shared)


def make_layer(config: ZambaConfig, i: int) -> nn.Module:
    return (ZambaHybridLayer if config.layers_block_type[i] == HYBRID else ZambaMambaDecoderLayer)(config, i)


class ZambaModel(Zamba2Model):
    """embed_tokens, layers, final_layernorm; the embeddings reach the hybrid layers as in Zamba2."""

    def __init__(self, config: ZambaConfig):
        DecoderModel.__init__(self, config, make_layer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class ZambaForCausalLM(Zamba2ForCausalLM):
    """transformers' ZambaForCausalLM: Zamba2's tying of the shared block's uses, under `shared_transf`."""

    config_class = ZambaConfig
    _no_split_modules: ClassVar[list[str]] = ["ZambaHybridLayer", "ZambaMambaDecoderLayer"]
    shared_name: ClassVar[str] = "shared_transf"

    def __init__(self, config: ZambaConfig):
        super().__init__(config, ZambaModel(config))
