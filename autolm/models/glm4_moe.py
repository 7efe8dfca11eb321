"""GLM-4.5 (GLM-4.5, GLM-4.5-Air, GLM-4.6): Llama's pre-norm layers (two RMSNorms, unlike GLM-4's four) with q/k/v
biases (`attention_bias`, none on o_proj), optional per-head q/k RMSNorms (`use_qk_norm`), and partial RoPE
(`partial_rotary_factor`, 0.5 by default) in the rotate-half form: the first head_dim * factor dimensions of each
head rotate as two halves (GLM-4 rotates interleaved pairs), the rest pass through.

The first `first_k_dense_replace` layers have a dense gated MLP (`intermediate_size`); the others a mixture of
`n_routed_experts` gated MLPs (`moe_intermediate_size`) with DeepSeek V3's sigmoid routing (`mlp.gate`, a
GroupedRouter: the `e_score_correction_bias` buffer steers the choice among the `topk_group` best of `n_group`
groups, the chosen plain scores are renormalised with `norm_topk_prob` and scaled by `routed_scaling_factor`), plus
`mlp.shared_experts`, one ungated gated MLP of moe_intermediate_size * n_shared_experts that every token passes.
Checkpoints keep one tensor per expert, as Qwen 2 MoE's do. The Hub's checkpoints also hold
`num_nextn_predict_layers` next-token-prediction layers past the last one (`model.layers.<num_hidden_layers>.*`),
which transformers does not load; neither does autolm.

dots.llm1 (models.dots1) reuses the mixture-of-experts layer and the config checks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    GroupedRouter,
    Ignored,
    Rename,
    SparseMoeBlock,
)
from .base import CausalLM
from .glm4 import Glm4Config, gguf_config, gguf_write_config, whole_heads
from .image_text import IMAGE_TEXT_RULES, EitherTiesConfig
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel, validate_experts
from .qwen2_moe import QWEN_MOE_RULES, QWEN_MOE_TP


def validate_grouped_moe(c: Any) -> None:
    """ConfigError naming the key unless the experts, their groups and the leading dense layers make sense."""
    src = c.source
    validate_experts(c, c.n_routed_experts, c.num_experts_per_tok)
    for name, low in (("moe_intermediate_size", 1), ("n_shared_experts", 1), ("first_k_dense_replace", 0),
                      ("n_group", 1), ("topk_group", 1)):  # fmt: skip
        v = getattr(c, name)
        if not _is_int(v) or v < low:
            raise ConfigError(f"{src}: {name} must be an integer >= {low}, found {v!r}")
    if c.n_routed_experts % c.n_group or (c.n_group > 1 and c.n_routed_experts // c.n_group < 2):
        raise ConfigError(f"{src}: n_group ({c.n_group}) must divide n_routed_experts ({c.n_routed_experts}) "
                          f"into groups of at least 2 experts")  # fmt: skip
    if c.topk_group > c.n_group:
        raise ConfigError(f"{src}: topk_group ({c.topk_group}) must be at most n_group ({c.n_group})")
    if c.num_experts_per_tok > c.topk_group * (c.n_routed_experts // c.n_group):
        raise ConfigError(f"{src}: num_experts_per_tok ({c.num_experts_per_tok}) exceeds the experts of the "
                          f"topk_group ({c.topk_group}) groups a token may use")  # fmt: skip
    s = c.routed_scaling_factor
    if not _is_number(s) or not s > 0:
        raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, found {s!r}")


@dataclass(repr=False)
class Glm4MoeConfig(Glm4Config):
    """transformers' Glm4MoeConfig: its fields and defaults (whose 96 heads do not divide hidden_size 4096: GLM-4.5's
    config.json gives head_dim 128; no EOS default, unlike GLM-4; partial_rotary_factor 0.5
    in the RoPE parameters, or at the top level as GLM-4.5's config.json has it: read and written as GLM-4's).
    `num_nextn_predict_layers` is kept as read (the layers are not loaded)."""

    model_type: ClassVar[str] = "glm4_moe"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*Glm4Config.bool_fields, "norm_topk_prob", "use_qk_norm")

    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    output_router_logits: bool = False
    num_nextn_predict_layers: int = 1

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        super().__post_init__()
        self.eos_token_id = eos  # GLM-4 fills in its EOS ids; transformers' GLM-4.5 config leaves them unset

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: False)
    qk_norm = property(lambda self: self.use_qk_norm)
    num_local_experts = property(lambda self: self.n_routed_experts)  # transformers' alias

    def validate(self) -> None:
        super().validate()
        validate_grouped_moe(self)
        n = self.num_nextn_predict_layers
        if not _is_int(n) or n < 0:
            raise ConfigError(f"{self.source}: num_nextn_predict_layers must be an integer >= 0, found {n!r}")


class Glm4MoeDecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention, then a pre-norm dense MLP (the first `first_k_dense_replace` layers) or mixture."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return grouped_moe_mlp(config, layer_idx)


def grouped_moe_mlp(config: Any, layer_idx: int) -> nn.Module:
    """Layer `layer_idx`'s feed-forward block: GatedMLP below first_k_dense_replace, else routed + shared experts."""
    h, act = config.hidden_size, config.hidden_act
    if layer_idx < config.first_k_dense_replace:
        return GatedMLP(h, config.intermediate_size, act)
    router = GroupedRouter(h, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                           topk_group=config.topk_group, normalize=config.norm_topk_prob,
                           scaling=float(config.routed_scaling_factor))  # fmt: skip
    experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
    shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act)
    return SparseMoeBlock(router, experts, shared_experts=shared)


