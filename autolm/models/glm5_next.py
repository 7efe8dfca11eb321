"""GLM-5.3-Flash's language model (transformers' glm5_next: Glm5NextTextModel under Glm5NextForConditionalGeneration's
head; model_type glm5_next_text, and glm5_next: the image-text checkpoints, read as their language model). Each layer
is a token mixer then a dense MLP or a mixture (`mlp_layer_types`, by default three dense layers first), each inside
a manifold-constrained hyper-connection over `hc_mult` residual streams (the embeddings repeated; carried as one (B,
T, hc_mult * h) tensor; at the end their plain mean, then the final norm). The mixer, by `layer_types` (by default
every fourth layer from the fourth "indexed_attention", the rest "linear_attention"):

- "linear_attention": Kimi Linear's KDA (models.kimi_linear) with its forget gate per head (A_log) and, where
  `linear_lower_bound` is set, the bounded decay linear_lower_bound * sigmoid(exp(A_log) * g);
- "indexed_attention": Multi-head Latent Attention without any position encoding (qk_rope_head_dim is 0; scale
  qk_head_dim ** -0.5; its low-rank norms of rms_norm_eps) over the keys its k-pool indexer keeps, or, where
  `indexer_types` says "shared", over those the layer just before kept (that layer must be a "full" indexed one, as
  transformers passes the selection only to the next layer).

The feed-forward blocks clamp their SwiGLU: act(min(gate, swiglu_limit)) * clamp(up, +-swiglu_limit) in the dense
MLP, the shared experts and the routed ones (DeepSeek-V3's grouped sigmoid routing). Details of the pieces:
models.glm5_next_layers. The one-token step runs eagerly (recurrent layers and the indexers' cache layers). The
released files' names (the forget gate's tensors on self_attn, hc_attn_fn / hc_ffn_base ..., per-expert tensors,
q/k/v_conv1d) load as transformers' conversion mapping reads them; saved, the model's own names. GGUF as llama.cpp's
"glm5-next" (models.glm5_next_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import CheckpointRules, GGUFLayout, GroupedRouter, Rename, RMSNorm, SparseMoeBlock
from ..nn.expert_formats import GGUFExperts
from . import glm5_next_gguf
from .base import DecoderModel
from .deepseek_v3 import DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v4_layers import ClampedMLP
from .deepseek_v32 import IndexedCausalLM
from .glm4_moe import GROUPED_MOE_RULES, skip_nextn
from .glm5_next_layers import (
    Glm5NextAttention,
    Glm5NextHyperConnection,
    Glm5NextLinearAttention,
    KPoolIndexer,
)
from .glm_moe_dsa import INDEXER_TYPES, _indexer_types
from .hy_v4 import HyperStreams, HYV4Experts
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .kimi_linear import KimiConvPieces
from .kimi_linear_gguf import KimiLinearGGUF
from .mixtral import validate_experts

_POSITIVE = ("moe_intermediate_size", "n_shared_experts", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
             "v_head_dim", "n_group", "topk_group", "index_topk", "index_head_dim", "index_n_heads", "index_kpool",
             "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim", "hc_mult", "hc_sinkhorn_iters")  # fmt: skip
_NUMBERS = ("routed_scaling_factor", "swiglu_limit", "hc_eps", "router_aux_loss_coef")
_LINEAR_ATTN = (("linear_head_dim", "head_dim"), ("linear_num_heads", "num_heads"),
                ("linear_conv_kernel_dim", "short_conv_kernel_size"), ("linear_lower_bound", "gate_lower_bound"))  # fmt: skip


@dataclass(repr=False)
class Glm5NextTextConfig(PretrainedConfig):
    """transformers' Glm5NextTextConfig: its fields and defaults (GLM-5.3-Flash's sizes). transformers writes
    head_dim as qk_rope_head_dim (0); here head_dim is the attention's qk_head_dim (written back as transformers
    writes it)."""

    model_type: ClassVar[str] = "glm5_next_text"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "norm_topk_prob",
                                              "output_router_logits", "index_kpool_always_select_tail")  # fmt: skip
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear_attention", "indexed_attention")
    rope_interleave: ClassVar[bool] = False  # read by the latent attention (which turns nothing here)

    vocab_size: int = 154880
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 45
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 288
    output_router_logits: bool = False
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 0
    v_head_dim: int = 256
    qk_nope_head_dim: int = 256
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    max_position_embeddings: int = 1048576
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mlp_layer_types: list[str] | None = None
    attention_bias: bool = False
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_types: list[str] | None = None
    swiglu_limit: float = 10.0
    linear_head_dim: int = 128
    linear_num_heads: int = 64
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: float | None = -5.0
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    router_aux_loss_coef: float = 0.001
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n):
            if self.mlp_layer_types is None:
                self.mlp_layer_types = ["dense"] * min(3, n) + ["sparse"] * max(n - 3, 0)
            if self.layer_types is None:
                self.layer_types = [
                    "indexed_attention" if i % 4 == 3 else "linear_attention" for i in range(n)
                ]
            if self.indexer_types is None:
                self.indexer_types = _indexer_types(n, self.extra)
        if isinstance(self.layer_types, list):
            self.layer_types = ["indexed_attention" if t == "full_attention" else t for t in self.layer_types]
        linear = self.extra.get("linear_attn_config")
        if isinstance(linear, dict):  # the Hub's spelling, read as transformers reads it
            for ours, theirs in _LINEAR_ATTN:
                setattr(self, ours, linear.get(theirs, getattr(self, ours)))
            if linear.get("safe_gate", True) and self.linear_lower_bound is None:
                self.linear_lower_bound = -5.0
        self.extra.pop("qk_head_dim", None)  # derived: written back from the parts
        self.head_dim = (
            self.qk_head_dim if _is_int(self.qk_nope_head_dim) and _is_int(self.qk_rope_head_dim) else None
        )
        super().__post_init__()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_local_experts(self) -> int:
        return self.n_routed_experts

    def attention_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in (
            "rope_parameters",
            "rope_theta",
            "rope_scaling",
        ):  # no RoPE settings in transformers' config
            out.pop(key, None)
        out["head_dim"], out["qk_head_dim"] = self.qk_rope_head_dim, self.qk_head_dim
        return out

    def validate(self) -> None:
        src = self.source
        positive_ints(self, _POSITIVE, 1 << 17)
        for name in _NUMBERS:
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{src}: {name} must be a number, found {getattr(self, name)!r}")
        lb = self.linear_lower_bound
        if lb is not None and not _is_number(lb):
            raise ConfigError(f"{src}: linear_lower_bound must be a number or null, found {lb!r}")
        if self.qk_rope_head_dim != 0:
            raise ConfigError(f"{src}: qk_rope_head_dim must be 0 (GLM-5.3-Flash's attention has no RoPE), found "
                              f"{self.qk_rope_head_dim!r}")  # fmt: skip
        super().validate()
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads ({self.num_key_value_heads}) must equal "
                              f"num_attention_heads ({self.num_attention_heads})")  # fmt: skip
        if self.index_topk % self.index_kpool:
            raise ConfigError(f"{src}: index_topk ({self.index_topk}) must be a multiple of index_kpool "
                              f"({self.index_kpool})")  # fmt: skip
        if not self.index_kpool_always_select_tail and self.index_kpool > 1:
            raise ConfigError(f"{src}: index_kpool_always_select_tail false with index_kpool {self.index_kpool} is not "
                              "supported: transformers then gives the first tokens no key to attend to (their "
                              "attention spreads over every slot, later ones included)")  # fmt: skip
        if self.hidden_act != "silu":  # the KDA layers' conv activation is SiLU in autolm
            raise ConfigError(f"{src}: hidden_act must be 'silu', found {self.hidden_act!r}")
        validate_experts(self, self.n_routed_experts, self.num_experts_per_tok)
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ConfigError(f"{src}: n_group ({self.n_group}) must divide n_routed_experts "
                              f"({self.n_routed_experts}) and topk_group ({self.topk_group}) be at most it")  # fmt: skip
        self._validate_schedules()

    def _validate_schedules(self) -> None:
        src, n = self.source, self.num_hidden_layers
        mlp, idx = self.mlp_layer_types, self.indexer_types
        if not isinstance(mlp, list) or len(mlp) < n or set(mlp[:n]) - {"dense", "sparse"}:
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, "
                              f"found {str(mlp)[:200]}")  # fmt: skip
        if not isinstance(idx, list) or len(idx) < n or set(idx[:n]) - set(INDEXER_TYPES):
            raise ConfigError(f"{src}: indexer_types must list {INDEXER_TYPES} for each of the {n} layers, found "
                              f"{str(idx)[:200]}")  # fmt: skip
        types = self.layer_types
        for i, kind in enumerate(types):
            after_full = i > 0 and types[i - 1] == "indexed_attention" and idx[i - 1] == "full"
            if kind == "indexed_attention" and idx[i] == "shared" and not after_full:
                raise ConfigError(f"{src}: indexer_types[{i}] is 'shared' but layer {i - 1} is no 'full' "
                                  "indexed_attention layer (transformers passes a selection to the next layer only)")  # fmt: skip


class Glm5NextConfig(ImageTextConfig):
    """transformers' Glm5NextConfig (model_type glm5_next, image-text): its language model's config. Files without
    text_config keep the text settings at the top level; the head is tied by the outer config alone (False by
    default)."""

    model_type: ClassVar[str] = "glm5_next"
    text_class: ClassVar[type] = Glm5NextTextConfig
    tie_default: ClassVar[bool | None] = False
    flat: ClassVar[bool] = True


def _moe(config: Glm5NextTextConfig) -> nn.Module:
    h, act, limit = config.hidden_size, config.hidden_act, float(config.swiglu_limit)
    router = GroupedRouter(h, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                           topk_group=config.topk_group, normalize=config.norm_topk_prob,
                           scaling=float(config.routed_scaling_factor))  # fmt: skip
    experts = HYV4Experts(config.n_routed_experts, h, config.moe_intermediate_size, act, limit=limit)
    shared = ClampedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act, limit)
    return SparseMoeBlock(router, experts, shared_experts=shared)


class Glm5NextDecoderLayer(nn.Module):
    """KDA or indexed latent attention, then a dense MLP or the mixture, each pre-normed inside its
    hyper-connection."""

    def __init__(self, config: Glm5NextTextConfig, layer_idx: int):
        super().__init__()
        if config.layer_types[layer_idx] == "linear_attention":
            self.self_attn = Glm5NextLinearAttention(config, layer_idx)
        else:
            self.self_attn = Glm5NextAttention(config, layer_idx, config.num_hidden_layers + layer_idx)
        h, limit = config.hidden_size, float(config.swiglu_limit)
        dense = config.mlp_layer_types[layer_idx] == "dense"
        self.mlp = (
            ClampedMLP(h, config.intermediate_size, config.hidden_act, limit) if dense else _moe(config)
        )
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.attn_hc = Glm5NextHyperConnection(config)
        self.ffn_hc = Glm5NextHyperConnection(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.attn_hc(x, lambda y: self.self_attn(self.input_layernorm(y), ctx))
        return self.ffn_hc(x, lambda y: self.mlp(self.post_attention_layernorm(y)))


class Glm5NextTextModel(HyperStreams, DecoderModel):
    """The embeddings repeated into hc_mult streams, the layers, the streams' mean, the final norm."""

    def __init__(self, config: Glm5NextTextConfig):
        super().__init__(config, Glm5NextDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return self.norm(x.view(B, T, self.config.hc_mult, -1).mean(2))


# transformers' conversion mapping for glm5_next: the released names read; saved, the model's own
RENAMES = [
    Rename(r"\.self_attn\.(f_a_proj|f_b_proj|dt_bias|A_log)\b", r".self_attn.forget_gate.\1", r"(?!)", ""),
    Rename(r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2", r"(?!)", ""),
]


class Glm5NextForCausalLM(IndexedCausalLM):
    """transformers' Glm5NextForConditionalGeneration's language model and head."""

    config_class = Glm5NextTextConfig
    recurrent: ClassVar[bool] = True
    # llama.cpp's files: the whole parameters under ".weight", the stacked experts, attn_k_b / attn_v_b and the KDA
    # tensors' transforms (models.glm5_next_gguf)
    checkpoint_rules = CheckpointRules(
        [*IMAGE_TEXT_RULES, *RENAMES, KimiConvPieces(), *GROUPED_MOE_RULES.rules, *glm5_next_gguf.GGUF_WHOLE,
         GGUFExperts(), GGUFMla(), KimiLinearGGUF()]
    )  # fmt: skip
    gguf = GGUFLayout(
        "glm5-next",
        config=glm5_next_gguf.GGUF_CONFIG,
        layer=(*DeepseekV3ForCausalLM.gguf.layer, *glm5_next_gguf.GGUF_LAYER),
        fixed=(("attention_bias", False),),
        derive=glm5_next_gguf.derive,
        write_config=glm5_next_gguf.write_config,
        bare=("ssm_a",),
    )
    # transformers' base_model_tp_plan: the latent attention's heads split as DeepSeek-V3's (q_b_proj / kv_b_proj
    # column-parallel, o_proj row-parallel; the low-rank projections, their norms and the k-pool indexers, which read
    # only those, whole on every rank), the dense MLPs and shared experts as Llama's MLP, each expert's intermediate
    # rows cut (Experts.shard; the SwiGLU clamps are elementwise). The KDA layers run whole on every rank (tp_plan).
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Glm5NextDecoderLayer"]
    # as transformers keeps them
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias", "conv1d", "dt_bias", "A_log",
                                                         "attn_hc.base", "attn_hc.scale", "ffn_hc.base",
                                                         "ffn_hc.scale"]  # fmt: skip

    def __init__(self, config: Glm5NextTextConfig):
        super().__init__(config, Glm5NextTextModel(config))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = [mla if isinstance(r, GGUFMla) else r for r in type(self).checkpoint_rules.rules]
        # a GGUF's next-token-prediction block (num_nextn_predict_layers) skipped
        self.checkpoint_rules = skip_nextn(CheckpointRules(rules), config)
        layers = self.model.layers
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if isinstance(attn, Glm5NextAttention) and attn.indexer is None:
                attn.source.append(layers[i - 1].self_attn)

    def tp_plan(self) -> dict[str, str]:
        """The patterns' plan less the KDA layers' projections (they share the latent attention's names)."""
        kda = tuple(f"{self.layers_prefix}.{i}.self_attn." for i, t in enumerate(self.config.layer_types)
                    if t == "linear_attention")  # fmt: skip
        return {m: s for m, s in super().tp_plan().items() if not m.startswith(kda)}

    def attention_shapes(self) -> list[tuple[int, int]]:
        """The layers' own, then per layer its indexer's keys and gate scores (zero wide where it has none)."""
        extra = {ix.slot: (1, ix.width) for ix in self.modules() if isinstance(ix, KPoolIndexer)}
        n = len(self.model.layers)
        return [
            *super(IndexedCausalLM, self).attention_shapes(),
            *(extra.get(n + i, (1, 0)) for i in range(n)),
        ]
