"""MiniMax-M2 (MiniMax-M2, M2.1, M2.5): Llama's pre-norm layers, no biases, GQA with OLMo 2's q/k RMSNorms over
the whole projection (`q_norm` over num_attention_heads * head_dim, `k_norm` over the KV heads', before the split
into heads), and partial RoPE in the rotate-half form: the first head_dim * partial_rotary_factor dimensions of
each head rotate, the rest pass through. The released config.json gives the rotary width as `rotary_dim` (64 of
head_dim 128) with rope_theta at the top level; transformers reads it as partial_rotary_factor = rotary_dim /
head_dim (a partial_rotary_factor given in the RoPE parameters or at the top level wins), and so does autolm.

Every layer's feed-forward block is a mixture of `num_local_experts` gated MLPs (`intermediate_size` each) with
sigmoid routing: the router (`mlp.gate`) scores every expert with sigmoid(logits) in fp32, the top
`num_experts_per_tok` of the scores plus the block's `e_score_correction_bias` buffer (`mlp.e_score_correction_bias`,
on the block, not the router as in DeepSeek V3) are chosen, and their plain scores, renormalised to sum 1, weight
the experts' outputs. No groups, no scaling, no shared expert. transformers ignores the released config's
`scoring_func`, `use_qk_norm`, `qk_norm_type`, `use_routing_bias` and `shared_intermediate_size` (the checkpoint
always computes as above); so does autolm, keeping them as read.

Checkpoints on the Hub (and transformers' save_pretrained) name the block `block_sparse_moe` and keep one w1/w3/w2
(gate/up/down) tensor per expert, as Mixtral's do; the model holds transformers 5's stacked
`mlp.experts.gate_up_proj` and `mlp.experts.down_proj`. The released weights are FP8 block-quantized
(`quantization_config`), dequantized while loading (sources.fp8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GGUFLayout,
    Rename,
    Router,
    SparseMoeBlock,
    Stacked,
)
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM
from .glm4 import gguf_config
from .glm4_moe import SIGMOID_GATING
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel, validate_experts
from .olmo2 import Olmo2ForCausalLM


@dataclass(repr=False)
class MiniMaxM2Config(PretrainedConfig):
    """transformers' MiniMaxM2Config: its fields and defaults (head_dim 128 whatever the hidden size, RoPE theta
    5e6; transformers' `num_experts` is num_local_experts). `rotary_dim`, where config.json has it, is kept as read
    and gives the partial rotary factor where the RoPE parameters and the top level give none."""

    model_type: ClassVar[str] = "minimax_m2"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "output_router_logits")
    partial_rotary_default: ClassVar[bool] = True  # the default RoPE rotates only the partial dimensions

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 196608
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 200034
    eos_token_id: int | list[int] | None = 200020
    pad_token_id: int | None = None
    num_experts_per_tok: int = 8
    num_local_experts: int = 256
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 5e6}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = super().read_rope({"rope_theta": 5e6, **d}, source)
        head_dim = d.get("head_dim", cls.head_dim)
        if d.get("partial_rotary_factor") is not None:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        elif _is_int(d.get("rotary_dim")) and _is_int(head_dim) and head_dim > 0:
            rope.setdefault("partial_rotary_factor", d["rotary_dim"] / head_dim)
        return rope, spelling

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rope_spelling == "v4":  # the released spelling: rope_theta and rotary_dim at the top level
            rope = dict(self.rope_parameters)
            rope.pop("rope_theta")
            if "rotary_dim" in self.extra or "partial_rotary_factor" in self.extra:
                rope.pop("partial_rotary_factor", None)  # the top-level key (kept as read) says it
            if rope == {"rope_type": "default"}:
                out.pop("rope_scaling")  # as released: no rope_scaling key
            else:
                out["rope_scaling"] = rope
        return out

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        if not _is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise ConfigError(f"{src}: router_jitter_noise must be a number in [0, 1), found "
                              f"{self.router_jitter_noise!r}")  # fmt: skip
        rotary_dim = self.extra.get("rotary_dim")
        if rotary_dim is not None and not (_is_int(rotary_dim) and 0 < rotary_dim <= self.head_dim):
            raise ConfigError(f"{src}: rotary_dim must be an integer in [1, head_dim = {self.head_dim}], found "
                              f"{rotary_dim!r}")  # fmt: skip
        factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if not _is_number(factor) or not 0 < factor <= 1:
            raise ConfigError(f"{src}: partial_rotary_factor must be a number in (0, 1], found {factor!r}")
        rotary = int(self.head_dim * factor)
        if rotary < 2 or rotary % 2:
            raise ConfigError(f"{src}: partial_rotary_factor {factor} (rotary_dim) gives {rotary} rotary dimensions "
                              f"of head_dim {self.head_dim}: they must be a positive even number")  # fmt: skip


class MiniMaxM2TopKRouter(Router):
    """The router's logits (x @ weight.T, in the weight's dtype), sigmoid in fp32; the top k of the scores plus the
    block's correction bias chosen, their plain scores renormalised (fp32 weights, as transformers')."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k, keep_fp32=True)

    def forward(self, x: torch.Tensor, correction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = kernels.linear(x, self.weight).float().sigmoid()  # (N, E)
        ids = torch.topk(scores + correction.float(), self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        return ids, top / top.sum(dim=-1, keepdim=True)


class MiniMaxM2SparseMoeBlock(SparseMoeBlock):
    """Router (`gate`) + stacked experts; the block holds the routing's `e_score_correction_bias` buffer."""

    def __init__(self, config: MiniMaxM2Config):
        h, n = config.hidden_size, config.num_local_experts
        router = MiniMaxM2TopKRouter(h, n, config.num_experts_per_tok)
        experts = Experts(n, h, config.intermediate_size, config.hidden_act)
        super().__init__(router, experts, jitter_noise=config.router_jitter_noise)
        self.register_buffer("e_score_correction_bias", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(-1, h)
        ids, weights = self.gate(flat, self.e_score_correction_bias)
        return self.experts(flat, ids, weights).view(B, T, h)


class MiniMaxM2DecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention (q/k norms over the whole projections), then a pre-norm mixture of experts."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, qk_norm="full", norm=lambda dim: self.norm(config, dim))  # fmt: skip

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return MiniMaxM2SparseMoeBlock(config)


@dataclass(frozen=True)
class ExpProbsBias:
    """Checkpoint rule for GGUF out: llama.cpp's converter writes the block's `e_score_correction_bias` as the bias
    of `e_score_correction` (blk.N.exp_probs_b.bias); reading, a Rename takes it back."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".mlp.e_score_correction_bias"):
            return None
        return [(name.removesuffix("_bias") + ".bias", t)]


def _gguf_write_config(m: dict[str, Any], c: MiniMaxM2Config) -> None:
    """As llama.cpp's MiniMaxM2Model converter writes it: TextModel's keys (no vocabulary size) with the head size,
    the experts' length (intermediate_size), rope.dimension_count as rotary_dim, the sigmoid gating (from the
    released config's scoring_func; llama.cpp's graph needs it)."""
    m.pop("vocab_size", None)
    m["rope.dimension_count"] = int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0))
    m["expert_gating_func"] = SIGMOID_GATING


class MiniMaxM2ForCausalLM(CausalLM):
    """transformers' MiniMaxM2ForCausalLM."""

    config_class = MiniMaxM2Config
    checkpoint_rules = CheckpointRules(
        [
            Rename(r"\.block_sparse_moe\.", ".mlp.", r"\.mlp\.", ".block_sparse_moe."),
            Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
            Stacked("down_proj", ("w2.weight",)),
            Rename(r"\.mlp\.e_score_correction\.bias$", ".mlp.e_score_correction_bias", r"(?!)", ""),
            GGUFExperts(),
            ExpProbsBias(),
        ]
    )
    # llama.cpp's MiniMaxM2Model converter: tensors by gguf-py's map (the experts stacked, the correction bias as
    # exp_probs_b.bias, the q/k norms whole as attn_{q,k}_norm), no q/k permutation (NeoX RoPE over n_rot
    # dimensions); llama.cpp's minimax-m2 always renormalises the top k, scales nothing and groups nothing, as here
    gguf = GGUFLayout(
        "minimax-m2",
        config=(
            ("attention.key_length", "head_dim"),
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "intermediate_size"),
        ),
        layer=(*GGUF_EXPERTS, ("exp_probs_b", "mlp.e_score_correction")),
        derive=gguf_config,
        write_config=_gguf_write_config,
    )
    # As transformers: q/k/v gathered whole on every rank for the whole-projection norms, o_proj split again; the
    # experts cut their own intermediate rows (nn.Experts.shard)
    tp_patterns: ClassVar[dict[str, str]] = {
        k: v for k, v in Olmo2ForCausalLM.tp_patterns.items() if ".self_attn." in k
    }
    _no_split_modules: ClassVar[list[str]] = ["MiniMaxM2DecoderLayer"]

    def __init__(self, config: MiniMaxM2Config):
        super().__init__(config, MixtralModel(config, MiniMaxM2DecoderLayer))

    shard_heads = Olmo2ForCausalLM.shard_heads  # every rank runs all heads: nothing to shard
