"""Hunyuan v3 (Tencent Hy3): Llama's pre-norm layers with Apertus' attention (GQA, per-head q/k RMSNorms after the
projection, before RoPE; no biases), and per layer (`mlp_layer_types`, by default one dense layer then the mixture)
either a dense gated MLP (`intermediate_size`) or a mixture of `num_experts` gated MLPs (`moe_intermediate_size`)
with MiniMax-M2's sigmoid routing: sigmoid(router logits in fp32), the top `num_experts_per_tok` of the scores plus
the block's `e_score_correction_bias` chosen, their plain scores renormalised (sum + 1e-20) and scaled by
`router_scaling_factor`; plus `shared_experts`, one gated MLP of moe_intermediate_size * num_shared_experts that
every token passes. `enable_moe_fp32_combine` adds the shared experts' output to the routed one in fp32: the sum of
two values rounded once, as the plain sum in bf16 is, so it computes nothing different here (kept as read).

Checkpoints (the Hub's and transformers' save_pretrained) keep one gate/up/down tensor per expert and name the
router `mlp.router.gate`, the correction bias `mlp.expert_bias` and the shared experts `mlp.shared_mlp`; the model
holds transformers 5's stacked experts and its in-memory names (`mlp.gate`, `mlp.e_score_correction_bias`,
`mlp.shared_experts`). The Hub's next-token-prediction layer (model.layers.<num_hidden_layers>.*) is not loaded.
GGUF as llama.cpp's HYV3Model converter writes it ("hy_v3"), with transformers' default mlp_layer_types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, GGUFLayout, Ignored, Rename
from .base import CausalLM
from .glm4_moe import GROUPED_MOE_TP, SIGMOID_GATING
from .minimax_m2 import MiniMaxM2SparseMoeBlock, MiniMaxM2TopKRouter
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel, validate_experts
from .qwen2_moe import QWEN_MOE_RULES


@dataclass(repr=False)
class HYV3Config(PretrainedConfig):
    """transformers' HYV3Config: its fields and defaults (head_dim 128, RoPE theta 11158840; `num_local_experts`
    is transformers' alias of num_experts)."""

    model_type: ClassVar[str] = "hy_v3"
    default_theta: ClassVar[float] = 11_158_840.0
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "mlp_bias",
        "enable_moe_fp32_combine",
        "output_router_logits",
    )

    vocab_size: int = 120832
    hidden_size: int = 4096
    intermediate_size: int = 13312
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 131072
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 192
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1536
    router_scaling_factor: float = 2.826
    enable_moe_fp32_combine: bool = True
    mlp_layer_types: list[str] | None = None
    output_router_logits: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 11_158_840.0}
    )

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.mlp_layer_types is None and _is_int(n):
            self.mlp_layer_types = ["dense"] * min(n, 1) + ["sparse"] * max(n - 1, 0)
        elif isinstance(self.mlp_layer_types, list) and _is_int(n) and 0 < n < len(self.mlp_layer_types):
            self.mlp_layer_types = self.mlp_layer_types[:n]
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    num_local_experts = property(lambda self: self.num_experts)  # transformers' alias

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        positive_ints(self, ("moe_intermediate_size", "num_shared_experts"))
        s = self.router_scaling_factor
        if not _is_number(s) or not s > 0:
            raise ConfigError(f"{src}: router_scaling_factor must be a positive number, found {s!r}")
        types = self.mlp_layer_types
        if (not isinstance(types, list) or len(types) != self.num_hidden_layers
                or any(t not in ("dense", "sparse") for t in types)):  # fmt: skip
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                              f"{self.num_hidden_layers} layers, found {types!r}")  # fmt: skip
        for name in ("attention_bias", "mlp_bias"):
            if getattr(self, name):
                raise ConfigError(f"{src}: {name} must be false: transformers' HYV3 layers have no biases")


