"""DeepSeek-OCR 2's and Unlimited-OCR's language model: DeepSeek-V2's mixture of experts (models.deepseek_v2: the
softmax router's top k, greedy or group-limited, times `routed_scaling_factor`, never renormalised, plus the shared
experts) under Llama's attention (grouped-query q/k/v/o projections, rotate-half RoPE; no latent attention).

Which layers hold the experts is `mlp_layer_types` ("dense": a gated MLP of intermediate_size; "sparse": the
mixture); config.json files that give DeepSeek's `first_k_dense_replace` instead read as its dense first layers
(Unlimited-OCR's transformers config does so, its default 1). The head size is always hidden_size /
num_attention_heads, as transformers sets it whatever config.json says.

Unlimited-OCR (`unlimited_ocr_text`) is this model with other defaults and transformers' "reference sliding window"
attention (R-SWA, nn.attention.ReferenceWindow): a token sees the whole prompt (the tokens of the cache's first
forward, KVCache.prefill; every key without a cache) and itself with the `sliding_window` - 1 tokens before it.
The general forward computes it (a forward continuing a cache too), so it decodes every token (no one-token step);
the serving engine and speculative decoding refuse it. Past the window, transformers' left-padded batches attend
some of their padding (its mask reads the prompt's padding shifted by the window's offset); autolm keeps it masked,
each row's tokens those transformers gives the row alone.

The image-text checkpoints (`deepseek_ocr2`, `unlimited_ocr`) load as this language model: transformers 5 writes
them in DeepSeek's original layout (model.embed_tokens / layers / norm at the top, one tensor per expert, the SAM
and Qwen 2 / CLIP vision encoders as model.sam_model / model.qwen2_model / model.vision_model, the projector, the
view separator), and models it as model.language_model.*; both load, the towers skipped.

GGUF: llama.cpp's converter writes DeepSeek-OCR's language models as "deepseek2-ocr" (GGUF_OCR below); Unlimited-OCR's
files load as DeepSeek-OCR 2's model, the whole-context attention llama.cpp runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GatedMLP, GGUFLayout, Ignored, ReferenceWindow, SparseMoeBlock
from .base import CausalLM
from .deepseek_v2 import SOFTMAX_GATING, TOPK_METHODS, DeepseekV2TopkRouter
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig
from .mixtral import GGUF_EXPERTS, MOE_TP, MixtralDecoderLayer, MixtralModel, validate_experts
from .qwen2_moe import QWEN_MOE_RULES

MLP_KINDS = ("dense", "sparse")


@dataclass(repr=False)
class DeepseekOcr2TextConfig(LlamaConfig):
    """transformers' DeepseekOcr2TextConfig: its fields and defaults, but for num_experts_per_tok (transformers'
    null, which no model runs: DeepSeek-V2's 6). mlp_layer_types must be given (or first_k_dense_replace)."""

    model_type: ClassVar[str] = "deepseek_ocr2_text"
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "output_router_logits")

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    n_group: int | None = None
    n_routed_experts: int = 64
    output_router_logits: bool = False
    n_shared_experts: int = 2
    routed_scaling_factor: float = 1.0
    topk_group: int | None = None
    topk_method: str | None = "greedy"
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1407
    mlp_layer_types: list[str] | None = None

    # DeepSeek's own spelling of which layers are dense, where mlp_layer_types is not given
    dense_first: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if _is_int(self.hidden_size) and _is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads  # transformers' whatever is given
        first = self.extra.pop("first_k_dense_replace", self.dense_first)
        if self.mlp_layer_types is None and first is not None and _is_int(self.num_hidden_layers):
            if not _is_int(first) or first < 0:
                raise ConfigError(
                    f"{self.source}: first_k_dense_replace must be a non-negative integer, found {first!r}"
                )
            self.mlp_layer_types = ["dense" if i < first else "sparse" for i in range(self.num_hidden_layers)]
        super().__post_init__()

    @property
    def grouped(self) -> bool:
        """Whether routing is limited to topk_group of n_group groups (DeepSeek-V2's router reads it)."""
        return self.topk_method == "group_limited_greedy"

    @property
    def num_experts(self) -> int:
        return self.n_routed_experts

    def validate(self) -> None:
        super().validate()
        src, kinds = self.source, self.mlp_layer_types
        if kinds is not None and (
            not isinstance(kinds, list) or len(kinds) != self.num_hidden_layers or set(kinds) - set(MLP_KINDS)
        ):
            raise ConfigError(f"{src}: mlp_layer_types must list {MLP_KINDS} for each of the "
                              f"{self.num_hidden_layers} layers, found {str(kinds)[:200]}")  # fmt: skip
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"{src}: topk_method must be one of {TOPK_METHODS}, found {self.topk_method!r}")
        validate_experts(self, self.n_routed_experts, self.num_experts_per_tok)
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if (v is not None or self.grouped) and not (_is_int(v) and 0 < v <= 1 << 12):
                raise ConfigError(f"{src}: {name} must be a positive integer"
                                  f"{'' if self.grouped else ' or null'}, found {v!r}")  # fmt: skip
        if self.grouped and (self.n_routed_experts % self.n_group or self.topk_group > self.n_group):
            raise ConfigError(f"{src}: n_group ({self.n_group}) must divide n_routed_experts "
                              f"({self.n_routed_experts}) and be at least topk_group ({self.topk_group})")  # fmt: skip
        for name in ("moe_intermediate_size", "n_shared_experts"):
            if not _is_int(getattr(self, name)) or not 0 < getattr(self, name) <= 1 << 19:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {getattr(self, name)!r}")
        if not _is_number(self.routed_scaling_factor) or not self.routed_scaling_factor > 0:
            raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, "
                              f"found {self.routed_scaling_factor!r}")  # fmt: skip

    def layer_mlp(self, i: int) -> str:
        """Layer i's feed-forward block: "dense" or "sparse"."""
        if self.mlp_layer_types is None:
            raise ConfigError(f"{self.source}: mlp_layer_types (or first_k_dense_replace) must say which layers "
                              "hold the experts; transformers builds no model without it")  # fmt: skip
        return self.mlp_layer_types[i]


