"""GLM-4.7-Flash (transformers' glm4_moe_lite): DeepSeek-V3's layers (models.deepseek_v3: Multi-head Latent
Attention, RoPE over interleaved pairs where `rope_interleave`, the score scale with YaRN's mscale_all_dim) with
GLM-4.5's mixture of experts (models.glm4_moe: sigmoid routing with the `e_score_correction_bias` buffer, groups,
renormalised with norm_topk_prob, scaled by routed_scaling_factor, plus `shared_experts`).

Which layers are dense is `mlp_layer_types` ("dense" or "sparse" per layer; by default the first dense, the rest
sparse), not first_k_dense_replace, which transformers ignores (kept where config.json gives it). GLM-4.7-Flash's
files carry a next-token-prediction layer after the last one (model.layers.47), which transformers skips on load,
as here.

GGUF: llama.cpp's converter (Glm4MoeLiteModel) writes GLM-4.7-Flash as "deepseek2", DeepSeek-V3's layout and keys
(models.deepseek_v3: MLA's kv_b_proj split into attn_k_b / attn_v_b, the stacked experts, exp_probs_b), the dense
layers as leading_dense_block_count, and, config.json naming no scoring function, no expert_gating_func: llama.cpp
then routes with the sigmoid only for GLM-4.7-Flash's shape (47 or 48 layers and 154880 tokens), with the softmax
otherwise (DeepSeek-V2's files). So a GLM-4.7-Flash file is told apart from DeepSeek-V3's (which carry the sigmoid's
gating function) and from DeepSeek-V2's by that shape, as llama.cpp does: the layout claims deepseek2 files of
154880 tokens, and GGUF out refuses a model llama.cpp would route with the softmax (another layer count or
vocabulary), or whose dense layers are not the leading ones. The next-token-prediction layers are counted in
block_count and nextn_predict_layers, as the converter counts them (their tensors are not held, nor written).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..nn import CheckpointRules, GatedMLP, Ignored
from .base import CausalLM
from .deepseek_v3 import (
    SIGMOID_GATING,
    DeepseekV3Config,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    GGUFMla,
)
from .deepseek_v3 import _gguf_config as _v3_gguf_config
from .deepseek_v3 import _gguf_write_config as _v3_gguf_write_config
from .glm4_moe import GROUPED_MOE_RULES, grouped_moe_mlp, skip_nextn
from .mixtral import MixtralModel

MLP_TYPES = ("dense", "sparse")
# llama.cpp's deepseek2 routes a file without expert_gating_func with the sigmoid for this shape only (GLM-4.7-Flash)
GLM_VOCAB, GLM_LAYERS = 154880, (47, 48)


@dataclass(repr=False)
class Glm4MoeLiteConfig(DeepseekV3Config):
    """transformers' Glm4MoeLiteConfig: its fields and defaults (GLM-4.7-Flash's sizes). first_k_dense_replace and
    num_nextn_predict_layers are not transformers' fields: written only where config.json gives them."""

    model_type: ClassVar[str] = "glm4_moe_lite"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "first_k_dense_replace")
    # GGUF out compares mlp_layer_types (what the model computes), not config.json's first_k_dense_replace
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("first_k_dense_replace",)

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


# ---- GGUF: llama.cpp's Glm4MoeLiteModel converter (arch "deepseek2") -------------------------------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3's reading (models.deepseek_v3._gguf_config) with the sigmoid where the file names no gating
    function, as llama.cpp for GLM-4.7-Flash's shape (refused for another: llama.cpp routes it with the softmax);
    the next-token-prediction layers off the block count; mlp_layer_types from leading_dense_block_count."""
    nextn = get("nextn_predict_layers") or 0
    if nextn:
        d["num_nextn_predict_layers"] = nextn
        d["num_hidden_layers"] -= nextn
    n = d.get("num_hidden_layers")
    if get("expert_gating_func") is None and n not in GLM_LAYERS:
        raise ConfigError(f"expert_gating_func absent with {n} layers: llama.cpp routes this deepseek2 file with the "
                          f"softmax (the sigmoid only for GLM-4.7-Flash's {GLM_LAYERS} layers)")  # fmt: skip
    gating = get("expert_gating_func")
    _v3_gguf_config(
        d, lambda key, *a: SIGMOID_GATING if key == "expert_gating_func" and gating is None else get(key, *a)
    )
    dense = d.get("first_k_dense_replace") or 0
    if isinstance(n, int) and isinstance(dense, int):
        d["mlp_layer_types"] = ["dense"] * dense + ["sparse"] * (n - dense)


def _gguf_write_config(m: dict[str, Any], c: Glm4MoeLiteConfig) -> None:
    """DeepSeek-V3's keys (models.deepseek_v3._gguf_write_config) with the leading dense layers of
    mlp_layer_types and the next-token-prediction layers counted; refused: what llama.cpp would run otherwise
    (dense layers after a mixture, a shape it routes with the softmax)."""
    types = c.mlp_layer_types[: c.num_hidden_layers]
    dense = types.index("sparse") if "sparse" in types else len(types)
    if "dense" in types[dense:]:
        raise ConfigError(f"mlp_layer_types {types}: llama.cpp's deepseek2 has dense layers only before the first "
                          "mixture (leading_dense_block_count)")  # fmt: skip
    if c.extra.get("scoring_func") != "sigmoid" and (
        c.vocab_size != GLM_VOCAB or c.num_hidden_layers not in GLM_LAYERS
    ):
        raise ConfigError(f"vocab_size {c.vocab_size} / num_hidden_layers {c.num_hidden_layers}: llama.cpp routes "
                          f"a deepseek2 file without expert_gating_func with the softmax unless it has {GLM_VOCAB} "
                          f"tokens and {' or '.join(map(str, GLM_LAYERS))} layers (GLM-4.7-Flash's)")  # fmt: skip
    _v3_gguf_write_config(m, c)
    m["leading_dense_block_count"] = dense
    nextn = getattr(c, "num_nextn_predict_layers", 0) or 0
    if nextn:
        m["block_count"] = c.num_hidden_layers + nextn
        m["nextn_predict_layers"] = nextn


class Glm4MoeLiteForCausalLM(CausalLM):
    """transformers' Glm4MoeLiteForCausalLM."""

    config_class = Glm4MoeLiteConfig
    # per-expert tensors on disk (GLM-4.5's rules); GLM-4.7-Flash's next-token-prediction layer 47 skipped, as
    # transformers skips it; llama.cpp's attn_k_b / attn_v_b assembled (GGUFMla)
    checkpoint_rules = CheckpointRules(
        [*GROUPED_MOE_RULES.rules, Ignored(r"model\.layers\.47\..*"), GGUFMla()]
    )
    # DeepSeek-V3's layout; a deepseek2 file of GLM-4.7-Flash's vocabulary is this family's (module docstring)
    gguf = dataclasses.replace(
        DeepseekV3ForCausalLM.gguf,
        derive=_gguf_config,
        write_config=_gguf_write_config,
        claim=("vocab_size", GLM_VOCAB),
    )
    # transformers' plan, as DeepSeek-V3's (the shared experts' too)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Glm4MoeLiteDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: Glm4MoeLiteConfig):
        super().__init__(config, MixtralModel(config, Glm4MoeLiteDecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = [mla if isinstance(r, GGUFMla) else r for r in type(self).checkpoint_rules.rules]
        self.checkpoint_rules = skip_nextn(CheckpointRules(rules), config)
