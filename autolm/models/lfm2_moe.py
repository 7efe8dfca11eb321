"""LFM2-MoE (Liquid AI's LFM2-8B-A1B): LFM2's hybrid of attention and gated short-convolution layers (see
models/lfm2.py; `layer_types` lists them) whose first `num_dense_layers` feed-forward blocks are SiLU-gated MLPs of
intermediate_size (w1, w3, w2; no 2/3 adjustment) and the others sparse mixtures of experts:

- the router (`feed_forward.gate`, a weight (E, h)) takes sigmoid(x @ weight.T) in the model's dtype; with
  `use_expert_bias` the top `num_experts_per_tok` of the scores plus the block's `expert_bias` (an fp32 buffer the
  checkpoint holds) are chosen, else the top scores; their plain scores, renormalised with `norm_topk_prob`
  (+ 1e-6), times `routed_scaling_factor`, weight the experts' outputs;
- the experts are SiLU-gated MLPs of moe_intermediate_size, no shared expert.

transformers 5 holds the experts stacked (`feed_forward.experts.gate_up_proj` (E, 2I, h), gate rows first, and
`down_proj` (E, h, I)); checkpoints keep one w1 (gate) / w3 (up) / w2 (down) tensor per expert
(`feed_forward.experts.3.w1.weight`), as transformers writes them.

GGUF (llama.cpp's "lfm2moe", convert_hf_to_gguf.py's LFM2MoeModel): LFM2's layout (see models/lfm2.py) plus
expert_count / expert_used_count / expert_feed_forward_length, `leading_dense_block_count` (num_dense_layers) and
`expert_gating_func` sigmoid; each layer's experts stacked into ffn_{gate,up,down}_exps (w1, w3, w2), the router
as ffn_gate_inp, `expert_bias` as `exp_probs_b.bias`. llama.cpp's graph always chooses with the bias, renormalises
the top k and scales by nothing the converter writes: a model without use_expert_bias or norm_topk_prob, with
routed_scaling_factor other than 1 or with conv_bias is refused on GGUF out (llama.cpp divides by the clamped sum
rather than adding 1e-6: the weights agree to ~1e-6 relative).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import CheckpointRules, Experts, GGUFLayout, Rename, Router, SparseMoeBlock, Stacked
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM
from .lfm2 import (
    LFM2_GGUF_LAYER,
    LFM2_TP,
    Lfm2Config,
    Lfm2DecoderLayer,
    Lfm2MLP,
    Lfm2Model,
    SqueezedConv,
    gguf_derive,
    gguf_write_config,
)
from .mixtral import validate_experts


@dataclass(repr=False)
class Lfm2MoeConfig(Lfm2Config):
    """transformers' Lfm2MoeConfig: LFM2's fields less the block_* ones and full_attn_idxs (written only where set),
    and the experts'. Without layer_types (which transformers needs) every layer is attention, LFM2's default."""

    model_type: ClassVar[str] = "lfm2_moe"
    absent_keys: ClassVar[tuple[str, ...]] = (
        *Lfm2Config.absent_keys,
        "full_attn_idxs",
        "block_multiple_of",
        "block_ffn_dim_multiplier",
        "block_auto_adjust_ff_dim",
    )
    bool_fields: ClassVar[tuple[str, ...]] = (
        *Lfm2Config.bool_fields,
        "use_expert_bias",
        "norm_topk_prob",
        "output_router_logits",
    )
    original_names: ClassVar[dict[str, str]] = {"tie_embedding": "tie_word_embeddings"}

    hidden_size: int = 2048
    intermediate_size: int = 7168
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1000000.0}
    )
    moe_intermediate_size: int = 1792
    num_dense_layers: int = 2
    num_experts_per_tok: int = 4
    output_router_logits: bool = False
    num_experts: int = 32
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and self.full_attn_idxs is None and _is_int(n) and n > 0:
            self.layer_types = ["full_attention"] * n
        super().__post_init__()

    @property
    def ff_dim(self) -> int:
        """The dense layers' width: intermediate_size as it is."""
        return self.intermediate_size

    def sparse(self, i: int) -> bool:
        """Whether layer i's feed-forward block is the mixture of experts (else the dense MLP)."""
        return i >= self.num_dense_layers

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        for name, low in (("moe_intermediate_size", 1), ("num_dense_layers", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigError(f"{src}: {name} must be an integer >= {low}, found {v!r}")
        s = self.routed_scaling_factor
        if not _is_number(s) or not s > 0:
            raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, found {s!r}")


class Lfm2MoeRouter(Router):
    """sigmoid(x @ weight.T) in the model's dtype; the top k (of the scores plus `expert_bias` where given) weighted
    by their scores, renormalised when `normalize` (+ 1e-6), times `scaling`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool, scaling: float):
        super().__init__(hidden, num_experts, top_k, normalize=normalize)
        self.scaling = scaling

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = kernels.linear(x, self.weight, None)
        scores = logits.sigmoid()
        if expert_bias is None:
            top, ids = torch.topk(scores, self.top_k, dim=-1)
        else:
            ids = torch.topk(scores + expert_bias.float(), self.top_k, dim=-1)[1]
            top = scores.gather(1, ids).type_as(logits)
        if self.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-6)
        return ids, top * self.scaling

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, scale {self.scaling}"


class Lfm2MoeSparseMoeBlock(SparseMoeBlock):
    """The router (`gate`) and the stacked experts; with use_expert_bias the block holds `expert_bias`."""

    def __init__(self, config: Lfm2MoeConfig):
        h, n = config.hidden_size, config.num_experts
        router = Lfm2MoeRouter(h, n, config.num_experts_per_tok, config.norm_topk_prob,
                               float(config.routed_scaling_factor))  # fmt: skip
        super().__init__(router, Experts(n, h, config.moe_intermediate_size, "silu"))
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(n, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.gate(flat, self.expert_bias)
        return self.experts(flat, ids, weights).view(B, T, h)


class Lfm2MoeDecoderLayer(Lfm2DecoderLayer):
    """LFM2's layer with a dense MLP in the first num_dense_layers, a mixture of experts after."""

    def make_feed_forward(self, config: Any, layer_idx: int) -> nn.Module:
        if config.sparse(layer_idx):
            return Lfm2MoeSparseMoeBlock(config)
        return Lfm2MLP(config.hidden_size, config.intermediate_size)


@dataclass(frozen=True)
class ExpertBiasOut:
    """Checkpoint rule for GGUF out: llama.cpp's converter writes the block's `expert_bias` as the bias of
    `expert_bias` (blk.N.exp_probs_b.bias); reading, a Rename takes it back."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".feed_forward.expert_bias"):
            return None
        return [(name.removesuffix("_bias") + ".bias", t)]


# per-expert w1/w3/w2 tensors on disk, stacked in the model; llama.cpp's stacked experts, squeezed convolution
# and exp_probs_b read back (and written out) by the GGUF rules
LFM2_MOE_RULES = CheckpointRules(
    [
        Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
        Stacked("down_proj", ("w2.weight",)),
        GGUFExperts(),
        SqueezedConv(),
        Rename(r"\.feed_forward\.expert\.bias$", ".feed_forward.expert_bias", r"(?!)", ""),
        ExpertBiasOut(),
    ]
)
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID, what LFM2MoeModel writes


def _gguf_derive(d: dict[str, Any], get) -> None:
    """LFM2's (the layer kinds from head_count_kv), less the dense fields LFM2-MoE's config does not write; a file
    whose gating is not the sigmoid is refused."""
    gguf_derive(d, get)
    for key in ("full_attn_idxs", "block_auto_adjust_ff_dim"):
        d.pop(key, None)
    gating = get("expert_gating_func")
    if gating is not None and gating != SIGMOID_GATING:
        raise ConfigError(
            f"expert_gating_func {gating!r}: LFM2-MoE routes with the sigmoid ({SIGMOID_GATING})"
        )


def _gguf_write_config(m: dict[str, Any], c: Any) -> None:
    """LFM2's keys (head_count_kv per layer, the dense width) and the sigmoid gating LFM2MoeModel writes."""
    gguf_write_config(m, c)
    m["expert_gating_func"] = SIGMOID_GATING


LFM2_MOE_GGUF = GGUFLayout(
    "lfm2moe",
    config=(
        ("shortconv.l_cache", "conv_L_cache"),
        ("expert_count", "num_experts"),
        ("expert_used_count", "num_experts_per_tok"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("leading_dense_block_count", "num_dense_layers"),
    ),
    layer=(
        *LFM2_GGUF_LAYER,
        ("ffn_gate", "feed_forward.w1"),
        ("ffn_up", "feed_forward.w3"),
        ("ffn_down", "feed_forward.w2"),
        ("ffn_gate_inp", "feed_forward.gate"),
        ("exp_probs_b", "feed_forward.expert"),
        ("ffn_gate_exps", "feed_forward.experts.gate_proj"),
        ("ffn_up_exps", "feed_forward.experts.up_proj"),
        ("ffn_down_exps", "feed_forward.experts.down_proj"),
    ),
    top=(("token_embd_norm", "model.embedding_norm"),),  # the final norm, under the converter's name
    # llama.cpp's graph: no shortconv biases; exp_probs_b required, the top k renormalised, no routed scale
    fixed=(
        ("conv_bias", False),
        ("use_expert_bias", True),
        ("norm_topk_prob", True),
        ("routed_scaling_factor", 1.0),
    ),
    derive=_gguf_derive,
    write_config=_gguf_write_config,
)


class Lfm2MoeForCausalLM(CausalLM):
    """transformers' Lfm2MoeForCausalLM."""

    config_class = Lfm2MoeConfig
    checkpoint_rules = LFM2_MOE_RULES
    recurrent: ClassVar[bool] = True
    gguf = LFM2_MOE_GGUF
    # the attention heads and the dense MLPs split as LFM2's; the experts cut their own intermediate rows
    # (nn.Experts.shard); the short convolutions run whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = LFM2_TP
    _no_split_modules: ClassVar[list[str]] = ["Lfm2MoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Lfm2Model(config, Lfm2MoeDecoderLayer))
