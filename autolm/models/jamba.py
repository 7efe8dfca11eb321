"""Jamba (AI21's Jamba-v0.1, Jamba 1.5 Mini / Large): decoder layers that are Mamba-1 mixers or attention layers,
each followed by a feed-forward part that is a dense SiLU-gated MLP or a sparse mixture of experts.

- Layer i is attention where i % attn_layer_period == attn_layer_offset, else a Mamba-1 mixer (module `mamba`:
  autolm.nn.mamba1's MambaMixer with Jamba's RMS norms, with weights, of the time step, B and C: `dt_layernorm`,
  `b_layernorm`, `c_layernorm`, epsilon rms_norm_eps); its conv and scan states live in the cache.
- Attention (`self_attn`): grouped-query attention with no biases and no position embedding at all (position comes
  from the Mamba layers).
- The feed-forward part (`feed_forward`) of layer i is the mixture where i % expert_layer_period ==
  expert_layer_offset and num_experts > 1: the softmax over the router's logits in float32, the top
  num_experts_per_tok of it, not renormalised; each expert a SiLU-gated MLP. Elsewhere a dense gated MLP.
- Pre-norm residual blocks (`input_layernorm`, `pre_ff_layernorm`), the final norm `final_layernorm`, an untied
  head by default.

Checkpoints hold one tensor per expert (`feed_forward.experts.N.gate_proj`, ...); the model holds them stacked.
GGUF in and out as llama.cpp's converter writes Jamba ("jamba"): models.jamba_gguf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Experts, GatedMLP, RMSNorm, Router, SparseMoeBlock
from ..nn.mamba1 import MambaMixer
from . import jamba_gguf
from .base import CausalLM, DecoderModel
from .mamba import MambaGGUF
from .mixtral import MOE_TP, validate_experts
from .qwen2_moe import QWEN_MOE_RULES

_NOT_JAMBA = ("rope_parameters", "rope_theta", "rope_scaling")  # fields Jamba's config.json does not have


@dataclass(repr=False)
class JambaConfig(PretrainedConfig):
    """transformers' JambaConfig and its defaults (`num_local_experts` is another name of num_experts)."""

    model_type: ClassVar[str] = "jamba"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "sliding_window")  # written when set
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "mamba_conv_bias",
        "mamba_proj_bias",
    )
    # GGUF out compares the layer kinds, not the periods and offsets (models.jamba_gguf)
    gguf_not_compared: ClassVar[tuple[str, ...]] = jamba_gguf.NOT_COMPARED

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 262144
    pad_token_id: int | None = 0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Any = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False

    def __post_init__(self) -> None:
        if self.mamba_dt_rank == "auto" and _is_int(self.hidden_size):
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__()

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # no position embedding

    def is_attention(self, i: int) -> bool:
        return i % self.attn_layer_period == self.attn_layer_offset

    def has_experts(self, i: int) -> bool:
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    def gguf_compared(self) -> dict[str, Any]:
        return jamba_gguf.compared(self)

    def validate(self) -> None:
        src = self.source
        positive_ints(self, ("attn_layer_period", "expert_layer_period", "mamba_d_state", "mamba_d_conv",
                             "mamba_expand", "mamba_dt_rank"), 1 << 16)  # fmt: skip
        for name, period in (
            ("attn_layer_offset", "attn_layer_period"),
            ("expert_layer_offset", "expert_layer_period"),
        ):
            v, p = getattr(self, name), getattr(self, period)
            if not _is_int(v) or not 0 <= v < p:
                raise ConfigError(f"{src}: {name} must be an integer in [0, {period} = {p}), found {v!r}")
        super().validate()
        validate_experts(self, self.num_experts, self.num_experts_per_tok)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_JAMBA:
            out.pop(key, None)
        return out


class JambaDecoderLayer(nn.Module):
    """Pre-norm mixer (`mamba` or `self_attn`), then the pre-norm feed-forward part (`feed_forward`)."""

    def __init__(self, config: JambaConfig, layer_idx: int):
        super().__init__()
        c, h = config, config.hidden_size
        if c.is_attention(layer_idx):
            self.self_attn = Attention(h, c.num_attention_heads, c.num_key_value_heads, c.head_dim, layer_idx,
                                       rope=None)  # fmt: skip
        else:
            self.mamba = MambaMixer(h, c.mamba_expand * h, c.mamba_d_state, c.mamba_d_conv, c.mamba_dt_rank,
                                    layer_idx, conv_bias=c.mamba_conv_bias, proj_bias=c.mamba_proj_bias,
                                    act=c.hidden_act, bcdt_norm="weighted", norm_eps=c.rms_norm_eps)  # fmt: skip
        if c.has_experts(layer_idx):
            router = Router(h, c.num_experts, c.num_experts_per_tok, normalize=False)
            experts = Experts(c.num_experts, h, c.intermediate_size, c.hidden_act)
            self.feed_forward = SparseMoeBlock(router, experts, router_name="router")
        else:
            self.feed_forward = GatedMLP(h, c.intermediate_size, c.hidden_act)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(h, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        mixer = self.mamba if hasattr(self, "mamba") else self.self_attn
        x = x + mixer(self.input_layernorm(x), ctx)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class JambaModel(DecoderModel):
    """embed_tokens, layers, final_layernorm; `norm` names final_layernorm (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: JambaConfig):
        super().__init__(config, JambaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class JambaForCausalLM(CausalLM):
    """transformers' JambaForCausalLM."""

    config_class = JambaConfig
    recurrent: ClassVar[bool] = True  # the Mamba layers' states: the general forward decodes
    # one tensor per expert on disk, stacked in the model; llama.cpp's A, D and conv of the Mamba mixers
    checkpoint_rules = CheckpointRules([*QWEN_MOE_RULES.rules, MambaGGUF("mamba")])
    gguf = jamba_gguf.LAYOUT  # llama.cpp's JambaModel converter
    # attention and the dense MLPs split as Llama's, the experts cut their own intermediate rows; the Mamba mixers
    # are replicated on every rank
    tp_patterns: ClassVar[dict[str, str]] = {
        **MOE_TP,
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["JambaDecoderLayer"]

    def __init__(self, config: JambaConfig):
        super().__init__(config, JambaModel(config))
