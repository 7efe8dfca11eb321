"""xLSTM (NX-AI/xLSTM-7b): every block an mLSTM layer (matrix memory) under an RMS norm, then a gated feed-forward
under another; no attention, no position embeddings. transformers' names: the body `backbone` (`embeddings`,
`blocks`, `out_norm`), each block `norm_mlstm`, `mlstm_layer`, `norm_ffn`, `ffn`.

- The mLSTM layer: q, k (qk_dim = int(hidden_size * qk_dim_factor)), v and the output gate's pre-activation
  (v_dim = int(hidden_size * v_dim_factor)), per head an input gate i and a forget gate f (biased always), both
  soft-capped at gate_soft_cap (cap * tanh(x / cap)). weight_mode "single": q, k, v, ogate_preact, igate_preact,
  fgate_preact; "fused": one `qkv_opreact` (q, k, v, o) and one `ifgate_preact` (i, then f, capped together).
- Per head the memory C (dqk x dv), the normalizer n (dqk) and the stabilizer m, in float32:
      m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
      C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise with k_t)
      h_t = (q_t C_t) / (max(|q_t . n_t|, exp(-m_t)) + eps),   q scaled by dqk ** -0.5
  `mlstm_step` is this for one token; `mlstm_chunked` computes the same over many tokens, chunk_size at a time
  (within a chunk the decays as a masked matrix, as transformers' chunkwise kernel; between chunks the state),
  from the cache's state. transformers runs its chunkwise kernel over whole chunks and the step over the rest:
  the same function, equal within float32 rounding. The kernel choices (chunkwise_kernel, sequence_kernel,
  step_kernel, mode, autocast_kernel_dtype, max_inference_chunksize) are read and kept, not used.
- Then a multi-head LayerNorm (`multihead_norm`, per head, without bias unless use_bias) of h, times
  sigmoid(o), through `out_proj`. Norms reduce in float32 where norm_reduction_force_float32; the block norms
  and the multi-head norm carry biases where use_bias (`out_norm` never does; it is applied whatever
  add_out_norm says, as in transformers).
- The feed-forward: proj_down(silu(proj_up_gate(x)) * proj_up(x)) (fused: `proj_up_gate_z`, gate first), its width
  hidden_size * ffn_proj_factor rounded up to ffn_round_up_to_multiple_of.
- Logits in float32, soft-capped at output_logit_soft_cap.
- The cache keeps each layer's (C, n, m) in float32 (transformers': in the model's dtype). Padding tokens (a
  left-padded batch) get i = -inf and no decay, so they leave the state as it was and a left-padded row gives
  its unpadded logits; transformers ignores attention_mask (its padded rows differ from its unpadded ones):
  autolm's equal transformers' on unpadded rows.

llama.cpp has no xLSTM architecture: no GGUF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Linear
from .base import CausalLM, DecoderModel
from .gemma2 import softcap

# fields of autolm's common config that xLSTM's config.json does not have
NOT_XLSTM = ("num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "hidden_act",
             "attention_dropout", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling", "intermediate_size")  # fmt: skip
NO_WINDOW = 1 << 28  # max_position_embeddings: no context window
MODES = ("train", "train_with_padding", "inference")
WEIGHT_MODES = ("single", "fused")


def round_up(x: float, multiple: int) -> int:
    """transformers' round_up_to_next_multiple_of (x a float: hidden_size times a factor)."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass(repr=False)
