"""Solar Open (Upstage's Solar-Open-100B): GLM-4.5's mixture of experts (models.glm4_moe: sigmoid routing with the
`e_score_correction_bias` buffer, `n_group` groups of which `topk_group` are chosen, renormalised with
norm_topk_prob, scaled by routed_scaling_factor, plus `shared_experts`) in every layer, with Llama's attention and
decoder layer: q/k/v biases where `attention_bias` (none on o_proj), no q/k norms, RoPE in the rotate-half form
over the whole head.

transformers' Solar Open drops GLM-4.5's dense lead layers, q/k norms and next-token-prediction layers (its config
has no first_k_dense_replace, intermediate_size, use_qk_norm or num_nextn_predict_layers, and its layers ignore
them); Solar-Open-100B's config.json still carries some (first_k_dense_replace 0, use_qk_norm false, and
partial_rotary_factor 1.0, the only factor transformers' full-head rotation runs): they are kept as read and change
nothing. The RoPE base defaults to 1e6.

GGUF: llama.cpp's converter (SolarOpenModel, a Glm4MoeModel) writes Solar Open as "glm4moe", GLM-4.5's layout and
keys, with leading_dense_block_count 0 (GLM-4.5's files have dense lead layers): a "glm4moe" file that says 0 is
this family's. The whole head rotates (rope.dimension_count is head_dim), and the expert groups go out as
TextModel writes config.json's n_group / topk_group (llama.cpp's glm4moe routes without groups: more are refused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import PretrainedConfig
from ..errors import ConfigError
from .base import CausalLM
from .glm4 import gguf_config
from .glm4_moe import (
    GROUPED_MOE_RULES,
    GROUPED_MOE_TP,
    Glm4MoeConfig,
    Glm4MoeDecoderLayer,
    Glm4MoeForCausalLM,
    grouped_moe_mlp,
    write_grouped_keys,
)
from .mixtral import MixtralModel

# GLM-4.5's config fields transformers' Solar Open has not: config.json's values kept in `extra`, the model's at
# Solar Open's (no dense lead layer, no q/k norms, no next-token-prediction layers)
GLM_ONLY = ("first_k_dense_replace", "use_qk_norm", "num_nextn_predict_layers")


@dataclass(repr=False)
class SolarOpenConfig(Glm4MoeConfig):
    """transformers' SolarOpenConfig: GLM-4.5's fields and checks without GLM_ONLY's, its defaults (Solar-Open-100B's
    sizes, head_dim 128, RoPE base 1e6, no partial_rotary_factor: the whole head rotates)."""

    model_type: ClassVar[str] = "solar_open"
    default_theta: ClassVar[float] = 1e6
    # not in transformers' config: written when set (intermediate_size as Solar-Open-100B's config.json gives it)
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "intermediate_size", *GLM_ONLY)

    vocab_size: int = 196608
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    head_dim: int | None = 128
    moe_intermediate_size: int = 1280
    first_k_dense_replace: int = 0
    num_nextn_predict_layers: int = 0
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6}
    )

    qk_norm = property(lambda self: False)  # Llama's attention, whatever use_qk_norm says

    def __post_init__(self) -> None:
        rope = self.rope_parameters
        bare = isinstance(rope, dict) and "partial_rotary_factor" not in rope
        if bare:  # GLM-4's checks read the factor: the whole head, as transformers' Solar Open rotates it
            self.rope_parameters = {**rope, "partial_rotary_factor": 1.0}
        super().__post_init__()
        if bare:  # and it writes none
            self.rope_parameters.pop("partial_rotary_factor")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> PretrainedConfig:
        """config.json's GLM_ONLY keys kept as read, in `extra` (transformers keeps and ignores them)."""
        if not isinstance(d, dict):
            return super().from_dict(d, source, **overrides)  # refused there
        d = {**d, **overrides}
        kept = {k: d.pop(k) for k in GLM_ONLY if k in d}
        config = super().from_dict(d, source)
        config.extra.update(kept)
        return config

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def to_dict(self) -> dict[str, Any]:
        if "partial_rotary_factor" in self.rope_parameters:
            return super().to_dict()  # where config.json gave it: in GLM-4's spelling, as read
        # GLM-4's v4 spelling writes a factor, which there is none of here
        return PretrainedConfig.to_dict(self)

    def validate(self) -> None:
        super().validate()
        factor = self.rope_parameters.get("partial_rotary_factor")
        if factor != 1:
            raise ConfigError(f"{self.source}: partial_rotary_factor must be 1 (transformers' Solar Open rotates "
                              f"the whole head), found {factor!r}")  # fmt: skip


class SolarOpenDecoderLayer(Glm4MoeDecoderLayer):
    """Pre-norm attention (Llama's: config.qk_norm is False), then a pre-norm mixture of experts in every layer."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return grouped_moe_mlp(config, config.first_k_dense_replace)  # past the dense ones: the mixture


# ---- GGUF: llama.cpp's SolarOpenModel converter (a Glm4MoeModel, arch "glm4moe") ------------------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """GLM-4.5's reading (the head size, the rotary dimensions as the factor), then what a Solar Open file must
    say: the whole head rotated, no q/k norms; GLM_ONLY's keys dropped (no dense lead layer: the claim)."""
    gguf_config(d, get)
    rope = d["rope_parameters"]
    if rope.get("partial_rotary_factor") == 1:
        del rope["partial_rotary_factor"]
    if d.pop("use_qk_norm", False):
        raise ConfigError("blk.0.attn_q_norm: q/k norms are GLM-4.5's; Solar Open has none (use_qk_norm)")
    nextn = get("nextn_predict_layers") or 0
    if isinstance(d.get("num_hidden_layers"), int):
        d["num_hidden_layers"] -= nextn  # llama.cpp runs the trunk; the layers past it are not loaded
    for key in ("first_k_dense_replace", "num_nextn_predict_layers"):
        d.pop(key, None)


def _gguf_write_config(m: dict[str, Any], c: SolarOpenConfig) -> None:
    """As the converter writes Solar-Open-100B (whose config.json gives first_k_dense_replace 0 and
    partial_rotary_factor 1.0): GLM-4.5's keys with the whole head as the rotary dimensions, the expert groups
    (TextModel's, from config.json's n_group / topk_group), no vocabulary size, no dense lead layer, no
    next-token-prediction layers."""
    m.pop("vocab_size", None)
    m["rope.dimension_count"] = c.head_dim
    write_grouped_keys(m, c)
    m["expert_group_count"], m["expert_group_used_count"] = c.n_group, c.topk_group
    m["leading_dense_block_count"] = 0


class SolarOpenForCausalLM(CausalLM):
    """transformers' SolarOpenForCausalLM."""

    config_class = SolarOpenConfig
    # one tensor per expert on disk (GLM-4.5's rules); llama.cpp's stacked experts and exp_probs_b
    checkpoint_rules = GROUPED_MOE_RULES
    # GLM-4.5's layout (llama.cpp's glm4moe routes without groups); a file with no dense lead layer is Solar Open's
    gguf = dataclasses.replace(
        Glm4MoeForCausalLM.gguf,
        derive=_gguf_config,
        write_config=_gguf_write_config,
        claim=("leading_dense_block_count", 0),
    )
    # GLM-4.5's plan: Llama's attention split, the shared experts as Llama's MLP; experts whole on every rank
    # (transformers' Solar Open plan leaves the shared experts whole too, which computes the same)
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["SolarOpenDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: SolarOpenConfig):
        super().__init__(config, MixtralModel(config, SolarOpenDecoderLayer))