@dataclass(repr=False)
class UnlimitedOcrTextConfig(DeepseekOcr2TextConfig):
    """transformers' UnlimitedOcrTextConfig: DeepSeek-OCR 2's with Unlimited-OCR's defaults, its first layer dense
    where config.json gives neither mlp_layer_types nor first_k_dense_replace, every layer's attention the reference
    sliding window (see the module docstring) of `sliding_window` generated tokens."""

    model_type: ClassVar[str] = "unlimited_ocr_text"
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "reference_sliding_attention")
    dense_first: ClassVar[int | None] = 1

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int | None = 10
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    moe_intermediate_size: int = 896
    n_group: int | None = 1
    topk_group: int | None = 1
    num_experts_per_tok: int = 6
    sliding_window: int | None = 128

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers):
            kind = "full_attention" if self.sliding_window is None else "reference_sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.sliding_window) or self.sliding_window <= 0:
            raise ConfigError(f"{self.source}: sliding_window must be a positive integer (Unlimited-OCR's "
                              f"reference sliding window), found {self.sliding_window!r}")  # fmt: skip

    def layer_window(self, i: int) -> int | None:
        if self.layer_types[i] == "full_attention":
            return None
        return ReferenceWindow(self.sliding_window)  # the prompt, and the window's tokens (see above)


