"""Granite MoE SWA (IBM's granite-swash MoE): Granite MoE's layer (the multipliers; a router taking the softmax
over its top-k logits; stacked experts) with Granite SWA's attention (sliding-window and full layers, a RoPE base
per layer, 0 for NoPE, and a learned sink logit per head) and, where `shared_intermediate_size` is set, a shared
MLP (`shared_mlp`: `input_linear` giving gate then up, `output_linear`) added to the experts' output.

transformers holds and saves the experts under the model's names (`block_sparse_moe.router.weight`,
`experts.gate_up_proj` (E, 2I, h; gate rows first), `experts.down_proj` (E, h, I)). llama.cpp's converter
(GraniteMoeSWAModel) writes it as "granite_swa" too, with the expert counts (their presence claims a file for this
family), the experts' gate_up_proj kept fused (ffn_gate_up_exps), the shared MLP's input_linear fused as
ffn_up_shexp and its width as expert_shared_feed_forward_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GGUFLayout, Rename, RMSNorm, Router, SparseMoeBlock
from .base import CausalLM, DecoderModel
from .granite import GraniteForCausalLM, GraniteModel
from .granite_swa import SINKS, GraniteSWAForCausalLM, SlidingGranite, swa_attention
from .granitemoe import GraniteMoeConfig, GraniteMoeForCausalLM
from .granitemoehybrid import GraniteMoeHybridMLP
from .mixtral import MOE_TP


@dataclass(repr=False)
class GraniteMoeSWAConfig(SlidingGranite, GraniteMoeConfig):
    """transformers' GraniteMoeSWAConfig: Granite MoE's fields and defaults, the window, the per-layer bases and
    the shared MLP's width (0: none)."""

    model_type: ClassVar[str] = "granitemoe_swa"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    sliding_window: int | None = 128
    layer_rope_theta: list[float] | None = None
    shared_intermediate_size: int = 0

    def __post_init__(self) -> None:
        self._swa_defaults()
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._validate_swa()
        s = self.shared_intermediate_size
        if not _is_int(s) or s < 0:
            raise ConfigError(
                f"{self.source}: shared_intermediate_size must be a non-negative integer (0: no shared MLP), "
                f"found {s!r}"
            )


class GraniteMoeSWADecoderLayer(nn.Module):
    """Pre-norm attention (Granite SWA's) and a pre-norm mixture of experts plus the shared MLP, each branch scaled
    by residual_multiplier before its residual add."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, n = config.hidden_size, config.rms_norm_eps, config.num_local_experts
        self.self_attn = swa_attention(config, layer_idx)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        router = Router(h, n, config.num_experts_per_tok, order="topk_softmax")
        experts = Experts(n, h, config.intermediate_size, config.hidden_act)
        self.block_sparse_moe = SparseMoeBlock(router, experts, router_name="router")
        self.residual_multiplier = float(config.residual_multiplier)
        if config.shared_intermediate_size:
            self.shared_mlp = GraniteMoeHybridMLP(h, config.shared_intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx) * self.residual_multiplier
        y = self.post_attention_layernorm(x)
        out = self.block_sparse_moe(y)
        if hasattr(self, "shared_mlp"):
            out = out + self.shared_mlp(y)
        return x + out * self.residual_multiplier


class GraniteMoeSWAModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeSWADecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


def _whole(module: str) -> Rename:
    """llama.cpp's stacked experts (blk.N.ffn_*_exps.weight) read as the parameter itself."""
    return Rename(rf"\.block_sparse_moe\.experts\.{module}\.weight$", f".block_sparse_moe.experts.{module}",
                  r"(?!)", "")  # fmt: skip


class GraniteMoeSWAForCausalLM(CausalLM):
    """transformers' GraniteMoeSWAForCausalLM."""

    config_class = GraniteMoeSWAConfig
    checkpoint_rules = CheckpointRules([SINKS, _whole("gate_up_proj"), _whole("down_proj")])
    gguf = GGUFLayout(
        "granite_swa",
        permute_qk=True,
        config=(
            *GraniteMoeForCausalLM.gguf.config,
            ("expert_shared_feed_forward_length", "shared_intermediate_size"),
        ),
        layer=(
            *GraniteSWAForCausalLM.gguf.layer,
            ("ffn_gate_inp", "block_sparse_moe.router"),
            ("ffn_gate_up_exps", "block_sparse_moe.experts.gate_up_proj"),
            ("ffn_down_exps", "block_sparse_moe.experts.down_proj"),
            ("ffn_up_shexp", "shared_mlp.input_linear"),
            ("ffn_down_shexp", "shared_mlp.output_linear"),
        ),
        present=(("blk.0.attn_q.bias", "attention_bias"),),
        derive=GraniteSWAForCausalLM.gguf.derive,
        write_config=GraniteSWAForCausalLM.gguf.write_config,
    )
    # transformers' plan: q/k/v column-parallel, o row-parallel, the sinks cut by head (SinkShardedAttention), each
    # expert's intermediate rows cut (Experts.shard); the router and the shared MLP whole
    tp_patterns: ClassVar[dict[str, str]] = MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["GraniteMoeSWADecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteMoeSWAModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    finish_logits = GraniteForCausalLM.finish_logits  # the logits divided by logits_scaling
