"""Falcon-H1 (TII's Falcon-H1 0.5B to 34B, base and instruct, and Falcon-H1R): every decoder layer runs attention
and a Mamba-2 mixer in parallel on the same normed input and adds both to the residual, then a gated MLP, with
the µP multipliers of its training:

    h = input_layernorm(x)
    x = x + mamba(h) * ssm_out_multiplier + self_attn(h * attention_in_multiplier) * attention_out_multiplier
    x = x + feed_forward(pre_ff_layernorm(x))

- The mixer is autolm.nn.mamba2's Mamba2Mixer (module `mamba`), `mamba_d_ssm` channels wide (mamba_expand *
  hidden_size where null); its input is scaled by `ssm_in_multiplier` and its in_proj output by the `mup_vector`
  (not a checkpoint tensor: the five `ssm_multipliers` over its gate, x, B, C and dt parts, made from the config). in_proj has a bias
  where `mamba_proj_bias`, out_proj where `projectors_bias`. Its output is y * silu(gate), or, where
  `mamba_rms_norm`, a gated RMSNorm over mamba_n_groups groups, of y * silu(gate) or (mamba_norm_before_gate) of y
  then times silu(gate).
- Attention: Llama's with RoPE, q/k/v/o biases where `attention_bias`, keys times `key_multiplier`.
- The MLP: down_proj(up_proj(x) * act(gate_proj(x) * mlp_multipliers[0])) * mlp_multipliers[1].
- The embeddings are scaled by embedding_multiplier, the logits by lm_head_multiplier; the final norm is
  `final_layernorm`.

GGUF (llama.cpp's "falcon-h1", as its FalconH1Model converter writes it: the multipliers folded into the weights)
in and out: models.falcon_h1_gguf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, GatedMLP, GGUFLayout, Linear, RMSNorm
from ..nn.mamba2 import GatedRMSNorm, Mamba2Mixer
from .base import LLAMA_TP, CausalLM, DecoderModel
from .falcon_h1_gguf import FOLDED, NO_LIMIT, FalconH1GGUF, derive, write_config
from .granitemoehybrid import GraniteMoeHybridConfig

_MULTIPLIERS = ("lm_head_multiplier", "embedding_multiplier", "key_multiplier", "attention_out_multiplier",
                "attention_in_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")  # fmt: skip


@dataclass(repr=False)
class FalconH1Config(PretrainedConfig):
    """transformers' FalconH1Config: its fields and defaults; mamba_d_head "auto" is mamba_d_ssm (or
    mamba_expand * hidden_size) / mamba_n_heads, written as the number, as transformers writes it."""

    model_type: ClassVar[str] = "falcon_h1"
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "sliding_window")  # not in transformers' config
    # GGUF out compares these its own way: the multipliers are folded into the weights (read back as 1), the
    # mixer's width through gguf_compared, the chunk size changes only the scan's rounding, write_config refuses a
    # clamp of the time steps and a norm before the gate
    gguf_not_compared: ClassVar[tuple[str, ...]] = (*FOLDED, "mamba_d_ssm", "mamba_expand", "mamba_chunk_size",
                                                    "time_step_limit", "mamba_norm_before_gate")  # fmt: skip
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "mamba_conv_bias",
        "mamba_proj_bias",
        "mamba_norm_before_gate",
        "mamba_rms_norm",
        "projectors_bias",
        "attention_bias",
        "mlp_bias",
    )

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: Any = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: Any = field(default_factory=lambda: [0.0, {"__float__": "Infinity"}])
    projectors_bias: bool = False
    lm_head_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    mlp_multipliers: Any = field(default_factory=lambda: [1.0, 1.0])
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    ssm_multipliers: Any = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        heads = self.mamba_n_heads
        if self.mamba_d_head == "auto" and _is_int(heads) and heads > 0 and _is_int(self.mamba_ssm_width):
            self.mamba_d_head = self.mamba_ssm_width // heads
        super().__post_init__()

    @property
    def mamba_ssm_width(self) -> Any:
        """The mixer's width: mamba_d_ssm, or mamba_expand * hidden_size where null."""
        if self.mamba_d_ssm is not None:
            return self.mamba_d_ssm
        return self.mamba_expand * self.hidden_size if _is_int(self.mamba_expand) else None

    step_limit = GraniteMoeHybridConfig.step_limit  # time_step_limit as two floats

    def gguf_compared(self) -> dict[str, Any]:
        return {"mixer width": self.mamba_ssm_width}

    def validate(self) -> None:
        super().validate()
        src = self.source
        positive_ints(self, ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size",
                             "mamba_d_head", "mamba_expand"), 1 << 16)  # fmt: skip
        width = self.mamba_ssm_width
        if not _is_int(width) or width < 1 or self.mamba_d_head * self.mamba_n_heads != width:
            raise ConfigError(f"{src}: mamba_d_head ({self.mamba_d_head}) times mamba_n_heads ({self.mamba_n_heads}) "
                              f"must be mamba_d_ssm (or mamba_expand * hidden_size), found {width!r}")  # fmt: skip
        if self.mamba_n_heads % self.mamba_n_groups or width % self.mamba_n_groups:
            raise ConfigError(f"{src}: mamba_n_groups ({self.mamba_n_groups}) must divide mamba_n_heads "
                              f"({self.mamba_n_heads})")  # fmt: skip
        self.step_limit()
        for name in _MULTIPLIERS:
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{src}: {name} must be a number, found {getattr(self, name)!r}")
        for name, n in (("mlp_multipliers", 2), ("ssm_multipliers", 5)):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != n or not all(map(_is_number, v)):
                raise ConfigError(f"{src}: {name} must be a list of {n} numbers, found {v!r}")


