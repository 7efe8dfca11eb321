"""Hunyuan dense (Tencent's Hunyuan-0.5B/1.8B/4B/7B): Llama's pre-norm decoder layers of grouped-query attention,
a SiLU-gated MLP (never biased) and RMSNorm, with an RMSNorm over each query head and each key head
(`query_layernorm`, `key_layernorm`) applied AFTER RoPE, and biases on q/k/v/o where `attention_bias`.

RoPE: the released configs give `rope_type: "dynamic"` with an `alpha` (NTK-aware scaling by a fixed alpha): the
base becomes rope_theta * alpha ** (head_dim / (head_dim - 2)) at every length, as transformers' Hunyuan computes
it (its "ntk_alpha"); "dynamic" without an alpha is the usual length-dependent dynamic NTK scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..config_fields import validate_rope
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from ..nn.rope import apply_rotary
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig

# llama.cpp's converter (HunYuanModel) for dynamic RoPE: the alpha it takes where the config gives none
CONVERTER_ALPHA = 50


def ntk_alpha_theta(rope: dict[str, Any], head_dim: int, alpha: float | None = None) -> float:
    """The RoPE base NTK-alpha scaling gives: rope_theta * alpha ** (head_dim / (head_dim - 2))."""
    alpha = rope.get("alpha") if alpha is None else alpha
    return float(rope["rope_theta"]) * alpha ** (head_dim / (head_dim - 2))


@dataclass(repr=False)
class HunYuanDenseV1Config(LlamaConfig):
    """transformers' HunYuanDenseV1Config: its fields and defaults (Hunyuan-7B's vocabulary and hidden size)."""

    model_type: ClassVar[str] = "hunyuan_v1_dense"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = (
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
        "mlp_bias",
    )

    vocab_size: int = 290943
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    eod_token_id: int | None = 3
    pretraining_tp: int = 1

    @property
    def ntk_alpha(self) -> bool:
        """Whether RoPE is NTK-alpha scaled (type "dynamic" with an alpha), fixed at every length."""
        rope = self.rope_parameters
        return rope.get("rope_type") == "dynamic" and bool(rope.get("alpha"))

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """NTK-alpha scaling as the default RoPE at its scaled base (what transformers' Hunyuan computes)."""
        if self.ntk_alpha:
            theta = ntk_alpha_theta(self.rope_parameters, self.head_dim)
            return {"default": {"rope_type": "default", "rope_theta": theta}}
        return {"default": self.rope_parameters}

    def validate(self) -> None:
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope.get("alpha") is not None:
            alpha = rope["alpha"]
            if not _is_number(alpha) or alpha <= 0:
                raise ConfigError(f"{self.source}: RoPE 'alpha' must be a positive number, found {alpha!r}")
            if not _is_int(self.head_dim) or self.head_dim <= 2:
                raise ConfigError(
                    f"{self.source}: head_dim must be an integer above 2 for NTK-alpha RoPE, found {self.head_dim!r}"
                )
        super().validate()
        validate_rope(rope, self.source)  # the config's own RoPE type and keys ("dynamic" needs a factor)
        eod = self.eod_token_id
        if eod is not None and not (_is_int(eod) and eod >= 0):
            raise ConfigError(
                f"{self.source}: eod_token_id must be a non-negative integer or null, found {eod!r}"
            )

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Hunyuan builds a plain causal mask whatever the config says


class HunYuanDenseV1Attention(Attention):
    """Attention with biases on q/k/v/o where `attention_bias`, and an RMSNorm over each query head and each key head
    (`query_layernorm`, `key_layernorm`) after RoPE rotates them."""

    def __init__(self, config: HunYuanDenseV1Config, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, bias=config.attention_bias)
        self.query_layernorm = RMSNorm(hd, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = ctx.rope[self.rope]
        q = self.query_layernorm(apply_rotary(q, cos, sin))
        k = self.key_layernorm(apply_rotary(k, cos, sin))
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.o_proj(y.reshape(B, T, nh * hd))


class HunYuanDenseV1DecoderLayer(nn.Module):
    def __init__(self, config: HunYuanDenseV1Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = HunYuanDenseV1Attention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class HunYuanDenseV1Model(DecoderModel):
    def __init__(self, config: HunYuanDenseV1Config):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, HunYuanDenseV1DecoderLayer, norm)


def _gguf_write_config(meta: dict[str, Any], c: HunYuanDenseV1Config) -> None:
    """As llama.cpp's HunYuanModel writes it: TextModel's keys (the head size as key/value length; no vocabulary
    size, no RoPE dimension count); for dynamic RoPE the NTK-alpha base (alpha 50 where the config gives none) and
    no scaling (type "none", factor 1). The converter writes 256k as the context length and the original one
    whatever the config says; the model's own length is written instead (the same for the 256k models), which
    llama.cpp reads alike and which reads back as the model's config."""
    meta.pop("vocab_size", None)
    meta.pop("rope.dimension_count", None)
    rope = c.rope_parameters
    if rope.get("rope_type") == "dynamic":
        meta["rope.freq_base"] = ntk_alpha_theta(rope, c.head_dim, rope.get("alpha") or CONVERTER_ALPHA)
        meta["rope.scaling.type"] = "none"
        meta["rope.scaling.factor"] = 1.0
        meta["rope.scaling.original_context_length"] = c.max_position_embeddings


class HunYuanDenseV1ForCausalLM(CausalLM):
    """transformers' HunYuanDenseV1ForCausalLM."""

    config_class = HunYuanDenseV1Config
    # llama.cpp's converter (HunYuanModel, TextModel's keys): q/k rows not permuted (NeoX RoPE), the per-head norms
    # as attn_q_norm / attn_k_norm (applied after RoPE there too), NTK-alpha RoPE as a plain base; llama.cpp's
    # hunyuan-dense reads no attention biases
    gguf = GGUFLayout(
        "hunyuan-dense",
        config=(("attention.key_length", "head_dim"),),
        layer=(("attn_q_norm", "self_attn.query_layernorm"), ("attn_k_norm", "self_attn.key_layernorm")),
        fixed=(("attention_bias", False),),
        write_config=_gguf_write_config,
    )
    # transformers' config has no base_model_tp_plan: Llama's (the per-head norms replicated)
    _no_split_modules: ClassVar[list[str]] = ["HunYuanDenseV1DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, HunYuanDenseV1Model(config))
