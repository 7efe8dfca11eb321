"""dots.llm1 (rednote-hilab's dots.llm1.base and .inst): Qwen 3's attention (per-head q/k RMSNorms, rotate-half
RoPE over whole heads, biases only with `attention_bias`, on o_proj too) with GLM-4.5's feed-forward blocks (a dense
gated MLP in the first `first_k_dense_replace` layers, then DeepSeek V3's sigmoid-routed experts with a
correction bias, groups, renormalisation and scaling, plus ungated shared experts; models.glm4_moe).

Layers from `max_window_layers` on attend within `sliding_window` when `layer_types` says nothing else (transformers'
default: none below the default max_window_layers, which equals the layer count). Checkpoints keep one tensor per
expert, as Qwen 2 MoE's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import GGUFLayout
from .base import CausalLM
from .glm4_moe import (
    GGUF_GROUPED_KEYS,
    GGUF_GROUPED_LAYER,
    GROUPED_MOE_RULES,
    GROUPED_MOE_TP,
    SIGMOID_GATING,
    grouped_moe_mlp,
    validate_grouped_moe,
    write_grouped_keys,
)
from .llama import LlamaConfig
from .mixtral import MixtralDecoderLayer, MixtralModel


@dataclass(repr=False)
class Dots1Config(LlamaConfig):
    """transformers' Dots1Config: its fields and defaults (the experts' counts have none: config.json gives them)."""

    model_type: ClassVar[str] = "dots1"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "norm_topk_prob")

    vocab_size: int = 152064
    hidden_size: int = 4608
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 62
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    output_router_logits: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 62
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        n, window, top = self.num_hidden_layers, self.sliding_window, self.max_window_layers
        if self.layer_types is None and _is_int(n) and _is_int(top):
            self.layer_types = [
                "sliding_attention" if window is not None and i >= top else "full_attention" for i in range(n)
            ]
        super().__post_init__()

    qk_norm = property(lambda self: True)
    num_local_experts = property(lambda self: self.n_routed_experts)  # transformers' alias

    def validate(self) -> None:
        super().validate()
        for name in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok"):
            if getattr(self, name) is None:
                raise ConfigError(f"{self.source}: {name} must be given (dots.llm1's config has no default)")
        validate_grouped_moe(self)


class Dots1DecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention (q/k norms), then a pre-norm dense MLP (the first `first_k_dense_replace` layers) or
    mixture with shared experts."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return grouped_moe_mlp(config, layer_idx)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """What llama.cpp's dots1 runs of a file: k and v as wide as q (no grouped-query attention: a file with fewer KV
    heads does not load there) and the experts chosen by the file's gating function (none: it aborts), which must
    be dots.llm1's sigmoid; both refused here otherwise."""
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv is not None and kv != heads:
        raise ConfigError(f"llama.cpp's dots1 runs no grouped-query attention: num_key_value_heads "
                          f"(attention.head_count_kv {kv!r}) must equal num_attention_heads ({heads!r})")  # fmt: skip
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: dots.llm1 routes with the sigmoid "
                          f"({SIGMOID_GATING}), which llama.cpp's dots1 reads from that key")  # fmt: skip


def _gguf_write_config(m: dict[str, Any], c: Dots1Config) -> None:
    """TextModel's keys (no vocabulary size, no rotary dimensions; the expert groups), the experts' booleans and the
    sigmoid gating (the converter writes it from config.json's scoring_func; llama.cpp's dots1 needs it, so it is
    written for a config without one too)."""
    m.pop("vocab_size", None)
    m.pop("rope.dimension_count", None)
    if "head_dim" not in c.to_dict():  # the head size only where config.json gives one (TextModel)
        m.pop("attention.key_length", None)
        m.pop("attention.value_length", None)
    m["expert_group_count"] = c.n_group  # config.json's groups, as TextModel writes them
    m["expert_group_used_count"] = c.topk_group
    write_grouped_keys(m, c)


class Dots1ForCausalLM(CausalLM):
    """transformers' Dots1ForCausalLM."""

    config_class = Dots1Config
    checkpoint_rules = GROUPED_MOE_RULES
    # llama.cpp's Dots1Model converter (a Qwen2MoeModel): TextModel's keys, the experts' keys as GLM-4.5's, the
    # sigmoid gating; tensors by gguf-py's map, no q/k permutation (NeoX RoPE). llama.cpp's dots1 runs no attention
    # biases (q/k/v ones load, attn_output.bias does not), no sliding window, no expert groups, no tied head
    # (output.weight is required) and no GQA (_gguf_derive)
    gguf = GGUFLayout(
        "dots1",
        config=(("attention.key_length", "head_dim"), *GGUF_GROUPED_KEYS),
        layer=GGUF_GROUPED_LAYER,
        fixed=(
            ("attention_bias", False),
            ("sliding_window", None),
            ("n_group", 1),
            ("topk_group", 1),
            ("tie_word_embeddings", False),
        ),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Dots1DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: Dots1Config):
        super().__init__(config, MixtralModel(config, Dots1DecoderLayer))
