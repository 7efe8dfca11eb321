"""Cohere 2 MoE (CohereLabs/North-Mini-Code-1.0): Cohere 2's parallel block (attention and the feed-forward block
both on one norm's output, added to the residual), local layers with RoPE over interleaved pairs and a window,
global layers without position encoding; the feed-forward block a mixture of experts: the top `num_experts_per_tok`
router logits chosen, weighted by their softmax (`expert_selection_fn` "softmax") or by their sigmoids,
renormalised where `norm_topk_prob` ("sigmoid"), then, with `num_shared_experts`, a gated MLP of
intermediate_size * num_shared_experts every token passes, averaged with the experts' sum ("average") or added
("sum"). The first layers may be dense (`mlp_layer_types` "dense", a SwiGLU MLP of prefix_dense_intermediate_size),
with a layer pattern of their own (`prefix_dense_sliding_window_pattern`; with 1 they are global and, unlike the
other global layers, rotate). The norms are Cohere's LayerNorm, or RMSNorm where `rms_norm_eps` is set. Logits
times `logit_scale`; the head tied by default; head_dim its own (128 by default). Checkpoints keep one
gate/up/down tensor per expert (`mlp.experts.3.gate_proj.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Experts, GatedMLP, GGUFLayout, RMSNorm, Router, SparseMoeBlock
from .cohere import CohereLayerNorm
from .cohere2 import (
    Cohere2Config,
    Cohere2DecoderLayer,
    Cohere2ForCausalLM,
    gguf_layer_types,
    pattern_types,
    write_cohere_keys,
)
from .glm4_moe import GROUPED_MOE_TP
from .mixtral import GGUF_EXPERTS, validate_experts
from .qwen2_moe import QWEN_MOE_RULES

SOFTMAX_GATING, SIGMOID_GATING = 1, 2  # llama.cpp's expert_gating_func values


@dataclass(repr=False)
class Cohere2MoeConfig(Cohere2Config):
    """transformers' Cohere2MoeConfig: its fields and defaults; layer_types and mlp_layer_types derived as
    transformers derives them (config.json's first_k_dense_replace dense layers first, read and not written back).
    config.json holds rope_theta and rope_scaling beside rope_parameters, as transformers writes them."""

    model_type: ClassVar[str] = "cohere2_moe"
    absent_keys: ClassVar[tuple[str, ...]] = ()
    bool_fields: ClassVar[tuple[str, ...]] = (
        *Cohere2Config.bool_fields,
        "norm_topk_prob",
        "output_router_logits",
    )
    # compared through gguf_compared (what they change) or through the layers' windows and RoPE
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("sliding_window_pattern", "prefix_dense_sliding_window_pattern",
                                                    "prefix_dense_intermediate_size", "norm_topk_prob",
                                                    "shared_expert_combination_strategy")  # fmt: skip

    head_dim: int | None = 128
    rms_norm_eps: float | None = None
    num_experts_per_tok: int = 2
    num_experts: int = 8
    output_router_logits: bool = False
    num_shared_experts: int = 0
    shared_expert_combination_strategy: str = "average"
    expert_selection_fn: str = "softmax"
    mlp_layer_types: list[str] | None = None
    prefix_dense_sliding_window_pattern: int = 1
    norm_topk_prob: bool = True
    prefix_dense_intermediate_size: int | None = None
    sliding_window_pattern: int = 4

    def __post_init__(self) -> None:
        k, n = self.extra.pop("first_k_dense_replace", 0), self.num_hidden_layers
        if _is_int(n) and n > 0:  # else the base validation names num_hidden_layers
            if not _is_int(k) or not 0 <= k <= n:
                raise ConfigError(
                    f"{self.source}: first_k_dense_replace must be an integer in [0, {n}], found {k!r}"
                )
            if self.layer_types is None:
                self.layer_types = pattern_types(
                    k,
                    self.prefix_dense_sliding_window_pattern,
                    self.source,
                    "prefix_dense_sliding_window_pattern",
                ) + pattern_types(n - k, self.sliding_window_pattern, self.source)
            if self.mlp_layer_types is None:
                self.mlp_layer_types = ["dense"] * k + ["sparse"] * (n - k)
            elif isinstance(self.mlp_layer_types, list) and len(self.mlp_layer_types) > n:
                self.mlp_layer_types = self.mlp_layer_types[:n]  # as layer_types: the first n
        PretrainedConfig.__post_init__(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> PretrainedConfig:
        config = super().from_dict(d, source, **overrides)
        given = {**d, **overrides}
        config._rope_fields = (given.get("rope_theta", 10000.0), given.get("rope_scaling"))
        return config

    def to_dict(self) -> dict[str, Any]:
        """transformers writes rope_parameters and its rope_theta and rope_scaling fields."""
        out = super().to_dict()
        theta, scaling = getattr(self, "_rope_fields", (10000.0, None))
        out.setdefault("rope_parameters", dict(self.rope_parameters))
        out.setdefault("rope_theta", theta)
        out.setdefault("rope_scaling", scaling)
        return out

    def validate(self) -> None:
        eps, self.rms_norm_eps = self.rms_norm_eps, 1e-6 if self.rms_norm_eps is None else self.rms_norm_eps
        try:
            super().validate()
        finally:
            self.rms_norm_eps = eps
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        self._check_moe_fields()

    def _check_moe_fields(self) -> None:
        src, n = self.source, self.num_hidden_layers
        eps = self.rms_norm_eps
        if eps is not None and (not _is_number(eps) or not 0 < eps < 1):
            raise ConfigError(f"{src}: rms_norm_eps must be null or a positive number below 1, found {eps!r}")
        choices = (("shared_expert_combination_strategy", ("average", "sum")),
                   ("expert_selection_fn", ("softmax", "sigmoid")))  # fmt: skip
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{src}: {key} must be one of {allowed}, found {getattr(self, key)!r}")
        for key in ("num_shared_experts", "prefix_dense_intermediate_size", "sliding_window_pattern",
                    "prefix_dense_sliding_window_pattern"):  # fmt: skip
            v, least = getattr(self, key), int(key != "num_shared_experts")
            if not (_is_int(v) and v >= least) and not (
                v is None and key == "prefix_dense_intermediate_size"
            ):
                raise ConfigError(f"{src}: {key} must be an integer of at least {least}, found {v!r}")
        types = self.mlp_layer_types
        if not isinstance(types, list) or len(types) != n or not set(types) <= {"dense", "sparse"}:
            raise ConfigError(f"{src}: mlp_layer_types must list {n} entries of 'dense' or 'sparse', found "
                              f"{str(types)[:200]}")  # fmt: skip

    def layer_rope(self, i: int) -> str | None:
        """RoPE on the local layers, and on dense layers where prefix_dense_sliding_window_pattern is 1."""
        forced = self.mlp_layer_types[i] == "dense" and self.prefix_dense_sliding_window_pattern == 1
        return "default" if forced or self.layer_window(i) is not None else None

    def gguf_compared(self) -> dict[str, Any]:
        """What the fields left out of GGUF out's comparison change."""
        dense = "dense" in self.mlp_layer_types
        return {
            "dense MLP size": (self.prefix_dense_intermediate_size or self.intermediate_size)
            if dense
            else None,
            "shared experts' combination": self.shared_expert_combination_strategy
            if self.num_shared_experts
            else None,
            "top k renormalised": self.norm_topk_prob or self.expert_selection_fn == "softmax",
        }


class Cohere2MoeRouter(Router):
    """The top k of the router's logits, weighted by their softmax (in fp32), or by their sigmoids renormalised
    where `normalize`; the weights in the input's dtype, as transformers' Cohere2MoeTopKRouter."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, selection: str, normalize: bool):
        super().__init__(hidden, num_experts, top_k, order="topk_softmax", normalize=normalize)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(kernels.linear(x, self.weight, None), self.top_k, dim=-1)
        if self.selection == "softmax":
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        else:
            weights = torch.sigmoid(top)
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)


class Cohere2MoeSparseMoeBlock(SparseMoeBlock):
    """Router and experts, plus the shared experts' MLP: (experts + shared) / 2 with `average`, else their sum."""

    def __init__(self, router: Router, experts: Experts, shared_experts: nn.Module | None, average: bool):
        super().__init__(router, experts, shared_experts=shared_experts)
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        y = self.experts(flat, *self.gate(flat))
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(flat)
            if self.average:
                y = y / 2
        return y.view(B, T, h)


class Cohere2MoeDecoderLayer(Cohere2DecoderLayer):
    """Cohere 2's layer with a dense MLP or the experts, and LayerNorm or RMSNorm."""

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act, inter = config.hidden_size, config.hidden_act, config.intermediate_size
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.prefix_dense_intermediate_size or inter, act)
        router = Cohere2MoeRouter(h, config.num_experts, config.num_experts_per_tok, config.expert_selection_fn,
                                  config.norm_topk_prob)  # fmt: skip
        experts = Experts(config.num_experts, h, inter, act)
        shared = GatedMLP(h, inter * config.num_shared_experts, act) if config.num_shared_experts else None
        return Cohere2MoeSparseMoeBlock(
            router, experts, shared, config.shared_expert_combination_strategy == "average"
        )

    @staticmethod
    def make_norm(config: Any) -> nn.Module:
        if config.rms_norm_eps is not None:
            return RMSNorm(config.hidden_size, config.rms_norm_eps)
        return CohereLayerNorm(config.hidden_size, config.layer_norm_eps)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's cohere2moe: the RMS epsilon only where the file has one (then RMSNorm), next-token-prediction
    blocks not run, local layers as the flags say (else every 4th global, the first of each period), the leading
    dense_block_count layers dense and rotated, sigmoid gating unless the file names softmax, the shared experts
    averaged."""
    d["num_hidden_layers"] = d.get("num_hidden_layers", 0) - (get("nextn_predict_layers") or 0)
    d.setdefault("rms_norm_eps", None)
    gguf_layer_types(d, get, dense_first=True)
    n, lead = d["num_hidden_layers"], get("leading_dense_block_count") or 0
    d["mlp_layer_types"] = ["dense"] * lead + ["sparse"] * (n - lead)
    d["prefix_dense_sliding_window_pattern"] = 1
    d["prefix_dense_intermediate_size"] = get("feed_forward_length")
    gating = get("expert_gating_func")
    if gating not in (None, 0, SOFTMAX_GATING, SIGMOID_GATING):
        raise ConfigError(f"expert_gating_func {gating!r}: Cohere 2 MoE routes with the softmax "
                          f"({SOFTMAX_GATING}) or the sigmoid ({SIGMOID_GATING})")  # fmt: skip
    d["expert_selection_fn"] = "softmax" if gating == SOFTMAX_GATING else "sigmoid"
    d["norm_topk_prob"] = bool(get("expert_weights_norm", False))
    if gating == SOFTMAX_GATING and not d["norm_topk_prob"]:
        raise ConfigError("expert_weights_norm is false with softmax gating: llama.cpp would not renormalise the "
                          "top k's weights, which Cohere 2 MoE's softmax over them does")  # fmt: skip
    if get("expert_weights_scale") not in (None, 0, 0.0, 1, 1.0):
        raise ConfigError(
            f"expert_weights_scale {get('expert_weights_scale')!r}: Cohere 2 MoE scales nothing"
        )
    shared, length = get("expert_shared_count") or 0, get("expert_shared_feed_forward_length")
    if shared and length is not None and length != shared * d.get("intermediate_size", 0):
        raise ConfigError(f"expert_shared_feed_forward_length {length}: Cohere 2 MoE's shared experts are "
                          f"{shared} x the experts' length")  # fmt: skip


def _gguf_write_config(m: dict[str, Any], c: Cohere2MoeConfig) -> None:
    """What llama.cpp's Cohere2MoeModel converter writes: TextModel's keys (the dense layers' length as
    feed_forward_length where config.json has prefix_dense_intermediate_size, the RMS epsilon where set, the
    LayerNorm epsilon, the gating function), logit_scale, the window and the local layers' flags, the vocabulary
    size, the experts' lengths, the leading dense layers, the renormalisation, the shared experts, the head as the
    rotary dimensions, RoPE scaling type "none". Two keys as llama.cpp must read them where the converter's would
    not run the model: the renormalisation true with softmax gating (transformers renormalises it always), and the
    dense layers' length where config.json leaves it null (their MLP is then intermediate_size wide)."""
    write_cohere_keys(m, c)
    lead = next((i for i, t in enumerate(c.mlp_layer_types) if t != "dense"), len(c.mlp_layer_types))
    m.pop("feed_forward_length", None)
    if c.prefix_dense_intermediate_size is not None or lead:
        m["feed_forward_length"] = c.prefix_dense_intermediate_size or c.intermediate_size
    m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    m["leading_dense_block_count"] = lead
    softmax = c.expert_selection_fn == "softmax"
    m["expert_weights_norm"] = bool(c.norm_topk_prob) or softmax
    m["expert_gating_func"] = SOFTMAX_GATING if softmax else SIGMOID_GATING
    if c.num_shared_experts:
        m["expert_shared_feed_forward_length"] = c.intermediate_size * c.num_shared_experts
    else:
        m.pop("expert_shared_count", None)


