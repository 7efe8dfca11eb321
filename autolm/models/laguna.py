"""Laguna (poolside: Laguna-XS.2, Laguna-M.1): full and sliding-window layers as `layer_types` says, each type with
its own RoPE (rope_parameters by layer type: by default the full layers rotate half of each head with base 500000,
the sliding ones all of it with base 10000; the dimensions past the rotary ones pass through). Attention has GQA
with `num_attention_heads_per_layer` query heads (one count per layer), per-head RMSNorms on queries and keys
(before RoPE) and an output gate: the heads' output times softplus(x @ `g_proj`) (in fp32) before `o_proj`, one
gate per head broadcast over the head (`gating` true or "per-head") or one per output element ("per-element").

`mlp_layer_types` says which layers have a dense SiLU-gated MLP (`intermediate_size`; by default the first) and
which a mixture of `num_experts` gated MLPs (`moe_intermediate_size`): the router (`mlp.gate`) scores every expert
with sigmoid(logits) in fp32 (the logits first soft-capped by tanh where `moe_router_logit_softcapping` > 0), the
top `num_experts_per_tok` of the scores plus `e_score_correction_bias` are chosen, and their plain scores,
renormalised to sum 1 and times `moe_routed_scaling_factor`, weight the experts' outputs; plus `shared_experts`, one
gated MLP of `shared_expert_intermediate_size` that every token passes. Checkpoints keep one tensor per expert, the
router's bias as `mlp.experts.e_score_correction_bias` and the shared MLP as `mlp.shared_expert` (transformers
renames them while loading, back while saving; so does autolm). GGUF in and out as llama.cpp's "laguna":
laguna_gguf.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
)
from ..nn.moe import GroupedRouter
from .afmoe import AfmoeAttention
from .base import CausalLM
from .glm4_moe import GGUF_GROUPED_LAYER, GROUPED_MOE_RULES, GROUPED_MOE_TP
from .glm4_moe_lite import MLP_TYPES
from .laguna_gguf import GGUF_KEYS, derive, write_config
from .mixtral import MixtralDecoderLayer, MixtralModel, validate_experts

_KINDS = ("full_attention", "sliding_attention")


def rope_by_kind(given: Any, d: dict[str, Any], source: str, kinds: tuple[str, ...], one) -> dict[str, Any]:
    """rope_parameters by layer type (`kinds`), each read as one RoPE setting by `one` (PretrainedConfig.read_rope
    of {"rope_parameters": ..., "max_position_embeddings": ...})."""
    if not isinstance(given, dict) or not given or set(given) - set(kinds):
        raise ConfigError(f"{source}: rope_parameters must be an object by layer type ({', '.join(kinds)}), "
                          f"found {str(given)[:100]}")  # fmt: skip
    out = {}
    for kind, params in given.items():
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters[{kind!r}] must be an object, found {params!r}")
        out[kind], _ = one(
            {"rope_parameters": params, "max_position_embeddings": d.get("max_position_embeddings")}
        )
    return out


@dataclass(repr=False)
class LayerTypedRopeConfig(PretrainedConfig):
    """What Laguna and Mellum share: rope_parameters by layer type (each read as one RoPE setting; a kind's
    `partial_rotary_factor`, 1 where absent, is the share of each head it rotates), layer_types all full by default,
    and `mlp_layer_types` ("dense" or "sparse" per layer; `default_mlp_types` where config.json gives none)."""

    partial_rotary_default: ClassVar[bool] = True
    default_rope: ClassVar[dict[str, dict[str, Any]]] = {}

    mlp_layer_types: list[str] | None = None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        given = d.get("rope_parameters")
        parent = super().read_rope
        one = lambda inner: parent(inner, source)  # noqa: E731
        return rope_by_kind(cls.default_rope if given is None else given, d, source, _KINDS, one), "v5"

    @staticmethod
    def default_mlp_types(n: int) -> list[str]:
        return ["sparse"] * n

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n) and n > 0:
            if self.layer_types is None:
                self.layer_types = ["full_attention"] * n
            if self.mlp_layer_types is None:
                self.mlp_layer_types = self.default_mlp_types(n)
        super().__post_init__()

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {kind: self.rope_parameters[kind] for kind in _KINDS if kind in self.layer_types}

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    def sparse(self, i: int) -> bool:
        return self.mlp_layer_types[i] == "sparse"

    def validate(self) -> None:
        super().validate()
        src, n = self.source, self.num_hidden_layers
        types = self.mlp_layer_types
        if not isinstance(types, list) or len(types) != n or set(types) - set(MLP_TYPES):
            raise ConfigError(
                f"{src}: mlp_layer_types must list {n} of {MLP_TYPES}, found {str(types)[:200]}"
            )
        for kind in self.rope_kinds():
            factor = self.rope_parameters[kind].get("partial_rotary_factor", 1.0)
            if not _is_number(factor) or not 0 < factor <= 1 or int(self.head_dim * factor) % 2:
                raise ConfigError(
                    f"{src}: rope_parameters[{kind!r}].partial_rotary_factor must be a number in (0, 1] that "
                    f"leaves an even number of rotary dimensions of the {self.head_dim} in a head, found {factor!r}"
                )
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        v = self.moe_intermediate_size
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{src}: moe_intermediate_size must be a positive integer, found {v!r}")


@dataclass(repr=False)
class LagunaConfig(LayerTypedRopeConfig):
    """transformers' LagunaConfig: its fields and defaults (no BOS / EOS ids; the first layer dense)."""

    model_type: ClassVar[str] = "laguna"
    # GGUF out compares the gate's kind (gguf_compared), not how `gating` spells it; the per-layer heads, not the
    # scalar count (which nothing computes with where head_dim is given)
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("gating", "num_attention_heads")
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "output_router_logits",
        "moe_apply_router_weight_on_input",
    )
    default_rope: ClassVar[dict[str, dict[str, Any]]] = {
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    }

    vocab_size: int = 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 40
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = 512
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {k: dict(v) for k, v in _LAGUNA_ROPE.items()}
    )
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 8
    num_experts: int = 256
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    attention_bias: bool = False
    gating: bool | str = True
    num_attention_heads_per_layer: list[int] | None = None
    moe_routed_scaling_factor: float = 1.0
    moe_apply_router_weight_on_input: bool = False
    moe_router_logit_softcapping: float = 0.0

    @staticmethod
    def default_mlp_types(n: int) -> list[str]:
        return ["dense"] + ["sparse"] * (n - 1)

    def __post_init__(self) -> None:
        if self.num_attention_heads_per_layer is None and _is_int(self.num_hidden_layers):
            self.num_attention_heads_per_layer = [self.num_attention_heads] * max(self.num_hidden_layers, 0)
        super().__post_init__()

    @property
    def gate_per_head(self) -> bool:
        """transformers' reading of `gating`: true or "per-head" one gate per head, else one per element."""
        return self.gating is True or self.gating == "per-head"

    def gguf_compared(self) -> dict[str, Any]:
        return {"gate per head": self.gate_per_head}

    def validate(self) -> None:
        super().validate()
        src, n, nkv = self.source, self.num_hidden_layers, self.num_key_value_heads
        heads = self.num_attention_heads_per_layer
        if (not isinstance(heads, list) or len(heads) != n
                or not all(_is_int(h) and h > 0 and h % nkv == 0 for h in heads)):  # fmt: skip
            raise ConfigError(
                f"{src}: num_attention_heads_per_layer must list {n} positive multiples of num_key_value_heads "
                f"({nkv}), found {str(heads)[:200]}"
            )
        if not isinstance(self.gating, bool) and self.gating not in ("per-head", "per-element"):
            raise ConfigError(
                f"{src}: gating must be true, false, 'per-head' or 'per-element', found {self.gating!r}"
            )
        if self.moe_apply_router_weight_on_input:
            raise ConfigError(
                f"{src}: moe_apply_router_weight_on_input=true is not supported (nor by transformers)"
            )
        v = self.shared_expert_intermediate_size
        if not _is_int(v) or v < 1:
            raise ConfigError(
                f"{src}: shared_expert_intermediate_size must be a positive integer, found {v!r}"
            )
        if not _is_number(self.moe_routed_scaling_factor):
            raise ConfigError(
                f"{src}: moe_routed_scaling_factor must be a number, found {self.moe_routed_scaling_factor!r}"
            )
        cap = self.moe_router_logit_softcapping
        if not _is_number(cap) or cap < 0:
            raise ConfigError(f"{src}: moe_router_logit_softcapping must be a number >= 0, found {cap!r}")


