"""Qwen 2 MoE (Qwen1.5-MoE): Qwen 2's attention (q/k/v biases) with a mixture of experts in every
`decoder_sparse_step`-th layer except `mlp_only_layers` (those keep a dense MLP), plus a shared expert that
every token passes, gated by sigmoid(shared_expert_gate(x)). The top-k routing weights are renormalised only
with `norm_topk_prob`. Checkpoints keep one gate/up/down tensor per expert (`mlp.experts.3.gate_proj.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GatedMLP, GGUFLayout, Linear, Router, SparseMoeBlock, Stacked
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM
from .llama import LlamaConfig
from .mixtral import GGUF_EXPERTS, MOE_TP, MixtralDecoderLayer, MixtralModel, validate_experts


@dataclass(repr=False)
class QwenMoeConfig(LlamaConfig):
    """What Qwen 2 MoE and Qwen 3 MoE configs share: experts in every `decoder_sparse_step`-th layer but
    `mlp_only_layers`, top-k routing renormalised with `norm_topk_prob`."""

    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "head_dim",
        "mlp_bias",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "norm_topk_prob")
    vocab_size: int = 151936
    hidden_size: int = 2048
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    decoder_sparse_step: int = 1
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list[int] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408

    def __post_init__(self) -> None:
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        super().__post_init__()

    def sparse(self, i: int) -> bool:
        """Whether layer i has experts (else a dense MLP)."""
        return (
            i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> None:
        window, self.sliding_window = self.sliding_window, self.sliding_window or None  # 0: none (Qwen 2 MoE)
        try:
            super().validate()
        finally:
            self.sliding_window = window
        if not _is_int(self.decoder_sparse_step) or self.decoder_sparse_step < 1:
            raise ConfigError(f"{self.source}: decoder_sparse_step must be a positive integer, found "
                              f"{self.decoder_sparse_step!r}")  # fmt: skip
        if not isinstance(self.mlp_only_layers, list) or not all(_is_int(i) for i in self.mlp_only_layers):
            raise ConfigError(f"{self.source}: mlp_only_layers must be a list of layer indices, found "
                              f"{self.mlp_only_layers!r}")  # fmt: skip
        if self.num_experts != 0:
            validate_experts(self, self.num_experts, self.num_experts_per_tok)
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            v = getattr(self, name, 1)
            if not _is_int(v) or v < (name == "moe_intermediate_size"):
                raise ConfigError(f"{self.source}: {name} must be a positive integer, found {v!r}")


@dataclass(repr=False)
class Qwen2MoeConfig(QwenMoeConfig):
    """transformers' Qwen2MoeConfig. Its `sliding_window` reads 0 when `use_sliding_window` is off (as
    transformers writes it); `layer_types` default to windows on even layers below max_window_layers."""

    model_type: ClassVar[str] = "qwen2_moe"
    bool_fields: ClassVar[tuple[str, ...]] = (*QwenMoeConfig.bool_fields, "qkv_bias")
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    max_window_layers: int = 28
    shared_expert_intermediate_size: int = 5632
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers):
            self.layer_types = [
                "sliding_attention" if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]  # fmt: skip
        super().__post_init__()

    o_bias = property(lambda self: False)

    def layer_window(self, i: int) -> int | None:
        window = self.sliding_window if self.use_sliding_window else None
        return (window or None) if self.layer_types[i] == "sliding_attention" else None


class Qwen2MoeDecoderLayer(MixtralDecoderLayer):
    """Experts + a gated shared expert in sparse layers, a dense MLP in the others."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if not config.sparse(layer_idx):
            return GatedMLP(h, config.intermediate_size, act)
        router = Router(h, config.num_experts, config.num_experts_per_tok, normalize=config.norm_topk_prob)
        experts = Experts(config.num_experts, h, config.moe_intermediate_size, act)
        shared = getattr(config, "shared_expert_intermediate_size", 0)
        if not shared:  # Qwen 3 MoE: no shared expert
            return SparseMoeBlock(router, experts)
        return SparseMoeBlock(router, experts, GatedMLP(h, shared, act), Linear(h, 1, bias=False))


# Hub checkpoints hold each expert's gate/up/down projections; the model stacks them (transformers 5's layout).
QWEN_MOE_RULES = CheckpointRules(
    [
        Stacked("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
        Stacked("down_proj", ("down_proj.weight",)),
        GGUFExperts(),
    ]
)
# llama.cpp's metadata keys for the experts (both Qwen MoE converters write them)
GGUF_EXPERT_KEYS = (
    ("expert_count", "num_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
)
# Dense MLPs (mlp_only_layers) and the shared expert split as Llama's MLP does.
QWEN_MOE_TP = {
    **MOE_TP,
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "layers.*.mlp.shared_expert.gate_proj": "colwise",
    "layers.*.mlp.shared_expert.up_proj": "colwise",
    "layers.*.mlp.shared_expert.down_proj": "rowwise",
}


class Qwen2MoeForCausalLM(CausalLM):
    """transformers' Qwen2MoeForCausalLM."""

    config_class = Qwen2MoeConfig
    checkpoint_rules = QWEN_MOE_RULES
    # llama.cpp runs every layer as a mixture (no mlp_only_layers) and weights the top k unrenormalised
    gguf = GGUFLayout(
        "qwen2moe",
        config=(*GGUF_EXPERT_KEYS, ("expert_shared_feed_forward_length", "shared_expert_intermediate_size")),
        layer=(
            *GGUF_EXPERTS,
            ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
            ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
            ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
        ),
        fixed=(("norm_topk_prob", False), ("use_sliding_window", False)),
    )
    tp_patterns: ClassVar[dict[str, str]] = QWEN_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Qwen2MoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config, Qwen2MoeDecoderLayer))
