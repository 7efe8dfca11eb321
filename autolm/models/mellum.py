"""Mellum 2 (JetBrains): Laguna's layout of layers (full and sliding-window layers as `layer_types` says, RoPE by
layer type: base 500000 on the full layers, 10000 on the sliding ones, whole heads; `mlp_layer_types`, by default
every layer a mixture) with Qwen 3 MoE's attention
(per-head q/k RMSNorms, no output gate, `attention_bias` on q/k/v/o) and experts (softmax routing over
`num_experts`, the top `num_experts_per_tok` renormalised where `norm_topk_prob`, no shared expert). The dense
layers have a SiLU-gated MLP of `intermediate_size`.

Checkpoints may hold a multi-token-prediction layer (`num_nextn_predict_layers`, tensors under `mtp.`): as
transformers, autolm reads its settings and skips its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, GGUFLayout, Ignored
from .base import LLAMA_TP, CausalLM
from .cohere2 import gguf_layer_types
from .laguna import LayerTypedRopeConfig
from .mixtral import GGUF_EXPERTS, MixtralModel
from .qwen2_moe import GGUF_EXPERT_KEYS, QWEN_MOE_RULES, Qwen2MoeDecoderLayer

_MELLUM_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}


@dataclass(repr=False)
class MellumConfig(LayerTypedRopeConfig):
    """transformers' MellumConfig: its fields and defaults (config.json spells num_experts num_local_experts and
    num_mtp_layers num_nextn_predict_layers, as transformers writes them)."""

    model_type: ClassVar[str] = "mellum"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_experts": "num_local_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    }
    bool_fields: ClassVar[tuple[str, ...]] = (
        *LayerTypedRopeConfig.bool_fields,
        "attention_bias",
        "norm_topk_prob",
        "output_router_logits",
    )
    default_rope: ClassVar[dict[str, dict[str, Any]]] = _MELLUM_ROPE

    vocab_size: int = 98304
    hidden_size: int = 2304
    intermediate_size: int = 7168
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {k: dict(v) for k, v in _MELLUM_ROPE.items()}
    )
    attention_bias: bool = False
    sliding_window: int | None = 1024
    moe_intermediate_size: int = 896
    num_experts_per_tok: int = 8
    num_experts: int = 64
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    num_mtp_layers: int | None = None
    mtp_layer_types: list[str] | None = None
    mtp_mlp_layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if _is_int(self.num_mtp_layers) and self.num_mtp_layers > 0:
            if self.mtp_layer_types is None:
                self.mtp_layer_types = ["sliding_attention"] * self.num_mtp_layers
            if self.mtp_mlp_layer_types is None:
                self.mtp_mlp_layer_types = ["sparse"] * self.num_mtp_layers
        super().__post_init__()

    qkv_bias = property(lambda self: self.attention_bias)
    o_bias = property(lambda self: self.attention_bias)
    qk_norm = property(lambda self: True)

    def validate(self) -> None:
        super().validate()
        for kind, rope in self.rope_parameters.items():
            if rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise ConfigError(
                    f"{self.source}: rope_parameters[{kind!r}].partial_rotary_factor must be 1: Mellum rotates whole "
                    f"heads (transformers' and llama.cpp's), found {rope['partial_rotary_factor']!r}"
                )
        n = self.num_mtp_layers
        if n is not None and not (_is_int(n) and 0 <= n <= 1):
            raise ConfigError(
                f"{self.source}: num_nextn_predict_layers must be 0 or 1 (Mellum has at most one), found {n!r}"
            )


class MellumDecoderLayer(Qwen2MoeDecoderLayer):
    """Qwen 3 MoE's layer (pre-norm attention with q/k norms, a mixture or a dense MLP) reading its layer type's
    RoPE table."""

    def make_attention(self, config: MellumConfig, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, window=config.layer_window(layer_idx),
                         rope=config.layer_rope(layer_idx), qk_norm="head",
                         norm=lambda dim: self.norm(config, dim))  # fmt: skip


# per-expert tensors stacked (and GGUF's experts); the multi-token-prediction layer's tensors skipped
MELLUM_RULES = CheckpointRules([*QWEN_MOE_RULES.rules, Ignored(r"mtp\..+")])


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's reading of a mellum file: with a window, the layer types from attention.sliding_window_pattern
    (else every 4th layer full, the last of each period), else all full; one RoPE base for every layer (its graph
    rotates the sliding layers with rope.freq_base too)."""
    n = d.get("num_hidden_layers")
    if d.get("sliding_window"):
        gguf_layer_types(d, get, dense_first=False)
    elif _is_int(n) and n > 0:
        d["layer_types"] = ["full_attention"] * n
    rope = d.get("rope_parameters") or {}
    d["rope_parameters"] = {kind: dict(rope) for kind in ("full_attention", "sliding_attention")}


def _gguf_write_config(m: dict[str, Any], c: MellumConfig) -> None:
    """As llama.cpp's MellumModel converter writes it (TextModel's keys, the full layers' RoPE base, then the
    experts' length, the window and the layer flags); refused where llama.cpp's mellum would compute another
    model: dense layers (it runs every layer as a mixture), no renormalisation, attention biases, sliding layers
    with another RoPE base (it rotates them with the full layers')."""
    refuse = [("mlp_layer_types", any(t == "dense" for t in c.mlp_layer_types)),
              ("norm_topk_prob", not c.norm_topk_prob), ("attention_bias", c.attention_bias)]  # fmt: skip
    full, local = (c.rope_parameters.get(k, {}) for k in ("full_attention", "sliding_attention"))
    sliding = "sliding_attention" in c.layer_types
    refuse.append(("rope_parameters", sliding and local != full))
    for name, bad in refuse:
        if bad:
            raise ConfigError(
                f"{name}: llama.cpp's 'mellum' cannot run this model ({name}={getattr(c, name)!r})"
            )
    m.pop("attention.sliding_window", None)
    if "rope_theta" in local:
        m["rope.freq_base_swa"] = float(local["rope_theta"])
    if c.sliding_window is not None:
        m["attention.sliding_window"] = c.sliding_window
        m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]


class MellumForCausalLM(CausalLM):
    """transformers' MellumForCausalLM."""

    config_class = MellumConfig
    checkpoint_rules = MELLUM_RULES
    # transformers' plan: q/k/v and the dense MLP's gate/up column-parallel, o/down row-parallel, each expert's
    # intermediate rows cut (Experts.shard); the per-head q/k norms and the router whole
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    # llama.cpp's MellumModel converter: tensors by gguf-py's map (no q/k permutation: NeoX RoPE), experts stacked
    gguf = GGUFLayout(
        "mellum",
        config=(*GGUF_EXPERT_KEYS, ("attention.key_length", "head_dim")),
        layer=GGUF_EXPERTS,
        fixed=(("norm_topk_prob", True), ("attention_bias", False)),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["MellumDecoderLayer"]

    def __init__(self, config: MellumConfig):
        super().__init__(config, MixtralModel(config, MellumDecoderLayer))
