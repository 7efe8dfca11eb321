"""ERNIE 4.5 MoE (baidu/ERNIE-4.5-21B-A3B-PT and -300B-A47B-PT, text): the dense ERNIE 4.5 decoder (RoPE over
interleaved pairs in fp32, one `use_bias` switch for q/k/v/o, the dense and shared MLPs and the LM head) whose
feed-forward block is a mixture of experts in layer i where (i + 1) % moe_layer_interval == 0 and
moe_layer_start_index <= i <= moe_layer_end_index, a dense MLP of `intermediate_size` elsewhere.

The router (`mlp.gate`, its weight in fp32) takes the softmax over all experts in fp32, chooses the top k by the
softmax plus `mlp.gate.moe_statics.e_score_correction_bias` (shape (1, experts)), and weights them by their plain
softmax values divided by their sum (clamped from below at moe_norm_min), cast to the input dtype. The experts
(moe_intermediate_size each, no biases whatever use_bias says) are summed with `moe_num_shared_experts` shared
experts as one ungated MLP of moe_num_shared_experts * moe_intermediate_size (`mlp.shared_experts`).

Checkpoints on the Hub and transformers' save_pretrained keep one gate/up/down tensor per expert
(`mlp.experts.3.gate_proj.weight`, as Qwen 2 MoE's) and the correction bias as `mlp.moe_statics.
e_score_correction_bias`; the Hub's files also hold a multi-token-prediction block (`model.mtp_*`), which
transformers skips and so does autolm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    Ignored,
    Linear,
    Rename,
    RMSNorm,
    Router,
    SparseMoeBlock,
    resize_bias,
)
from .base import LLAMA_TP, CausalLM, DecoderModel
from .ernie4_5 import Ernie4_5Config, Ernie4_5DecoderLayer
from .mixtral import GGUF_EXPERTS
from .qwen2_moe import QWEN_MOE_RULES


@dataclass(repr=False)
class Ernie4_5_MoeConfig(Ernie4_5Config):
    """transformers' Ernie4_5_MoeConfig: ERNIE 4.5's fields (no head_dim: hidden_size / num_attention_heads unless
    config.json gives one) with ERNIE-4.5-21B-A3B's sizes, and the experts (config.json's moe_num_experts and moe_k,
    read as num_experts and num_experts_per_tok, as transformers does). moe_layer_end_index -1 means the last
    layer, written back resolved, as transformers writes it."""

    model_type: ClassVar[str] = "ernie4_5_moe"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_experts": "moe_num_experts",
        "num_experts_per_tok": "moe_k",
    }
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("attention_dropout", "sliding_window", "head_dim")
    bool_fields: ClassVar[tuple[str, ...]] = (*Ernie4_5Config.bool_fields, "output_router_logits")

    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    moe_intermediate_size: int = 1536
    num_experts_per_tok: int = 6
    num_experts: int = 64
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.moe_layer_end_index == -1 and _is_int(self.num_hidden_layers):
            self.moe_layer_end_index = self.num_hidden_layers - 1
        super().__post_init__()

    def sparse(self, i: int) -> bool:
        """Whether layer i has experts (else a dense MLP)."""
        return (
            i + 1
        ) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= self.moe_layer_end_index

    def validate(self) -> None:
        super().validate()
        n, k = self.num_experts, self.num_experts_per_tok  # config.json's moe_num_experts and moe_k
        if not _is_int(n) or not 0 < n <= 4096:
            raise ConfigError(
                f"{self.source}: moe_num_experts must be a positive integer (at most 4096), found {n!r}"
            )
        if not _is_int(k) or not 0 < k <= n:
            raise ConfigError(
                f"{self.source}: moe_k must be an integer in [1, moe_num_experts = {n}], found {k!r}"
            )
        for name, low in (("moe_intermediate_size", 1), ("moe_num_shared_experts", 0), ("moe_layer_interval", 1),
                          ("moe_layer_start_index", 0), ("moe_layer_end_index", 0)):  # fmt: skip
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigError(f"{self.source}: {name} must be an integer of at least {low}, found {v!r}")
        if not _is_number(self.moe_norm_min) or self.moe_norm_min <= 0:
            raise ConfigError(
                f"{self.source}: moe_norm_min must be a positive number, found {self.moe_norm_min!r}"
            )


class Ernie4_5_MoeStatics(nn.Module):
    """Holds the router's `e_score_correction_bias` (1, experts), fp32 in transformers, not trained."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)


