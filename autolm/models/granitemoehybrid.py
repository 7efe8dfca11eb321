"""Granite 4.0 hybrid (IBM's granite-4.0-h-micro, -h-tiny, -h-small and the dense granite-4.0-micro): decoder
layers that are Mamba-2 mixers or attention layers as `layer_types` lists them ("mamba" / "attention", or
transformers 5's "linear_attention" / "full_attention"), each followed by a feed-forward part, with Granite's
four multipliers (embeddings, residual branches, attention scale, logits).

- The mixer is autolm.nn.mamba2's Mamba2Mixer (module `mamba`): its conv and state-space state live in the cache.
- Attention has RoPE only when `position_embedding_type` is "rope" (the released hybrids have none: position
  comes from the Mamba layers), scaled by attention_multiplier.
- The feed-forward part is the shared MLP (`shared_mlp`: one `input_linear` giving gate then up, an
  `output_linear`; shared_intermediate_size wide) plus, where num_local_experts > 0, Granite MoE's sparse block
  (`block_sparse_moe`, softmax over the top-k router logits) added to it; dense checkpoints have no experts.

Checkpoints keep the experts under JetMoE's names (`input_linear`, `output_linear`, `router.layer`), as Granite
MoE's do. GGUF (llama.cpp's "granitehybrid", as its converter writes it) in and out: models.granitemoehybrid_gguf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import (
    ACTIVATIONS,
    Attention,
    CheckpointRules,
    Experts,
    GGUFLayout,
    Linear,
    RMSNorm,
    Router,
    SparseMoeBlock,
)
from ..nn.expert_formats import GGUFExperts
from ..nn.mamba2 import Mamba2Mixer
from .base import CausalLM, DecoderModel
from .granite import GraniteConfig, GraniteForCausalLM, GraniteModel
from .granitemoe import GraniteMoeForCausalLM, _renamed
from .granitemoehybrid_gguf import MambaGGUF, derive, write_config
from .mixtral import MOE_TP, validate_experts

MAMBA = ("mamba", "linear_attention")  # layer_types' names of a Mamba-2 layer (as written, transformers 5's)
ATTENTION = ("attention", "full_attention")
_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf}  # transformers' tags for what JSON cannot write
_NO_LIMIT = [0.0, {"__float__": "Infinity"}]  # time_step_limit's default: no clamp of the time steps

_RULES = (
    _renamed("input_linear.weight", "experts.gate_up_proj"),
    _renamed("output_linear.weight", "experts.down_proj"),
    _renamed("router.layer.weight", "router.weight"),
    GGUFExperts(),  # llama.cpp's ffn_gate_exps / ffn_up_exps (input_linear split) and ffn_down_exps
)
_MAMBA_NAMES = (
    ("ssm_in", "mamba.in_proj"),
    ("ssm_out", "mamba.out_proj"),
    # MambaGGUF's pieces
    *((stem, f"mamba.{stem}") for stem in ("ssm_conv1d", "ssm_dt", "ssm_a", "ssm_d", "ssm_norm")),
)
# what llama.cpp's graph does not read: SiLU, the conv bias, no in_proj bias, no clamp of the time steps
_FIXED = (
    ("hidden_act", "silu"),
    ("mamba_conv_bias", True),
    ("mamba_proj_bias", False),
    ("time_step_limit", _NO_LIMIT),
)
_BIASES = tuple(
    (f"blk.{i}.attn_q.bias", "attention_bias") for i in range(256)
)  # any attention layer's q bias
_DENSE_NAMES = (  # the shared MLP of a checkpoint without experts: llama.cpp's plain feed-forward
    ("ffn_gate", "shared_mlp.gate_proj"),
    ("ffn_up", "shared_mlp.up_proj"),
    ("ffn_down", "shared_mlp.output_linear"),
)
_MOE_NAMES = (
    *GraniteMoeForCausalLM.gguf.layer,
    ("ffn_gate_shexp", "shared_mlp.gate_proj"),
    ("ffn_up_shexp", "shared_mlp.up_proj"),
    ("ffn_down_shexp", "shared_mlp.output_linear"),
)


@dataclass(repr=False)
class GraniteMoeHybridConfig(GraniteConfig):
    """transformers' GraniteMoeHybridConfig: Granite's fields, the experts (none: a dense model), the shared MLP,
    the Mamba-2 sizes; `layer_types` (every layer Mamba-2 where absent) is kept as written."""

    model_type: ClassVar[str] = "granitemoehybrid"
    layer_kinds: ClassVar[tuple[str, ...]] = MAMBA + ATTENTION
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (
        *GraniteConfig.bool_fields,
        "mamba_conv_bias",
        "mamba_proj_bias",
    )
    # GGUF out compares these its own way: the converter writes the context length as 2**20 without RoPE, the
    # chunk size changes only the scan's rounding, write_config refuses a clamp of the time steps (a JSON
    # Infinity is no tagged one)
    gguf_not_compared: ClassVar[tuple[str, ...]] = (
        "max_position_embeddings",
        "mamba_chunk_size",
        "time_step_limit",
    )

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    shared_intermediate_size: int = 1024
    position_embedding_type: str | None = None
    mamba_n_heads: int = 128
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_head: Any = "auto"
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # as transformers 5 writes it: infinity tagged ({"__float__": "Infinity"}); read as written, kept as read
    time_step_limit: Any = field(default_factory=lambda: list(_NO_LIMIT))

    def __post_init__(self) -> None:
        heads, expand = self.mamba_n_heads, self.mamba_expand
        if self.mamba_d_head == "auto" and all(map(_is_int, (expand, heads, self.hidden_size))) and heads > 0:
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        if self.layer_types is None and _is_int(self.num_hidden_layers):
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        super().__post_init__()

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def is_mamba(self, i: int) -> bool:
        return self.layer_types[i] in MAMBA

    def validate(self) -> None:
        super().validate()
        src = self.source
        self.validate_mamba()
        if not _is_int(self.num_local_experts) or self.num_local_experts < 0:
            raise ConfigError(f"{src}: num_local_experts must be a non-negative integer, found "
                              f"{self.num_local_experts!r}")  # fmt: skip
        if self.num_local_experts:
            validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        if not _is_int(self.shared_intermediate_size) or self.shared_intermediate_size < 1:
            raise ConfigError(f"{src}: shared_intermediate_size must be a positive integer, found "
                              f"{self.shared_intermediate_size!r}")  # fmt: skip
        if self.position_embedding_type not in (None, "rope"):
            raise ConfigError(f"{src}: position_embedding_type must be null or 'rope', found "
                              f"{self.position_embedding_type!r}")  # fmt: skip

    def validate_mamba(self) -> None:
        src = self.source
        positive_ints(self, ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                             "mamba_chunk_size", "mamba_d_head"), 1 << 16)  # fmt: skip
        heads, groups, width = self.mamba_n_heads, self.mamba_n_groups, self.mamba_expand * self.hidden_size
        if self.mamba_d_head * heads != width:
            raise ConfigError(f"{src}: mamba_d_head ({self.mamba_d_head}) times mamba_n_heads ({heads}) must be "
                              f"mamba_expand * hidden_size ({width})")  # fmt: skip
        if heads % groups:
            raise ConfigError(f"{src}: mamba_n_groups ({groups}) must divide mamba_n_heads ({heads})")
        self.step_limit()

    def step_limit(self) -> tuple[float, float]:
        """time_step_limit as two floats (transformers' tagged infinities decoded)."""
        limit = self.time_step_limit
        if isinstance(limit, (list, tuple)) and len(limit) == 2:
            values = [_FLOATS.get(v["__float__"]) if isinstance(v, dict) and set(v) == {"__float__"} else v
                      for v in limit]  # fmt: skip
            if all(_is_number(v) or v == math.inf for v in values) and values[0] <= values[1]:
                return float(values[0]), float(values[1])
        raise ConfigError(f"{self.source}: time_step_limit must be two numbers [min, max], found {limit!r}")


class GraniteMoeHybridMLP(nn.Module):
    """The shared MLP: output_linear(act(gate) * up) where input_linear gives gate (first half) and up."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.input_linear = Linear(hidden, 2 * intermediate, bias=False)
        self.output_linear = Linear(intermediate, hidden, bias=False)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(self.act_fn(gate) * up)


class GraniteMoeHybridDecoderLayer(nn.Module):
    """Pre-norm mixer (Mamba-2 or attention) and pre-norm feed-forward (the experts, where any, plus the shared
    MLP), each branch scaled by residual_multiplier before its residual add."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, n = config.hidden_size, config.rms_norm_eps, config.num_local_experts
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if n > 0:
            router = Router(h, n, config.num_experts_per_tok, order="topk_softmax")
            experts = Experts(n, h, config.intermediate_size, config.hidden_act)
            self.block_sparse_moe = SparseMoeBlock(router, experts, router_name="router")
        self.residual_multiplier = float(config.residual_multiplier)
        self.shared_mlp = GraniteMoeHybridMLP(h, config.shared_intermediate_size, config.hidden_act)
        if config.is_mamba(layer_idx):
            c = config
            self.mamba = Mamba2Mixer(h, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups,
                                     c.mamba_d_conv, c.mamba_chunk_size, layer_idx, eps=eps,
                                     conv_bias=c.mamba_conv_bias, proj_bias=c.mamba_proj_bias,
                                     time_step_limit=c.step_limit(), act=c.hidden_act)  # fmt: skip
        else:
            self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                       layer_idx, bias=config.attention_bias, scale=config.attention_multiplier,
                                       rope="default" if config.position_embedding_type == "rope" else None)  # fmt: skip

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        mixer = self.mamba if hasattr(self, "mamba") else self.self_attn
        x = x + mixer(self.input_layernorm(x), ctx) * self.residual_multiplier
        y = self.post_attention_layernorm(x)
        out = self.shared_mlp(y)
        if hasattr(self, "block_sparse_moe"):
            out = self.block_sparse_moe(y) + out
        return x + out * self.residual_multiplier


class GraniteMoeHybridModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(
            config, GraniteMoeHybridDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps)
        )
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


class GraniteMoeHybridForCausalLM(CausalLM):
    """transformers' GraniteMoeHybridForCausalLM."""

    config_class = GraniteMoeHybridConfig
    recurrent: ClassVar[bool] = True  # the Mamba-2 layers' states: the general forward decodes
    checkpoint_rules = CheckpointRules([*_RULES, MambaGGUF()])
    # llama.cpp's GraniteHybridModel converter (models.granitemoehybrid_gguf): Granite MoE's keys and names with the
    # Mamba-2 sizes, per-layer KV head counts and the mixers' tensors
    gguf = GGUFLayout(
        "granitehybrid",
        permute_qk=True,
        config=(
            *GraniteMoeForCausalLM.gguf.config,
            ("expert_shared_feed_forward_length", "shared_intermediate_size"),
            ("ssm.conv_kernel", "mamba_d_conv"),
            ("ssm.state_size", "mamba_d_state"),
            ("ssm.group_count", "mamba_n_groups"),
            ("ssm.time_step_rank", "mamba_n_heads"),
        ),
        layer=(*_MAMBA_NAMES, *_DENSE_NAMES, *_MOE_NAMES),  # the shared MLP's names last: those a MoE writes
        fixed=_FIXED,
        present=_BIASES,
        derive=derive,
        write_config=write_config,
        bare=("ssm_a", "ssm_d"),
        claim="attention.scale",  # Granite's multipliers: the converter's Bamba files (also "granitehybrid") have none
    )
    # attention split as Llama's, the experts cut their own intermediate rows; the Mamba-2 mixers and the shared
    # MLP are replicated on every rank
    tp_patterns: ClassVar[dict[str, str]] = MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["GraniteMoeHybridDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeHybridModel(config))
        self.logits_scaling = float(config.logits_scaling)
        # GGUF out: the norm's groups (ssm_norm's rows); a dense checkpoint's shared MLP as the plain ffn_*
        self.checkpoint_rules = CheckpointRules([*_RULES, MambaGGUF(config.mamba_n_groups)])
        if not config.num_local_experts:
            self.gguf = dataclasses.replace(self.gguf, layer=(*_MAMBA_NAMES, *_DENSE_NAMES))

    finish_logits = GraniteForCausalLM.finish_logits  # the logits divided by logits_scaling