class xLSTMConfig(PretrainedConfig):
    """transformers' xLSTMConfig and its defaults; embedding_dim and num_blocks follow hidden_size and
    num_hidden_layers (each set from the other where null); attention fields are autolm's placeholders."""

    model_type: ClassVar[str] = "xlstm"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "norm_eps"}
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "use_bias", "add_out_norm",
                                              "norm_reduction_force_float32", "return_last_states")  # fmt: skip

    vocab_size: int = 50304
    hidden_size: int = 4096
    embedding_dim: int | None = None
    num_hidden_layers: int = 32
    num_blocks: int | None = None
    num_heads: int = 8
    use_bias: bool = False
    norm_reduction_force_float32: bool = True
    tie_word_embeddings: bool = False
    add_out_norm: bool = True
    rms_norm_eps: float = 1e-6
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    chunkwise_kernel: str = "chunkwise--native_autograd"
    sequence_kernel: str = "native_sequence__native"
    step_kernel: str = "native"
    mode: str = "inference"
    chunk_size: int = 64
    return_last_states: bool = True
    autocast_kernel_dtype: str = "bfloat16"
    eps: float = 1e-6
    inference_state_dtype: str = "float32"
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    weight_mode: str = "single"
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    max_inference_chunksize: int = 16384
    max_position_embeddings: int = NO_WINDOW

    def __post_init__(self) -> None:
        self.num_attention_heads = self.num_key_value_heads = self.head_dim = 1  # no attention
        self.embedding_dim = self.hidden_size if self.embedding_dim is None else self.embedding_dim
        self.num_blocks = self.num_hidden_layers if self.num_blocks is None else self.num_blocks
        sizes = (self.hidden_size, self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)
        if all(_is_number(v) and v > 0 for v in sizes) and _is_int(sizes[2]):
            self.intermediate_size = self.ffn_width  # the feed-forward's width
        super().__post_init__()

    @property
    def qk_dim(self) -> int:
        return int(self.hidden_size * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.hidden_size * self.v_dim_factor)

    @property
    def ffn_width(self) -> int:
        return round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no attention, no RoPE

    def validate(self) -> None:
        super().validate()
        src = self.source
        positive_ints(self, ("num_heads", "chunk_size", "ffn_round_up_to_multiple_of", "max_inference_chunksize"), 1 <<
                             24)  # fmt: skip
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "eps"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 < v <= 1 << 10:
                raise ConfigError(f"{src}: {name} must be a positive number, found {v!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v > 0):
                raise ConfigError(f"{src}: {name} must be a positive number or null, found {v!r}")
        for name, dim in (("qk_dim_factor", self.qk_dim), ("v_dim_factor", self.v_dim)):
            if dim <= 0 or dim % self.num_heads:
                raise ConfigError(f"{src}: {name} gives a width of {dim} (hidden_size {self.hidden_size} times "
                                  f"{getattr(self, name)}), not a positive multiple of num_heads ({self.num_heads})")  # fmt: skip
        self._check_choices(src)

    def _check_choices(self, src: str) -> None:
        """The string fields, and the fields that must agree with others."""
        for name, allowed in (
            ("weight_mode", WEIGHT_MODES),
            ("mode", MODES),
            ("inference_state_dtype", ("float32",)),
        ):
            if getattr(self, name) not in allowed:
                note = "; autolm keeps the states in float32" if name == "inference_state_dtype" else ""
                raise ConfigError(f"{src}: {name} {getattr(self, name)!r} is not supported (expected one of "
                                  f"{allowed}{note})")  # fmt: skip
        for name in ("chunkwise_kernel", "sequence_kernel", "step_kernel", "autocast_kernel_dtype"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{src}: {name} must be a string, found {getattr(self, name)!r}")
        for name, same in (("embedding_dim", "hidden_size"), ("num_blocks", "num_hidden_layers")):
            if getattr(self, name) != getattr(self, same):
                raise ConfigError(f"{src}: {name} ({getattr(self, name)!r}) must equal {same} "
                                  f"({getattr(self, same)!r})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_XLSTM:
            out.pop(key, None)
        return out


def mlstm_step(q, k, v, i, logf, state, eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One token of the recurrence in float32: q, k (b, nh, dqk), v (b, nh, dv), i and logsigmoid(f) (b, nh, 1),
    state (C (b, nh, dqk, dv), n (b, nh, dqk), m (b, nh, 1)) -> h (b, nh, dv), the new state."""
    C, n, m = state
    m_new = torch.maximum(logf + m, i)
    decay, gain = torch.exp(logf + m - m_new), torch.exp(i - m_new)
    C = decay[..., None] * C + gain[..., None] * (k[..., :, None] * v[..., None, :])
    n = decay * n + gain * k
    q = q * q.shape[-1] ** -0.5
    num = (q[..., None, :] @ C).squeeze(-2)
    den = (q * n).sum(-1, keepdim=True)
    return num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps), (C, n, m_new)


def mlstm_chunked(
    q, k, v, i, logf, state, chunk: int, eps: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The recurrence over t tokens, `chunk` at a time, in float32: q, k (b, nh, t, dqk), v (b, nh, t, dv), i and
    logsigmoid(f) (b, nh, t), state as mlstm_step's -> h (b, nh, t, dv), the state after the last token."""
    C, n, m = state
    m = m[..., 0]  # (b, nh)
    scale, outs = q.shape[-1] ** -0.5, []
    for s in range(0, q.shape[2], chunk):
        qc, kc, vc, ic, fc = q[:, :, s : s + chunk], k[:, :, s : s + chunk], v[:, :, s : s + chunk], i[..., s : s + chunk], logf[..., s : s + chunk]  # fmt: skip
        L = qc.shape[2]
        b = fc.cumsum(-1)  # the decay from the chunk's start through each token
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        log_d = (b[..., :, None] - b[..., None, :] + ic[..., None, :]).masked_fill(~causal, -math.inf)
        m_inter = b + m[..., None]  # the chunk's incoming state, decayed to each token
        m_all = torch.maximum(m_inter, log_d.amax(-1))
        scores = (qc @ kc.transpose(-2, -1)) * scale * torch.exp(log_d - m_all[..., None])
        q_in = qc * (torch.exp(m_inter - m_all) * scale)[..., None]
        num = q_in @ C + scores @ vc
        den = q_in @ n[..., None] + scores.sum(-1, keepdim=True)
        outs.append(num / (torch.maximum(den.abs(), torch.exp(-m_all)[..., None]) + eps))
        a = b[..., -1:] - b + ic  # each token's input, decayed to the chunk's end
        m_next = torch.maximum(b[..., -1] + m, a.amax(-1))
        k_in = kc * torch.exp(a - m_next[..., None])[..., None]
        decay = torch.exp(b[..., -1] + m - m_next)
        C = decay[..., None, None] * C + k_in.transpose(-2, -1) @ vc
        n = decay[..., None] * n + k_in.sum(-2)
        m = m_next
    return torch.cat(outs, 2), (C, n, m[..., None])


class xLSTMRMSNorm(nn.Module):
    """RMS norm over the last dimension (in float32 where `fp32`), back in x's dtype, times the weight, plus the
    bias where there is one."""

    def __init__(self, dim: int, eps: float, bias: bool = False, fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps, self.fp32 = eps, fp32

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.fp32 else x
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.normalize(x) * self.weight
        return y if self.bias is None else y + self.bias


class xLSTMMultiHeadLayerNorm(xLSTMRMSNorm):
    """A LayerNorm over each head's last dimension (population variance): (b, t, nh, d) -> (b, t, nh * d), then
    one weight (and bias) over all heads."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.fp32 else x
        y = (y - y.mean(-1, keepdim=True)) * torch.rsqrt(y.var(-1, keepdim=True, unbiased=False) + self.eps)
        return y.to(x.dtype).flatten(-2)


class xLSTMLayer(nn.Module):
    """The mLSTM layer: projections, capped gates, the recurrence (its state in the cache), the multi-head norm,
    the output gate and out_proj."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, bias, nh = config.hidden_size, config.use_bias, config.num_heads
        self.layer_idx, self.num_heads, self.fused = layer_idx, nh, config.weight_mode == "fused"
        self.qk_dim, self.v_dim = config.qk_dim, config.v_dim
        self.gate_soft_cap, self.chunk_size, self.eps = config.gate_soft_cap, config.chunk_size, config.eps
        if self.fused:
            self.qkv_opreact = Linear(h, 2 * self.qk_dim + 2 * self.v_dim, bias=bias)
            self.ifgate_preact = Linear(h, 2 * nh, bias=True)
        else:
            self.q, self.k = Linear(h, self.qk_dim, bias=bias), Linear(h, self.qk_dim, bias=bias)
            self.v, self.ogate_preact = Linear(h, self.v_dim, bias=bias), Linear(h, self.v_dim, bias=bias)
            self.igate_preact, self.fgate_preact = Linear(h, nh, bias=True), Linear(h, nh, bias=True)
        self.multihead_norm = xLSTMMultiHeadLayerNorm(self.v_dim, config.rms_norm_eps, bias,
                                                      config.norm_reduction_force_float32)  # fmt: skip
        self.out_proj = Linear(self.v_dim, h, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (b, t, h) -> q, k, v, the output gate's pre-activation, the capped i and f (b, t, nh)."""
        if self.fused:
            q, k, v, o = self.qkv_opreact(x).split([self.qk_dim, self.qk_dim, self.v_dim, self.v_dim], -1)
            i, f = softcap(self.ifgate_preact(x), self.gate_soft_cap).split(self.num_heads, -1)
            return q, k, v, o, i, f
        i, f = (softcap(g(x), self.gate_soft_cap) for g in (self.igate_preact, self.fgate_preact))
        return self.q(x), self.k(x), self.v(x), self.ogate_preact(x), i, f

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v, o, i, f = self.project(x)
        q, k, v = (z.reshape(b, t, self.num_heads, -1).transpose(1, 2).float() for z in (q, k, v))
        i, logf = i.transpose(1, 2).float(), F.logsigmoid(f.transpose(1, 2).float())  # (b, nh, t)
        real = ctx.real_tokens()
        if real is not None:  # padding: no input and no decay, the state stays as it was
            pad = ~real.bool()[:, None, :]
            i, logf = i.masked_fill(pad, -math.inf), logf.masked_fill(pad, 0.0)
        state = ctx.state(self.layer_idx)
        if state is None:
            dqk, dv = q.shape[-1], v.shape[-1]
            state = (q.new_zeros(b, self.num_heads, dqk, dv), q.new_zeros(b, self.num_heads, dqk),
                     q.new_zeros(b, self.num_heads, 1))  # fmt: skip
        if t == 1:
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i, logf, state, self.eps)
            h = h[:, :, None]
        else:
            h, state = mlstm_chunked(q, k, v, i, logf, state, self.chunk_size, self.eps)
        ctx.keep_state(self.layer_idx, state)
        h = self.multihead_norm(h.transpose(1, 2).to(x.dtype))  # (b, t, v_dim)
        return self.out_proj(torch.sigmoid(o) * h)


class xLSTMFeedForward(nn.Module):
    """proj_down(silu(gate) * up): gate and up from proj_up_gate and proj_up, or both from proj_up_gate_z."""

    def __init__(self, config: Any):
        super().__init__()
        h, width, bias = config.hidden_size, config.ffn_width, config.use_bias
        self.fused, self.up_proj_dim = config.weight_mode == "fused", width
        if self.fused:
            self.proj_up_gate_z = Linear(h, 2 * width, bias=bias)
        else:
            self.proj_up_gate, self.proj_up = Linear(h, width, bias=bias), Linear(h, width, bias=bias)
        self.proj_down = Linear(width, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.proj_up_gate_z(x).split(self.up_proj_dim, -1)
        else:
            gate, up = self.proj_up_gate(x), self.proj_up(x)
        return self.proj_down(F.silu(gate) * up)


class xLSTMBlock(nn.Module):
    """x + mlstm_layer(norm_mlstm(x)), then x + ffn(norm_ffn(x))."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, bias, fp32 = (
            config.hidden_size,
            config.rms_norm_eps,
            config.use_bias,
            config.norm_reduction_force_float32,
        )
        self.norm_mlstm = xLSTMRMSNorm(h, eps, bias, fp32)
        self.mlstm_layer = xLSTMLayer(config, layer_idx)
        self.norm_ffn = xLSTMRMSNorm(h, eps, bias, fp32)
        self.ffn = xLSTMFeedForward(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.mlstm_layer(self.norm_mlstm(x), ctx)
        return x + self.ffn(self.norm_ffn(x))


class xLSTMModel(DecoderModel):
    """embeddings, blocks, out_norm; `embed_tokens`, `layers` and `norm` name them (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {
        "embed_tokens": "embeddings",
        "layers": "blocks",
        "norm": "out_norm",
    }

    def __init__(self, config: Any):
        super().__init__(config, xLSTMBlock, xLSTMRMSNorm(config.hidden_size, config.rms_norm_eps))


class xLSTMForCausalLM(CausalLM):
    """transformers' xLSTMForCausalLM."""

    config_class = xLSTMConfig
    recurrent: ClassVar[bool] = True  # the mLSTM states: the general forward decodes
    base_model_prefix = "backbone"
    layers_prefix = "backbone.blocks"
    embeddings_name = "backbone.embeddings"
    tp_patterns: ClassVar[dict[str, str]] = {}  # no attention: the layers run whole on every rank
    _no_split_modules: ClassVar[list[str]] = ["xLSTMBlock"]

    def __init__(self, config: Any):
        super().__init__(config, xLSTMModel(config))
        self.output_logit_soft_cap = config.output_logit_soft_cap  # a setting of the compiled head's graph

    @property
    def model(self) -> xLSTMModel:
        """The body (`backbone`), by the name autolm's code uses in every family."""
        return self.backbone

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """In float32 (as transformers returns them), soft-capped."""
        return softcap(logits.float(), self.output_logit_soft_cap)