@dataclass(frozen=True)
class ExpProbsBias:
    """Checkpoint rule for GGUF out: llama.cpp's converter writes the router's `e_score_correction_bias` as the
    bias of `e_score_correction` (blk.N.exp_probs_b.bias); reading, a Rename takes it back (GROUPED_MOE_RULES)."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".gate.e_score_correction_bias"):
            return None
        return [(name.removesuffix("_bias") + ".bias", t)]


# per-expert tensors stacked (Qwen MoE's rules); llama.cpp's exp_probs_b back under the buffer's name
GROUPED_MOE_RULES = CheckpointRules(
    [
        *QWEN_MOE_RULES.rules,
        Rename(r"\.gate\.e_score_correction\.bias$", ".gate.e_score_correction_bias", r"(?!)", ""),
        ExpProbsBias(),
    ]
)
# llama.cpp's names and keys for the experts, the router's bias, the shared experts and the dense lead layers
GGUF_GROUPED_LAYER = (
    *GGUF_EXPERTS,
    ("exp_probs_b", "mlp.gate.e_score_correction"),
    ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
    ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
)
GGUF_GROUPED_KEYS = (
    ("expert_count", "n_routed_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_shared_count", "n_shared_experts"),
    ("leading_dense_block_count", "first_k_dense_replace"),
    ("expert_weights_scale", "routed_scaling_factor"),
    ("expert_weights_norm", "norm_topk_prob"),
)
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
# transformers' plan: Llama's attention split, dense and shared MLPs as Llama's MLP; experts whole on every rank
GROUPED_MOE_TP = {
    **{k: v for k, v in QWEN_MOE_TP.items() if ".shared_expert." not in k},
    "layers.*.mlp.shared_experts.gate_proj": "colwise",
    "layers.*.mlp.shared_experts.up_proj": "colwise",
    "layers.*.mlp.shared_experts.down_proj": "rowwise",
}


def write_grouped_keys(m: dict[str, Any], c: Any) -> None:
    """The keys metadata() leaves out (booleans) or that have no config field: the top k's renormalisation, the
    sigmoid gating."""
    m["expert_weights_norm"] = c.norm_topk_prob
    m["expert_gating_func"] = SIGMOID_GATING


def _gguf_config(d: dict[str, Any], get) -> None:
    """GLM-4's keys (RoPE, head size; the next-token-prediction layers the converter counts in block_count taken
    off, as llama.cpp runs block_count - nextn_predict_layers), num_nextn_predict_layers 0 where the file has none."""
    gguf_config(d, get)
    d.setdefault("num_nextn_predict_layers", 0)


def _gguf_write_config(m: dict[str, Any], c: Glm4MoeConfig) -> None:
    """As the converter writes the checkpoint autolm saves: the next-token-prediction layers counted in block_count
    though their tensors are absent (autolm holds none; llama.cpp loads such a file as the trunk only)."""
    gguf_write_config(m, c)
    write_grouped_keys(m, c)
    m["block_count"] = c.num_hidden_layers + c.num_nextn_predict_layers
    m["nextn_predict_layers"] = c.num_nextn_predict_layers


class Glm4vMoeConfig(EitherTiesConfig):
    """transformers' Glm4vMoeConfig (GLM-4.5V, GLM-4.6V): its language model's, a GLM-4.5 with q/k/v biases by
    default, no q/k norms nor next-token-prediction layers, head_dim hidden_size / heads, and multimodal RoPE over
    halves (on text, GLM-4.5's partial RoPE; llama.cpp's "glm4moe" files hold the sections and read as GLM-4.5's)."""

    model_type: ClassVar[str] = "glm4v_moe"
    text_class: ClassVar[type] = Glm4MoeConfig
    mrope: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {"attention_bias": True}
    fixed: ClassVar[dict[str, Any]] = {"use_qk_norm": False, "num_nextn_predict_layers": 0}

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        super().adapt(text)
        whole_heads(text)


class Glm4MoeForCausalLM(CausalLM):
    """transformers' Glm4MoeForCausalLM."""

    config_class = Glm4MoeConfig
    checkpoint_rules = CheckpointRules([*IMAGE_TEXT_RULES, *GROUPED_MOE_RULES.rules])
    # llama.cpp's Glm4MoeModel converter: TextModel's keys, the rotary dimensions, the experts' keys; tensors by
    # gguf-py's map (post_attention_layernorm as post_attention_norm), no q/k permutation (NeoX RoPE). llama.cpp's
    # glm4moe routes without groups and always with the sigmoid
    gguf = GGUFLayout(
        "glm4moe",
        config=(("attention.key_length", "head_dim"), *GGUF_GROUPED_KEYS),
        layer=(("post_attention_norm", "post_attention_layernorm"), *GGUF_GROUPED_LAYER),
        fixed=(("attention_bias", False), ("use_qk_norm", False), ("n_group", 1), ("topk_group", 1)),
        present=(("blk.0.attn_q.bias", "attention_bias"), ("blk.0.attn_q_norm.weight", "use_qk_norm")),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Glm4MoeDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: Glm4MoeConfig):
        super().__init__(config, MixtralModel(config, Glm4MoeDecoderLayer))
        self.checkpoint_rules = skip_nextn(type(self).checkpoint_rules, config)


def skip_nextn(rules: CheckpointRules, config: Any) -> CheckpointRules:
    """`rules` that also skip the checkpoint's next-token-prediction layers (model.layers.<n>.* from
    num_hidden_layers on), which the model does not run."""
    n, extra = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0)
    if not extra:
        return rules
    layers = "|".join(str(i) for i in range(n, n + extra))
    return CheckpointRules([*rules.rules, Ignored(rf"model\.layers\.({layers})\..+")])