class DeepseekOcr2TextDecoderLayer(MixtralDecoderLayer):
    """Pre-norm Llama attention, then a pre-norm gated MLP ("dense") or DeepSeek-V2's mixture ("sparse")."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act, bias = config.hidden_size, config.hidden_act, config.mlp_bias
        if config.layer_mlp(layer_idx) == "dense":
            return GatedMLP(h, config.intermediate_size, act, bias=bias)
        experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act, bias=bias)
        return SparseMoeBlock(DeepseekV2TopkRouter(config), experts, shared_experts=shared)


# the original layout's vision encoders (SAM, DeepSeek-OCR 2's Qwen 2 encoder, Unlimited-OCR's CLIP one: matched by
# IMAGE_TEXT_RULES as vision_model) and the learned separator between an image's views
OCR_TOWERS = (Ignored(r"(model\.)?(sam_model|qwen2_model)\..+"), Ignored(r"(model\.)?view_sep(a|e)rator"))


class StackedOnSave(CheckpointRules):
    """Rules whose per-expert tensors (the original layout) load stacked, and stay stacked when saved: transformers'
    text model of DeepSeek-OCR 2 (no conversion of its own) holds and writes them so."""

    def to_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._back(name): t for name, t in self._fused(state_dict).items()}


# ---- GGUF: llama.cpp's DeepseekV2Model converter on DeepSeek-OCR's files (arch "deepseek2-ocr") ------------------
# llama.cpp's graph (src/models/deepseek2.cpp, is_ocr) runs Llama's attention with as many key/value heads as query
# heads, rotate-half RoPE over the whole head at base 10000 (asserted), unscaled; gated MLPs in the first
# leading_dense_block_count layers, DeepSeek-V2's mixture in the others (softmax routing, no expert groups, no
# renormalisation, expert_weights_scale, the shared experts); no biases but q/k/v's.


def _gguf_ocr_config(d: dict[str, Any], get) -> None:
    """The reader's side: the leading dense layers as mlp_layer_types, greedy routing (the graph reads no expert
    groups), key/value heads as many as the query heads, the head size hidden / heads (the converter writes
    DeepSeek's qk_rope_head_dim, 0, as rope.dimension_count); Unlimited-OCR's sliding window, which the graph
    ignores, dropped."""
    gating = get("expert_gating_func")
    if gating not in (None, SOFTMAX_GATING):
        raise ConfigError(
            f"expert_gating_func {gating!r}: DeepSeek-OCR 2 routes with the softmax ({SOFTMAX_GATING})"
        )
    if get("expert_weights_norm"):
        raise ConfigError("expert_weights_norm: llama.cpp would renormalise the chosen experts' weights, "
                          "which DeepSeek-OCR 2 does not")  # fmt: skip
    d.pop("head_dim", None)
    d.pop("sliding_window", None)
    d["num_key_value_heads"] = d.get("num_attention_heads")
    first, n = get("leading_dense_block_count", 0), d.get("num_hidden_layers")
    if _is_int(first) and _is_int(n):
        d["mlp_layer_types"] = ["dense" if i < first else "sparse" for i in range(n)]
    d["n_group"], d["topk_group"] = get("expert_group_count"), get("expert_group_used_count")
    d["topk_method"] = "greedy"
    d.setdefault("routed_scaling_factor", 1.0)


def _gguf_ocr_write_config(m: dict[str, Any], c: DeepseekOcr2TextConfig) -> None:
    """The converter's keys beyond the layout's; refused, by field, what llama.cpp's graph would run otherwise."""
    arch = "llama.cpp's deepseek2-ocr"
    if c.num_key_value_heads != c.num_attention_heads:
        raise ConfigError(f"num_key_value_heads {c.num_key_value_heads}: {arch} runs as many key/value heads as "
                          f"attention heads ({c.num_attention_heads})")  # fmt: skip
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"rope_parameters' rope_type {rope['rope_type']!r}: {arch} turns unscaled RoPE only"
        )
    if float(rope.get("rope_theta", 10000.0)) != 10000.0:
        raise ConfigError(f"rope_theta {rope['rope_theta']}: {arch} runs RoPE at base 10000 only")
    kinds = [c.layer_mlp(i) for i in range(c.num_hidden_layers)]
    first = kinds.index("sparse") if "sparse" in kinds else len(kinds)
    if "dense" in kinds[first:]:
        raise ConfigError(
            f"mlp_layer_types {kinds}: {arch} runs dense MLPs in a leading count of layers only"
        )
    if c.grouped:
        raise ConfigError(f"topk_method {c.topk_method!r}: {arch} reads no expert groups and routes greedily")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(c, field):
            raise ConfigError(f"{field}: {arch} has no output projection or MLP biases")
    if c.extra.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"scoring_func {c.extra['scoring_func']!r}: DeepSeek-OCR 2 routes with the softmax")
    m["leading_dense_block_count"] = first
    m["rope.dimension_count"] = (
        0  # DeepSeek's qk_rope_head_dim, as the converter writes it (RoPE turns the head)
    )
    m.update((k, v) for k, v in (("expert_group_count", c.n_group), ("expert_group_used_count", c.topk_group))
             if v is not None)  # fmt: skip
    if c.extra.get("scoring_func") == "softmax":
        m["expert_gating_func"] = SOFTMAX_GATING