class FalconH1Norm(GatedRMSNorm):
    """The mixer's gated RMSNorm; with `before_gate` (mamba_norm_before_gate) norm(y) * silu(gate)."""

    def __init__(self, width: int, n_groups: int, eps: float, before_gate: bool):
        super().__init__(width, n_groups, eps)
        self.before_gate = before_gate

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if not self.before_gate:
            return super().forward(y, gate)
        dtype = y.dtype
        groups = y.float().view(*y.shape[:-1], -1, self.group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * groups.view(y.shape) * F.silu(gate.float())).to(dtype)


class FalconH1Mixer(Mamba2Mixer):
    """Mamba-2 with Falcon-H1's input multiplier and µP vector, out_proj's own bias switch."""

    def __init__(self, config: Any, layer_idx: int):
        c, h = config, config.hidden_size
        super().__init__(h, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups, c.mamba_d_conv,
                         c.mamba_chunk_size, layer_idx, eps=c.rms_norm_eps, conv_bias=c.mamba_conv_bias,
                         proj_bias=c.mamba_proj_bias, time_step_limit=c.step_limit(), act=c.hidden_act,
                         gated_norm=False)  # fmt: skip
        if c.mamba_rms_norm:
            self.norm = FalconH1Norm(self.intermediate_size, c.mamba_n_groups, c.rms_norm_eps,
                                     c.mamba_norm_before_gate)  # fmt: skip
        self.out_proj = Linear(self.intermediate_size, h, bias=c.projectors_bias)
        self.ssm_in_multiplier = float(c.ssm_in_multiplier)
        sizes = [self.intermediate_size, self.intermediate_size, c.mamba_n_groups * c.mamba_d_state,
                 c.mamba_n_groups * c.mamba_d_state, c.mamba_n_heads]  # fmt: skip
        self.mup = [(n, float(m)) for n, m in zip(sizes, c.ssm_multipliers)]  # transformers' mup_vector

    def project(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in_proj(x * self.ssm_in_multiplier)
        if all(m == 1.0 for _, m in self.mup):
            return y
        return y * torch.cat([y.new_full((n,), m) for n, m in self.mup])


class FalconH1Attention(Attention):
    """Llama's attention with the keys times key_multiplier."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return q, k * self.key_multiplier, v


class FalconH1MLP(GatedMLP):
    """down_proj(up_proj(x) * act(gate_proj(x) * gate_multiplier)) * down_multiplier."""

    def __init__(self, config: Any):
        super().__init__(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        )
        self.gate_multiplier, self.down_multiplier = (float(m) for m in config.mlp_multipliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up_proj(x) * self.act_fn(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(y) * self.down_multiplier


class FalconH1DecoderLayer(nn.Module):
    """Attention and Mamba-2 in parallel on one normed input, then the MLP (see the module docstring)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        c, h = config, config.hidden_size
        self.feed_forward = FalconH1MLP(c)
        self.mamba = FalconH1Mixer(c, layer_idx)
        self.self_attn = FalconH1Attention(h, c.num_attention_heads, c.num_key_value_heads, c.head_dim, layer_idx,
                                           bias=c.attention_bias)  # fmt: skip
        self.self_attn.key_multiplier = float(c.key_multiplier)
        self.attention_in_multiplier = float(c.attention_in_multiplier)
        self.ssm_out_multiplier = float(c.ssm_out_multiplier)
        self.attn_out_multiplier = float(c.attention_out_multiplier)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(h, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        m = self.mamba(h, ctx) * self.ssm_out_multiplier
        a = self.self_attn(h * self.attention_in_multiplier, ctx) * self.attn_out_multiplier
        x = x + (m + a)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class FalconH1Model(DecoderModel):
    """embed_tokens, layers, final_layernorm (`norm` names it, also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: FalconH1Config):
        super().__init__(config, FalconH1DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_multiplier = float(config.embedding_multiplier)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings times embedding_multiplier (given inputs_embeds are not scaled, as in transformers)."""
        return self.embed_tokens(input_ids) * self.embedding_multiplier


class FalconH1ForCausalLM(CausalLM):
    """transformers' FalconH1ForCausalLM."""

    config_class = FalconH1Config
    recurrent: ClassVar[bool] = True  # the Mamba-2 mixers' states: the general forward decodes
    # attention and the MLP split as Llama's (the mixers replicated on every rank)
    tp_patterns: ClassVar[dict[str, str]] = {
        k.replace(".mlp.", ".feed_forward."): v for k, v in LLAMA_TP.items()
    }
    _no_split_modules: ClassVar[list[str]] = ["FalconH1DecoderLayer"]
    checkpoint_rules = CheckpointRules([FalconH1GGUF()])
    # llama.cpp's FalconH1Model converter (models.falcon_h1_gguf); what its graph does not read fixed: biases
    # (but the conv's), another activation, a clamp of the time steps, the gated norm before the gate (the norm
    # itself where the file has ssm_norm)
    gguf = GGUFLayout(
        "falcon-h1",
        config=(
            ("ssm.conv_kernel", "mamba_d_conv"),
            ("ssm.state_size", "mamba_d_state"),
            ("ssm.group_count", "mamba_n_groups"),
            ("ssm.time_step_rank", "mamba_n_heads"),
            ("ssm.inner_size", "mamba_d_ssm"),
        ),
        layer=(
            ("ffn_norm", "pre_ff_layernorm"),
            ("ffn_gate", "feed_forward.gate_proj"),
            ("ffn_up", "feed_forward.up_proj"),
            ("ffn_down", "feed_forward.down_proj"),
            ("ssm_in", "mamba.in_proj"),
            ("ssm_out", "mamba.out_proj"),
            # MambaGGUF's pieces
            *((stem, f"mamba.{stem}") for stem in ("ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm")),
        ),
        top=(("output_norm", "model.final_layernorm"),),
        fixed=(
            ("hidden_act", "silu"),
            ("mamba_conv_bias", True),
            ("mamba_proj_bias", False),
            ("projectors_bias", False),
            ("attention_bias", False),
            ("mlp_bias", False),
            ("time_step_limit", NO_LIMIT),
            ("mamba_rms_norm", False),
            ("mamba_norm_before_gate", False),
        ),
        present=(("blk.0.ssm_norm.weight", "mamba_rms_norm"),),
        derive=derive,
        write_config=write_config,
        bare=("ssm_a", "ssm_d", "ffn_norm"),
    )

    def __init__(self, config: Any):
        super().__init__(config, FalconH1Model(config))
        self.lm_head_multiplier = float(config.lm_head_multiplier)
        self.checkpoint_rules = CheckpointRules([FalconH1GGUF(config)])  # GGUF out: the multipliers folded

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.lm_head_multiplier
