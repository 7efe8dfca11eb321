"""EXAONE MoE (LG AI Research: K-EXAONE-236B-A23B): EXAONE 4's attention (per-head RMSNorm on queries and keys, no
biases; local sliding-window layers and global layers as `layer_types` says, by default every
`sliding_window_pattern`-th layer global; the local layers rotate, the global ones use no RoPE, as EXAONE 4's do
where a window is configured, and here one always is) in Llama's pre-norm layer order (`input_layernorm` before
attention, `post_attention_layernorm` before the feed-forward block; EXAONE 4 normalises the sublayers' outputs).

The feed-forward block of each layer is as `mlp_layer_types` says ("dense": a SiLU-gated MLP of
`intermediate_size`; "sparse": a mixture), by default dense for the first `first_k_dense_replace` layers. The
mixture is GLM-4.5's (models.glm4_moe): `num_experts` gated MLPs of `moe_intermediate_size` with DeepSeek V3's
sigmoid routing (`mlp.gate`, a GroupedRouter: the `e_score_correction_bias` buffer steers the choice among the
`topk_group` best of `n_group` groups, the chosen plain scores renormalised with `norm_topk_prob` and scaled by
`routed_scaling_factor`), plus `mlp.shared_experts`, one ungated gated MLP of moe_intermediate_size *
`num_shared_experts` that every token passes.

Checkpoints keep one tensor per expert and the correction bias as `mlp.e_score_correction_bias` (outside the
router), as transformers writes them; the Hub's also hold multi-token-prediction weights (`mtp.*`), which
transformers does not load; neither does autolm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    GroupedRouter,
    Ignored,
    Rename,
    RMSNorm,
    SparseMoeBlock,
)
from .base import CausalLM
from .exaone4 import Exaone4Config, gguf_window_layers
from .exaone4 import _gguf_write_config as exaone4_write_config
from .glm4_moe import GGUF_GROUPED_LAYER, GROUPED_MOE_RULES, GROUPED_MOE_TP, SIGMOID_GATING, skip_nextn
from .mixtral import MixtralDecoderLayer, MixtralModel, validate_experts

MLP_KINDS = ("dense", "sparse")


@dataclass(repr=False)
class ExaoneMoeConfig(Exaone4Config):
    """transformers' ExaoneMoeConfig: EXAONE 4's fields (layer_types derived from sliding_window and
    sliding_window_pattern, kept as config.json gives it, in `extra`) with its own defaults, and the experts'
    fields; mlp_layer_types derived from first_k_dense_replace as transformers derives them."""

    model_type: ClassVar[str] = "exaone_moe"
    bool_fields: ClassVar[tuple[str, ...]] = (
        *Exaone4Config.bool_fields,
        "norm_topk_prob",
        "output_router_logits",
    )

    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 53
    pad_token_id: int | None = 0
    mlp_layer_types: list[str] | None = None
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 1024
    num_experts: int = 64
    num_experts_per_tok: int = 8
    output_router_logits: bool = False
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        n, k, types = self.num_hidden_layers, self.first_k_dense_replace, self.mlp_layer_types
        if types is None and _is_int(n) and n > 0 and _is_int(k):  # else validate() names the key
            self.mlp_layer_types = ["dense" if i < k else "sparse" for i in range(n)]
        elif isinstance(types, list) and _is_int(n) and 0 < n < len(types):
            self.mlp_layer_types = types[:n]  # as layer_types: fewer layers than listed, the first n
        super().__post_init__()

    def sparse(self, i: int) -> bool:
        """Whether layer i has the mixture of experts (else the dense MLP)."""
        return self.mlp_layer_types[i] == "sparse"

    def validate(self) -> None:
        super().validate()
        src = self.source
        if (
            self.sliding_window is None
        ):  # transformers' ExaoneMoeConfig takes integers only (EXAONE 4's: null too)
            raise ConfigError(f"{src}: sliding_window must be a positive integer, found None")
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        for name, low in (("moe_intermediate_size", 1), ("num_shared_experts", 1), ("first_k_dense_replace", 0),
                          ("n_group", 1), ("topk_group", 1)):  # fmt: skip
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigError(f"{src}: {name} must be an integer >= {low}, found {v!r}")
        types, n = self.mlp_layer_types, self.num_hidden_layers
        if not isinstance(types, list) or len(types) != n or not set(types) <= set(MLP_KINDS):
            raise ConfigError(
                f"{src}: mlp_layer_types must list {n} entries of {MLP_KINDS}, found {str(types)[:200]}"
            )
        self.validate_groups()

    def validate_groups(self) -> None:
        """ConfigError naming the key unless the groups of experts and the scaling make sense (as GLM-4.5's)."""
        src, e, groups = self.source, self.num_experts, self.n_group
        if e % groups or (groups > 1 and e // groups < 2):
            raise ConfigError(f"{src}: n_group ({groups}) must divide num_experts ({e}) into groups of at least "
                              "2 experts")  # fmt: skip
        if self.topk_group > groups:
            raise ConfigError(f"{src}: topk_group ({self.topk_group}) must be at most n_group ({groups})")
        if self.num_experts_per_tok > self.topk_group * (e // groups):
            raise ConfigError(f"{src}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                              f"topk_group ({self.topk_group}) groups a token may use")  # fmt: skip
        s = self.routed_scaling_factor
        if not _is_number(s) or not s > 0:
            raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, found {s!r}")


class ExaoneMoeDecoderLayer(MixtralDecoderLayer):
    """Pre-norm EXAONE 4 attention, then a pre-norm dense MLP or mixture (`mlp_layer_types`)."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx),
                         qk_norm="head", norm=lambda dim: RMSNorm(dim, config.rms_norm_eps))  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if not config.sparse(layer_idx):
            return GatedMLP(h, config.intermediate_size, act)
        router = GroupedRouter(h, config.num_experts, config.num_experts_per_tok, n_group=config.n_group,
                               topk_group=config.topk_group, normalize=config.norm_topk_prob,
                               scaling=float(config.routed_scaling_factor))  # fmt: skip
        experts = Experts(config.num_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.num_shared_experts, act)
        return SparseMoeBlock(router, experts, shared_experts=shared)


# GLM-4.5's rules (per-expert tensors stacked; llama.cpp's exp_probs_b), the correction bias under the block on disk
# (transformers' conversion mapping for exaone_moe), the multi-token-prediction weights skipped
EXAONE_MOE_RULES = CheckpointRules(
    [
        *GROUPED_MOE_RULES.rules,
        Rename(
            r"\.mlp\.e_score_correction_bias$",
            ".mlp.gate.e_score_correction_bias",
            r"\.mlp\.gate\.e_score_correction_bias$",
            ".mlp.e_score_correction_bias",
        ),
        Ignored(r"mtp\..+"),
    ]
)
# llama.cpp's keys for the experts (TextModel's counts and groups, ExaoneMoEModel's own)
GGUF_KEYS = (
    ("attention.key_length", "head_dim"),
    ("expert_count", "num_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("expert_group_count", "n_group"),
    ("expert_group_used_count", "topk_group"),
    ("expert_feed_forward_length", "moe_intermediate_size"),
    ("expert_shared_count", "num_shared_experts"),
    ("leading_dense_block_count", "first_k_dense_replace"),
    ("expert_weights_scale", "routed_scaling_factor"),
    ("expert_weights_norm", "norm_topk_prob"),
)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """What llama.cpp's exaone-moe reads: the window (a file without one does not load there: the config refuses
    none) and the local layers as EXAONE 4's flags (every 4th layer global where there are none); the routing it runs,
    the file's gating function, which it requires: the sigmoid (a file naming none or another is refused);
    block_count counts the next-token-prediction layers, which are not run."""
    if d.get("sliding_window") is not None:
        gguf_window_layers(d, get)
    gating = get("expert_gating_func")
    if gating != SIGMOID_GATING:
        raise ConfigError(
            f"expert_gating_func {gating!r}: EXAONE MoE routes with the sigmoid ({SIGMOID_GATING}), which llama.cpp's "
            "exaone-moe reads from that key"
        )
    nextn = get("nextn_predict_layers") or 0
    if nextn:
        d["num_nextn_predict_layers"] = nextn
        if _is_int(d.get("num_hidden_layers")):
            d["num_hidden_layers"] -= nextn


def _gguf_write_config(m: dict[str, Any], c: ExaoneMoeConfig) -> None:
    """As llama.cpp's ExaoneMoEModel writes it (EXAONE 4's keys, then its own): the head size only where
    config.json gives one, the shared experts' total length, the renormalisation, the sigmoid gating (the converter
    writes it from config.json's scoring_func, "sigmoid" in K-EXAONE's; llama.cpp's exaone-moe requires it, so it
    is written for a config without one too), next-token-prediction layers counted in block_count though their
    tensors are absent, RoPE scaling "none"."""
    exaone4_write_config(m, c)
    if "head_dim" not in c.to_dict():
        m.pop("attention.key_length", None)
        m.pop("attention.value_length", None)
    # the converter sets the scaling type "none" (after TextModel's): a scaled RoPE reads back plain, and is refused
    for key in [k for k in m if k.startswith("rope.scaling.")]:
        del m[key]
    m["rope.scaling.type"] = "none"
    m["expert_shared_feed_forward_length"] = c.moe_intermediate_size * c.num_shared_experts
    m["expert_weights_norm"] = c.norm_topk_prob
    m["expert_gating_func"] = SIGMOID_GATING
    nextn = c.extra.get("num_nextn_predict_layers", 0)
    m["block_count"] = c.num_hidden_layers + nextn
    m["nextn_predict_layers"] = nextn


class ExaoneMoeForCausalLM(CausalLM):
    """transformers' ExaoneMoeForCausalLM."""

    config_class = ExaoneMoeConfig
    checkpoint_rules = EXAONE_MOE_RULES
    # llama.cpp's ExaoneMoEModel converter: tensors by gguf-py's map (no q/k permutation: NeoX RoPE), experts
    # stacked, the correction bias as exp_probs_b.bias. Its exaone-moe graph routes without groups, with the file's
    # gating function, dense layers only as the leading ones (a model with other mlp_layer_types is refused), and
    # needs output.weight (no tied head)
    gguf = GGUFLayout(
        "exaone-moe",
        config=GGUF_KEYS,
        layer=GGUF_GROUPED_LAYER,
        fixed=(("n_group", 1), ("topk_group", 1), ("tie_word_embeddings", False)),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["ExaoneMoeDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: ExaoneMoeConfig):
        super().__init__(config, MixtralModel(config, ExaoneMoeDecoderLayer))
        self.checkpoint_rules = skip_nextn(type(self).checkpoint_rules, config)
