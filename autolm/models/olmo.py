"""OLMo (AI2's first OLMo: OLMo-1B-hf, OLMo-7B-hf, OLMo-7B-0424-hf, OLMo 1.7): Llama's pre-norm decoder layers of
grouped-query attention with RoPE and a SiLU-gated MLP, but every norm is a LayerNorm with no weight and no bias
(no parameters at all; epsilon 1e-5 whatever config.json says, computed in fp32 and cast back), and, where
`clip_qkv` is set, queries, keys and values clamped to [-clip_qkv, clip_qkv] right after their projections.
Biases on q/k/v/o where `attention_bias`; the LM head tied or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, GGUFLayout
from .base import LLAMA_TP, CausalLM, DecoderModel

NORM_EPS = 1e-5  # transformers' OlmoLayerNorm (and llama.cpp's converter) fix it; no config key sets it


@dataclass(repr=False)
class OlmoConfig(PretrainedConfig):
    """transformers' OlmoConfig: its fields and defaults (OLMo-7B's sizes). It has no norm epsilon: rms_norm_eps
    is kept only where config.json has one, and changes nothing."""

    model_type: ClassVar[str] = "olmo"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "rms_norm_eps", "sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")

    vocab_size: int = 50304
    rms_norm_eps: float = NORM_EPS
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 50279
    attention_bias: bool = False
    clip_qkv: float | None = None

    def validate(self) -> None:
        super().validate()
        c = self.clip_qkv
        if c is not None and not (_is_number(c) and c > 0):
            raise ConfigError(f"{self.source}: clip_qkv must be a positive number or null, found {c!r}")

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' OLMo builds a plain causal mask whatever the config says


class OlmoLayerNorm(nn.Module):
    """LayerNorm over the last dimension without weight or bias, in fp32, cast back (transformers' arithmetic)."""

    def __init__(self, dim: int):
        super().__init__()
        self.normalized_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, None, None, NORM_EPS).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={NORM_EPS}"


class OlmoAttention(Attention):
    """Llama's attention; with clip_qkv, q, k and v clamped after their projections (before RoPE)."""

    def __init__(self, config: OlmoConfig, layer_idx: int):
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, layer_idx, bias=config.attention_bias)  # fmt: skip
        self.clip_qkv = None if config.clip_qkv is None else float(config.clip_qkv)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        c = self.clip_qkv
        if c is None:
            return q, k, v
        return q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)


class OlmoDecoderLayer(nn.Module):
    def __init__(self, config: OlmoConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.self_attn = OlmoAttention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = OlmoLayerNorm(h)
        self.post_attention_layernorm = OlmoLayerNorm(h)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class OlmoModel(DecoderModel):
    def __init__(self, config: OlmoConfig):
        super().__init__(config, OlmoDecoderLayer, OlmoLayerNorm(config.hidden_size))


def gguf_write_config(m: dict[str, Any], c: OlmoConfig) -> None:
    """As llama.cpp's OlmoModel writes it: TextModel's keys (no vocabulary size, head size or RMS epsilon: the
    config has none), the LayerNorm epsilon 1e-5, attention.clamp_kqv where clip_qkv is set."""
    for key in (
        "vocab_size",
        "rope.dimension_count",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
    ):
        m.pop(key, None)
    m["attention.layer_norm_epsilon"] = NORM_EPS


class OlmoForCausalLM(CausalLM):
    """transformers' OlmoForCausalLM."""

    config_class = OlmoConfig
    # llama.cpp's converter (OlmoModel): q/k rows permuted as Llama's, no norm tensors (the norms have none), the
    # clip as attention.clamp_kqv; llama.cpp's olmo reads no biases
    gguf = GGUFLayout(
        "olmo",
        config=(("attention.clamp_kqv", "clip_qkv"),),
        permute_qk=True,
        write_config=gguf_write_config,
    )
    # transformers' base_model_tp_plan for OLMo is Llama's (the clamp is elementwise: it holds on any split)
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["OlmoDecoderLayer"]

    def __init__(self, config: OlmoConfig):
        super().__init__(config, OlmoModel(config))
