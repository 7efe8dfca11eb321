"""GLM-4.7-Flash (transformers' glm4_moe_lite): DeepSeek-V3's layers (models.deepseek_v3: Multi-head Latent
Attention, RoPE over interleaved pairs where `rope_interleave`, the score scale with YaRN's mscale_all_dim) with
GLM-4.5's mixture of experts (models.glm4_moe: sigmoid routing with the `e_score_correction_bias` buffer, groups,
renormalised with norm_topk_prob, scaled by routed_scaling_factor, plus `shared_experts`).

Which layers are dense is `mlp_layer_types` ("dense" or "sparse" per layer; by default the first dense, the rest
sparse), not first_k_dense_replace, which transformers ignores (kept where config.json gives it). GLM-4.7-Flash's
files carry a next-token-prediction layer after the last one (model.layers.47), which transformers skips on load,
as here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..nn import CheckpointRules, GatedMLP, Ignored
from .base import CausalLM
from .deepseek_v3 import DeepseekV3Config, DeepseekV3DecoderLayer, DeepseekV3ForCausalLM
from .glm4_moe import GROUPED_MOE_RULES, grouped_moe_mlp, skip_nextn
from .mixtral import MixtralModel

MLP_TYPES = ("dense", "sparse")


@dataclass(repr=False)
class Glm4MoeLiteConfig(DeepseekV3Config):
    """transformers' Glm4MoeLiteConfig: its fields and defaults (GLM-4.7-Flash's sizes). first_k_dense_replace and
    num_nextn_predict_layers are not transformers' fields: written only where config.json gives them."""

    model_type: ClassVar[str] = "glm4_moe_lite"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "first_k_dense_replace")

    vocab_size: int = 154880
    hidden_size: int = 2048
    intermediate_size: int = 10240
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 47
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 20
    n_shared_experts: int = 1
    n_routed_experts: int = 64
    routed_scaling_factor: float = 1.8
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 768
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    mlp_layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.mlp_layer_types is None and isinstance(n, int):
            self.mlp_layer_types = ["dense"] + ["sparse"] * (n - 1)  # transformers' default
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("head_dim")  # transformers' alias of qk_rope_head_dim, not written
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers")  # DeepSeek-V3's, not transformers' GLM-4.7-Flash's
        return out

    def validate(self) -> None:
        super().validate()
        src, types = self.source, self.mlp_layer_types
        if not isinstance(types, list) or len(types) < self.num_hidden_layers or set(types) - set(MLP_TYPES):
            raise ConfigError(f"{src}: mlp_layer_types must list {MLP_TYPES} for each of the "
                              f"{self.num_hidden_layers} layers, found {types!r}")  # fmt: skip
        partial = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ConfigError(f"{src}: partial_rotary_factor must be 1 (RoPE turns all of qk_rope_head_dim), "
                              f"found {partial!r}")  # fmt: skip


class Glm4MoeLiteDecoderLayer(DeepseekV3DecoderLayer):
    """Pre-norm MLA, then a pre-norm dense MLP or GLM-4.5's mixture, as mlp_layer_types says."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return grouped_moe_mlp(
            config, config.first_k_dense_replace
        )  # an index past the dense ones: the mixture


class Glm4MoeLiteForCausalLM(CausalLM):
    """transformers' Glm4MoeLiteForCausalLM. llama.cpp's converter writes GLM-4.7-Flash as its deepseek2
    architecture (DeepSeek-V3's layout, which has no per-layer mlp_layer_types); GGUF out is not offered here."""

    config_class = Glm4MoeLiteConfig
    # per-expert tensors on disk (GLM-4.5's rules); GLM-4.7-Flash's next-token-prediction layer 47 skipped, as
    # transformers skips it
    checkpoint_rules = CheckpointRules([*GROUPED_MOE_RULES.rules, Ignored(r"model\.layers\.47\..*")])
    # transformers' plan, as DeepSeek-V3's (the shared experts' too)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Glm4MoeLiteDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: Glm4MoeLiteConfig):
        super().__init__(config, MixtralModel(config, Glm4MoeLiteDecoderLayer))
        self.checkpoint_rules = skip_nextn(type(self).checkpoint_rules, config)