_LAGUNA_ROPE = LagunaConfig.default_rope


class LagunaAttention(AfmoeAttention):
    """AFMoE's attention (per-head q/k norms, the output gated) with this layer's query heads, RoPE by layer type
    and the gate softplus(x @ g_proj) per head or per element."""

    def __init__(self, config: LagunaConfig, layer_idx: int):
        nh, hd = config.num_attention_heads_per_layer[layer_idx], config.head_dim
        Attention.__init__(self, config.hidden_size, nh, config.num_key_value_heads, hd, layer_idx,
                           bias=config.attention_bias, window=config.layer_window(layer_idx),
                           rope=config.layer_rope(layer_idx), qk_norm="head",
                           norm=lambda dim: RMSNorm(dim, config.rms_norm_eps))  # fmt: skip
        self.gate_per_head = config.gate_per_head
        self.g_proj = Linear(config.hidden_size, nh if self.gate_per_head else nh * hd, bias=False)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = F.softplus(self.g_proj(x).float()).to(y.dtype)
        if not self.gate_per_head:
            return y * g
        B, T, _ = y.shape
        return (y.view(B, T, self.num_heads, self.head_dim) * g.unsqueeze(-1)).view(B, T, -1)


class LagunaRouter(GroupedRouter):
    """transformers' LagunaTopKRouter: the logits in the weight's dtype then fp32, soft-capped where `softcap` > 0,
    sigmoid; the top k of scores + e_score_correction_bias chosen, their scores renormalised, times `scaling`, in
    the input's dtype."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, scaling: float, softcap: float):
        super().__init__(hidden, num_experts, top_k, scaling=scaling)
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = kernels.linear(x, self.weight).float()
        if self.softcap > 0:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        scores = logits.sigmoid()
        ids = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        return ids, (top / top.sum(dim=-1, keepdim=True) * self.scaling).to(x.dtype)


class LagunaDecoderLayer(MixtralDecoderLayer):
    """Pre-norm gated attention, then a pre-norm dense MLP or mixture (mlp_layer_types)."""

    def make_attention(self, config: LagunaConfig, layer_idx: int) -> Attention:
        return LagunaAttention(config, layer_idx)

    def make_mlp(self, config: LagunaConfig, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if not config.sparse(layer_idx):
            return GatedMLP(h, config.intermediate_size, act)
        router = LagunaRouter(h, config.num_experts, config.num_experts_per_tok,
                              float(config.moe_routed_scaling_factor), float(config.moe_router_logit_softcapping))  # fmt: skip
        experts = Experts(config.num_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.shared_expert_intermediate_size, act)
        return SparseMoeBlock(router, experts, shared_experts=shared)


# the checkpoint's names for the router's bias and the shared MLP; per-expert tensors stacked (and GGUF's names)
LAGUNA_RULES = CheckpointRules(
    [
        *GROUPED_MOE_RULES.rules,
        Rename(
            r"\.mlp\.experts\.e_score_correction_bias$",
            ".mlp.gate.e_score_correction_bias",
            r"\.mlp\.gate\.e_score_correction_bias$",
            ".mlp.experts.e_score_correction_bias",
        ),
        Rename(
            r"\.mlp\.shared_expert\.",
            ".mlp.shared_experts.",
            r"\.mlp\.shared_experts\.",
            ".mlp.shared_expert.",
        ),
    ]
)


class LagunaForCausalLM(CausalLM):
    """transformers' LagunaForCausalLM."""

    config_class = LagunaConfig
    checkpoint_rules = LAGUNA_RULES
    # llama.cpp's LagunaModel converter: tensors by gguf-py's map (no q/k permutation: NeoX RoPE), g_proj as
    # attn_gate, the experts stacked, the router's bias as exp_probs_b.bias, the shared MLP as *_shexp
    gguf = GGUFLayout(
        "laguna",
        config=GGUF_KEYS,
        layer=(("attn_gate", "self_attn.g_proj"), *GGUF_GROUPED_LAYER),
        fixed=(("attention_bias", False), ("moe_router_logit_softcapping", 0.0)),
        shaped=(("blk.0.attn_gate.weight", "gating"),),
        unprefixed=("tokenizer.ggml.eot_token_id",),
        derive=derive,
        write_config=write_config,
    )
    # transformers' plan: q/k/v, the gate (a row per head, or per head's element) and the MLPs' gate/up (the shared
    # experts' too) column-parallel, o/down row-parallel, each expert's intermediate rows cut (Experts.shard); the
    # per-head q/k norms and the router whole
    tp_patterns: ClassVar[dict[str, str]] = {**GROUPED_MOE_TP, "layers.*.self_attn.g_proj": "colwise"}
    _no_split_modules: ClassVar[list[str]] = ["LagunaDecoderLayer"]

    def shard_heads(self, world: int) -> None:
        """Each rank computes num_heads / world of each layer's heads (every layer's count divisible)."""
        heads = [layer.self_attn.num_heads for layer in self.model.layers]
        if any(h % world for h in heads):
            raise ConfigError(
                f"tensor parallel over {world} ranks needs every layer's query heads "
                f"(num_attention_heads_per_layer) divisible by {world}, found {heads}"
            )
        CausalLM.shard_heads(self, world)  # (Step 3.5 borrows this method)

    def __init__(self, config: LagunaConfig):
        super().__init__(config, MixtralModel(config, LagunaDecoderLayer))