GGUF_OCR = GGUFLayout(
    "deepseek2-ocr",
    config=(("expert_feed_forward_length", "moe_intermediate_size"), ("expert_count", "n_routed_experts"),
            ("expert_used_count", "num_experts_per_tok"), ("expert_shared_count", "n_shared_experts"),
            ("expert_weights_scale", "routed_scaling_factor")),
    layer=(*GGUF_EXPERTS, *((f"ffn_{p}_shexp", f"mlp.shared_experts.{p}_proj") for p in ("gate", "up", "down"))),
    fixed=(("attention_bias", False), ("mlp_bias", False)),
    derive=_gguf_ocr_config,
    write_config=_gguf_ocr_write_config,
)  # fmt: skip


class DeepseekOcr2TextForCausalLM(CausalLM):
    """transformers' DeepseekOcr2ForConditionalGeneration on text (its language model and head)."""

    config_class = DeepseekOcr2TextConfig
    # the original layout's per-expert tensors loaded as DeepSeek-V2's (Qwen MoE's rules)
    checkpoint_rules = StackedOnSave([*IMAGE_TEXT_RULES, *OCR_TOWERS, *QWEN_MOE_RULES.rules])
    # llama.cpp's converter writes DeepSeek-OCR (2)'s language model as "deepseek2-ocr" (see GGUF_OCR)
    gguf = GGUF_OCR
    # transformers' plan: q/k/v/o and the dense and shared MLPs split as Llama's; the experts stay whole
    tp_patterns: ClassVar[dict[str, str]] = {
        **MOE_TP,
        **{f"layers.*.mlp.{m}{p}": s for m in ("", "shared_experts.")
           for p, s in (("gate_proj", "colwise"), ("up_proj", "colwise"), ("down_proj", "rowwise"))},
    }  # fmt: skip
    _no_split_modules: ClassVar[list[str]] = ["DeepseekOcr2TextDecoderLayer"]

    def __init__(self, config: DeepseekOcr2TextConfig):
        super().__init__(config, MixtralModel(config, DeepseekOcr2TextDecoderLayer))


class UnlimitedOcrTextForCausalLM(DeepseekOcr2TextForCausalLM):
    """transformers' UnlimitedOcrForConditionalGeneration on text (see the module docstring on its attention)."""

    config_class = UnlimitedOcrTextConfig
    # the reference sliding window runs in the general forward only (the one-token step has none), and needs the
    # cache's prefill to be the row's whole first prompt: no serving engine, no speculative decoding
    one_token_step: ClassVar[bool] = False
    reference_prompt: ClassVar[bool] = True
    # llama.cpp's deepseek2-ocr runs no reference sliding window: its files (Unlimited-OCR's too) load as DeepSeek-OCR
    # 2's model, which computes what llama.cpp does; none is written of this one
    gguf = None


class DeepseekOcr2Config(ImageTextConfig):
    """transformers' DeepseekOcr2Config (DeepSeek-OCR 2): its language model's; the head untied by default."""

    model_type: ClassVar[str] = "deepseek_ocr2"
    text_class: ClassVar[type] = DeepseekOcr2TextConfig
    tie_default: ClassVar[bool | None] = False


class UnlimitedOcrConfig(DeepseekOcr2Config):
    """transformers' UnlimitedOcrConfig (Unlimited-OCR); the original files hold the language model's settings as
    `language_config`, its sliding_window at the top level."""

    model_type: ClassVar[str] = "unlimited_ocr"
    text_class: ClassVar[type] = UnlimitedOcrTextConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        if (
            isinstance(d, dict)
            and d.get("text_config") is None
            and isinstance(d.get("language_config"), dict)
        ):
            text = dict(d["language_config"])
            if "sliding_window" in d:
                text["sliding_window"] = d["sliding_window"]
            text["model_type"] = "unlimited_ocr_text"  # the original's is DeepSeek-V2's
            d = {**d, "text_config": text}
        return super().from_dict(d, source, **overrides)