class Ernie4_5_MoeTopKRouter(Router):
    """ERNIE 4.5's routing (module docstring): softmax in fp32 over all experts; the top k of softmax +
    moe_statics.e_score_correction_bias; their softmax values / clamp(sum, min=norm_min), in the input's dtype."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float):
        super().__init__(hidden, num_experts, top_k)
        self.moe_statics = Ernie4_5_MoeStatics(num_experts)
        self.norm_min = norm_min

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        probs = torch.softmax(logits, dim=-1)
        ids = torch.topk(probs + self.moe_statics.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        top = probs.gather(1, ids)
        top = top / top.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)
        return ids, top.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, norm_min={self.norm_min}"


class Ernie4_5_MoeDecoderLayer(Ernie4_5DecoderLayer):
    """ERNIE 4.5's layer; in sparse layers (config.sparse) the MLP is the experts + the shared experts."""

    def __init__(self, config: Ernie4_5_MoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.sparse(layer_idx):
            h, n, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
            act, shared = config.hidden_act, config.moe_num_shared_experts
            router = Ernie4_5_MoeTopKRouter(h, n, config.num_experts_per_tok, config.moe_norm_min)
            shared = GatedMLP(h, inter * shared, act, bias=config.use_bias) if shared else None
            self.mlp = SparseMoeBlock(router, Experts(n, h, inter, act), shared_experts=shared)


class Ernie4_5_MoeModel(DecoderModel):
    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__(config, Ernie4_5_MoeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class _ExpProbsB:
    """GGUF out: the correction bias under the name llama.cpp's converter maps to `exp_probs_b.bias` (it renames
    `e_score_correction_bias` to `e_score_correction.bias`); the reader's name comes back by the Rename below."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".moe_statics.e_score_correction_bias"):
            return None
        return [(name.removesuffix("_bias") + ".bias", t)]


def gguf_write_config(m: dict[str, Any], c: Ernie4_5_MoeConfig) -> None:
    """What llama.cpp's Ernie4_5MoeModel converter writes besides the layout's keys: TextModel's (no vocabulary
    size, no rope.dimension_count; the head size only where config.json has head_dim) and the shared experts'
    length as intermediate_size // num_key_value_heads, which is their size on the Hub's models; a model where it
    is not cannot be written (llama.cpp would build the shared experts at that size)."""
    m.pop("vocab_size", None)
    m.pop("rope.dimension_count", None)
    if c.head_dim == c.hidden_size // c.num_attention_heads:
        m.pop("attention.key_length", None)
        m.pop("attention.value_length", None)
    if c.moe_num_shared_experts:
        length = c.intermediate_size // c.num_key_value_heads
        if length != c.moe_num_shared_experts * c.moe_intermediate_size:
            raise ConfigError(
                "llama.cpp's converter writes the shared experts' length of an ernie4_5_moe model as "
                f"intermediate_size // num_key_value_heads ({length}), not moe_num_shared_experts * "
                f"moe_intermediate_size ({c.moe_num_shared_experts * c.moe_intermediate_size}): cannot be written"
            )
        m["expert_shared_feed_forward_length"] = length


class Ernie4_5_MoeForCausalLM(CausalLM):
    """transformers' Ernie4_5_MoeForCausalLM (the LM head has a bias where use_bias)."""

    config_class = Ernie4_5_MoeConfig
    checkpoint_rules = CheckpointRules(
        [
            *QWEN_MOE_RULES.rules,  # per-expert tensors on disk, stacked in the model
            Rename(r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics.", r"\.mlp\.gate\.moe_statics\.", ".mlp.moe_statics."),
            Rename(r"\.moe_statics\.e_score_correction\.bias$", ".moe_statics.e_score_correction_bias", r"(?!)", ""),
            _ExpProbsB(),
            Ignored(r"model\.mtp_.*"),  # the Hub's multi-token-prediction block
        ]
    )  # fmt: skip
    # llama.cpp's Ernie4_5MoeModel converter: TextModel's keys and tensor names (q/k not permuted: llama.cpp's
    # ernie4_5-moe rotates interleaved pairs too), the expert counts and lengths, leading_dense_block_count, the
    # experts stacked. Its graph runs every layer from leading_dense_block_count on as a mixture (no interval, no
    # end index: those read back as 1 and the last layer), reads no MLP, o_proj or head biases (use_bias), and
    # clamps the weights' sum at 2^-14 (the same as moe_norm_min 1e-12 for any sum of top-k softmax values).
    gguf = GGUFLayout(
        "ernie4_5-moe",
        config=(
            ("attention.key_length", "head_dim"),
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("interleave_moe_layer_step", "moe_layer_interval"),
            ("leading_dense_block_count", "moe_layer_start_index"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_count", "moe_num_shared_experts"),
        ),
        layer=(
            *GGUF_EXPERTS,
            ("exp_probs_b", "mlp.gate.moe_statics.e_score_correction"),
            ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
            ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
        ),
        fixed=(("use_bias", False), ("moe_layer_interval", 1), ("moe_norm_min", 1e-12)),
        write_config=gguf_write_config,
    )
    # transformers' base_model_tp_plan less its experts entries: nn.Experts cuts its own intermediate rows
    tp_patterns: ClassVar[dict[str, str]] = {
        **LLAMA_TP,
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["Ernie4_5_MoeDecoderLayer"]

    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__(config, Ernie4_5_MoeModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.use_bias)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """CausalLM's resizing, and the head's bias (use_bias) resized as transformers resizes it: added entries
        are the old entries' mean (zeros without mean_resizing)."""
        bias = self.lm_head.bias
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(self.lm_head, bias, emb.weight.shape[0], mean_resizing)
        return emb