class HYV3TopKRouter(MiniMaxM2TopKRouter):
    """MiniMax-M2's sigmoid routing on fp32 logits (transformers casts input and weight), the chosen scores
    renormalised (sum + 1e-20) and multiplied by router_scaling_factor."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, scaling: float):
        super().__init__(hidden, num_experts, top_k)
        self.scaling = scaling

    def forward(self, x: torch.Tensor, correction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = kernels.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        ids = torch.topk(scores + correction.float(), self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        return ids, top / (top.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling


class HYV3MoE(MiniMaxM2SparseMoeBlock):
    """Router (`gate`) + stacked experts + `shared_experts`; the block holds `e_score_correction_bias`."""

    def __init__(self, config: HYV3Config):
        nn.Module.__init__(self)
        h, n, act = config.hidden_size, config.num_experts, config.hidden_act
        self.router_name, self.jitter_noise = "gate", 0.0
        self.gate = HYV3TopKRouter(h, n, config.num_experts_per_tok, float(config.router_scaling_factor))
        self.experts = Experts(n, h, config.moe_intermediate_size, act)
        self.shared_experts = GatedMLP(h, config.moe_intermediate_size * config.num_shared_experts, act)
        self.register_buffer("e_score_correction_bias", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shared_experts(x)


class HYV3DecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention (per-head q/k norms), then a pre-norm dense MLP or mixture (`mlp_layer_types`)."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, qk_norm="head", norm=lambda dim: self.norm(config, dim))  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return HYV3MoE(config)


def _gguf_config(d: dict[str, Any], get) -> None:
    """As llama.cpp reads the converter's file: the shared experts from their length, the sigmoid where no gating
    function is given (refused: another, or unnormalised weights); mlp_layer_types transformers' default (the file
    has no key for it)."""
    gating, norm = get("expert_gating_func"), get("expert_weights_norm")
    if gating not in (None, SIGMOID_GATING) or norm is False:
        raise ConfigError(f"expert_gating_func {gating!r} / expert_weights_norm {norm!r}: HY V3 routes with the "
                          "sigmoid and renormalises the chosen weights")  # fmt: skip
    shared, width = get("expert_shared_feed_forward_length"), d.get("moe_intermediate_size")
    if _is_int(shared) and _is_int(width) and width > 0:
        d["num_shared_experts"] = shared // width


def _gguf_write_config(m: dict[str, Any], c: HYV3Config) -> None:
    """The keys llama.cpp's HYV3Model converter writes beyond TextModel's (no vocabulary size): the shared experts'
    length, renormalised sigmoid routing, the value length. Refused: mlp_layer_types other than the default, which
    the file cannot say (llama.cpp reads each layer's kind off its tensors, autolm the default back)."""
    n = c.num_hidden_layers
    if c.mlp_layer_types != ["dense"] * min(n, 1) + ["sparse"] * max(n - 1, 0):
        raise ConfigError(f"mlp_layer_types {c.mlp_layer_types}: a GGUF file holds the default (one dense layer, "
                          "then mixtures) only")  # fmt: skip
    m.pop("vocab_size", None)
    m["attention.value_length"] = c.head_dim
    m["expert_shared_feed_forward_length"] = c.moe_intermediate_size * c.num_shared_experts
    m["expert_weights_norm"] = True
    m["expert_weights_scale"] = float(c.router_scaling_factor)
    m["expert_gating_func"] = SIGMOID_GATING


class HYV3ForCausalLM(CausalLM):
    """transformers' HYV3ForCausalLM."""

    config_class = HYV3Config
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"\.mlp\.router\.gate\.", ".mlp.gate.", r"\.mlp\.gate\.", ".mlp.router.gate."),
            Rename(
                r"\.mlp\.expert_bias$",
                ".mlp.e_score_correction_bias",
                r"\.mlp\.e_score_correction_bias$",
                ".mlp.expert_bias",
            ),
            Rename(
                r"\.mlp\.shared_mlp\.", ".mlp.shared_experts.", r"\.mlp\.shared_experts\.", ".mlp.shared_mlp."
            ),
            *QWEN_MOE_RULES.rules,
            Rename(
                r"\.mlp\.e_score_correction_bias\.weight$", ".mlp.e_score_correction_bias", r"(?!)", ""
            ),  # GGUF
        ]
    )
    # llama.cpp's HYV3Model converter: TextModel's keys and its own; tensors by gguf-py's map (experts stacked, the
    # correction bias as bare exp_probs_b, the shared MLP as *_shexp), no q/k permutation (NeoX RoPE)
    gguf = GGUFLayout(
        "hy_v3",
        config=(
            ("attention.key_length", "head_dim"),
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_weights_scale", "router_scaling_factor"),
        ),
        layer=(
            *GGUF_EXPERTS,
            ("exp_probs_b", "mlp.e_score_correction_bias"),
            ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
            ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
        ),
        bare=("exp_probs_b",),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )
    # transformers' plan less its q/k norm and experts entries (per-head norms need no split; nn.Experts shards
    # itself)
    tp_patterns: ClassVar[dict[str, str]] = GROUPED_MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["HYV3DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: HYV3Config):
        super().__init__(config, MixtralModel(config, HYV3DecoderLayer))
        n = config.num_hidden_layers  # the Hub's next-token-prediction layer: not run, not loaded
        self.checkpoint_rules = CheckpointRules([*type(self).checkpoint_rules.rules,
                                                 Ignored(rf"model\.layers\.{n}\..+")])  # fmt: skip
