"""OLMoE (AI2's OLMoE-1B-7B-0924 and its Instruct): Llama's pre-norm layers (RMSNorm with Llama's arithmetic) with
OLMo 2's q/k norms over the whole projection, optionally `clip_qkv` (q and k clamped after their norms, v after its
projection), and a sparse mixture of experts in every layer, with no shared expert. The router (`gate`) takes the
softmax over all experts in fp32, then the top k, renormalised only with `norm_topk_prob`.

transformers 5 holds the block as `mlp` with the router `mlp.gate` and stacked `mlp.experts.gate_up_proj`
(E, 2I, h; gate rows first) and `mlp.experts.down_proj` (E, h, I), the model's names; checkpoints on the Hub (and
transformers' save_pretrained) keep one gate/up/down tensor per expert (`mlp.experts.3.gate_proj.weight`), as
Qwen 2 MoE's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, Experts, GGUFLayout, RMSNorm, Router, SparseMoeBlock
from .base import CausalLM
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel, validate_experts
from .olmo2 import GGUF_FIXED, Olmo2Config, Olmo2ForCausalLM, gguf_write_text_model
from .qwen2_moe import QWEN_MOE_RULES

NORM_EPS = 1e-5  # llama.cpp's converter writes this RMS epsilon whatever config.json says


@dataclass(repr=False)
class OlmoeConfig(Olmo2Config):
    """transformers' OlmoeConfig: OLMo's fields and defaults, `clip_qkv`, and the experts (`num_experts`, which
    transformers also reads as num_local_experts); `intermediate_size` is each expert's."""

    model_type: ClassVar[str] = "olmoe"
    bool_fields: ClassVar[tuple[str, ...]] = (
        *Olmo2Config.bool_fields,
        "norm_topk_prob",
        "output_router_logits",
    )

    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    max_position_embeddings: int = 4096
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool = False

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ConfigError(
                f"{self.source}: num_experts must be a positive integer, found {self.num_experts!r}"
            )
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        c = self.clip_qkv
        if c is not None and not (_is_number(c) and c > 0):
            raise ConfigError(f"{self.source}: clip_qkv must be a positive number or null, found {c!r}")
        self.validate_head_dim()

    def validate_head_dim(self) -> None:
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(f"{self.source}: head_dim must be hidden_size / num_attention_heads "
                              f"({self.hidden_size} / {self.num_attention_heads}) in OLMoE (its q norm spans "
                              f"hidden_size), found {self.head_dim!r}")  # fmt: skip


class ClampedRMSNorm(RMSNorm):
    """RMSNorm whose output is clamped to [-clip, clip] (OLMoE clamps q and k after their norms)."""

    def __init__(self, dim: int, eps: float, clip: float):
        super().__init__(dim, eps)
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-self.clip, self.clip)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip={self.clip}"


class OlmoeAttention(Attention):
    """Attention with q/k norms over the whole projection; with clip_qkv, q and k clamped after their norms (the
    norms clamp) and v after its projection."""

    def __init__(self, config: OlmoeConfig, layer_idx: int):
        eps, clip = config.rms_norm_eps, None if config.clip_qkv is None else float(config.clip_qkv)
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, qk_norm="full",
                         norm=lambda dim: RMSNorm(dim, eps) if clip is None else ClampedRMSNorm(dim, eps, clip))  # fmt: skip
        self.clip_qkv = clip

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        c = self.clip_qkv
        return (q, k, v) if c is None else (q, k, v.clamp(-c, c))


class OlmoeDecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention (OlmoeAttention), then a pre-norm mixture of experts."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return OlmoeAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, n = config.hidden_size, config.num_experts
        router = Router(h, n, config.num_experts_per_tok, normalize=config.norm_topk_prob)
        return SparseMoeBlock(router, Experts(n, h, config.intermediate_size, config.hidden_act))


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's olmoe reads as many KV heads as the file says, but its k norm spans hidden_size (as its q norm):
    a file with fewer KV heads than heads does not load there, and is refused here too."""
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv is not None and kv != heads:
        raise ConfigError(f"llama.cpp's olmoe runs no grouped-query attention: num_key_value_heads "
                          f"(attention.head_count_kv {kv!r}) must equal num_attention_heads ({heads!r})")  # fmt: skip


def _gguf_write_config(m: dict[str, Any], c: OlmoeConfig) -> None:
    """llama.cpp's OlmoeModel converter: TextModel's keys, the RMS epsilon as 1e-5 whatever the config's."""
    gguf_write_text_model(m, c)
    m["attention.layer_norm_rms_epsilon"] = NORM_EPS


class OlmoeForCausalLM(CausalLM):
    """transformers' OlmoeForCausalLM."""

    config_class = OlmoeConfig
    checkpoint_rules = QWEN_MOE_RULES  # per-expert gate/up/down tensors on disk, stacked in the model
    # llama.cpp's OlmoeModel converter: TextModel's keys with the expert counts, no q/k permutation (NeoX RoPE),
    # q/k norms as attn_{q,k}_norm, the experts stacked into ffn_{gate,up,down}_exps; llama.cpp's olmoe weights the
    # top k unrenormalised, clamps nothing, runs no attention biases, no tied head and no GQA (_gguf_derive)
    gguf = GGUFLayout(
        "olmoe",
        config=(("expert_count", "num_experts"), ("expert_used_count", "num_experts_per_tok")),
        layer=GGUF_EXPERTS,
        fixed=(("norm_topk_prob", False), ("clip_qkv", None), *GGUF_FIXED),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    # As transformers: q/k/v gathered whole on every rank for the whole-projection norms (OLMo 2's attention
    # plan); the experts cut their own intermediate rows (nn.Experts.shard)
    tp_patterns: ClassVar[dict[str, str]] = {
        k: v for k, v in Olmo2ForCausalLM.tp_patterns.items() if ".self_attn." in k
    }
    _no_split_modules: ClassVar[list[str]] = ["OlmoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, MixtralModel(config, OlmoeDecoderLayer))

    shard_heads = Olmo2ForCausalLM.shard_heads  # every rank runs all heads: nothing to shard