class Cohere2MoeForCausalLM(Cohere2ForCausalLM):
    """transformers' Cohere2MoeForCausalLM: logits = lm_head(h) * logit_scale."""

    config_class = Cohere2MoeConfig
    checkpoint_rules = QWEN_MOE_RULES
    # llama.cpp's Cohere2MoeModel converter: tensors renamed by gguf-py's map (no q/k permutation: interleaved
    # pairs), each layer's experts stacked into ffn_{gate,up,down}_exps, the shared experts as *_shexp, an output
    # tensor where untied, zero biases dropped (its graph reads none). Its graph averages the shared experts' MLP
    # with the experts ("sum" is refused) and rotates every leading dense layer
    gguf = GGUFLayout(
        "cohere2moe",
        config=(
            ("attention.layer_norm_epsilon", "layer_norm_eps"),
            ("logit_scale", "logit_scale"),
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "intermediate_size"),
            ("expert_shared_count", "num_shared_experts"),
        ),
        layer=(
            *GGUF_EXPERTS,
            ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
            ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
        ),
        fixed=(("attention_bias", False), ("shared_expert_combination_strategy", "average")),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    # transformers' plan for attention and the dense MLPs (the shared experts' too); the experts whole on each rank
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["Cohere2MoeDecoderLayer"]
    layer_cls: ClassVar[type[nn.Module]] = Cohere2MoeDecoderLayer
