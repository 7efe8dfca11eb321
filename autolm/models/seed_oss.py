"""Seed-OSS (ByteDance Seed's Seed-OSS-36B): Llama's pre-norm decoder layers of grouped-query attention with RoPE,
a SiLU-gated MLP and RMSNorm, with biases on q/k/v (`attention_bias`, on by default) and a separate switch for the
o_proj bias (`attention_out_bias`, off by default), and a head size of its own (`head_dim`, 128 by default, not
hidden_size / num_attention_heads). Dropout on each sublayer's output (`residual_dropout`) while training only;
transformers' attention dropout (`attention_dropout`) is kept in the config and not applied, as in every autolm
family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig


@dataclass(repr=False)
class SeedOssConfig(LlamaConfig):
    """transformers' SeedOssConfig: its fields and defaults (Seed-OSS-36B's sizes)."""

    model_type: ClassVar[str] = "seed_oss"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("max_window_layers", "sliding_window", "use_sliding_window")
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "attention_out_bias")

    vocab_size: int = 155136
    hidden_size: int = 4096
    intermediate_size: int = 27648
    num_hidden_layers: int = 64
    num_attention_heads: int = 80
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 524288
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    attention_bias: bool = True
    attention_out_bias: bool = False
    attention_dropout: float = 0.1

    o_bias = property(lambda self: self.attention_out_bias)

    @property
    def residual_dropout(self) -> float:
        """Kept as config.json gives it (transformers' default 0.1 where it does not): a training setting, so a
        GGUF file (which has no key for it) describes the same model whatever it is."""
        return self.extra.get("residual_dropout", 0.1)

    @residual_dropout.setter
    def residual_dropout(self, value: float) -> None:
        self.extra["residual_dropout"] = value

    def validate(self) -> None:
        super().validate()
        v = self.residual_dropout
        if not _is_number(v) or not 0 <= v <= 1:
            raise ConfigError(f"{self.source}: residual_dropout must be a number in [0, 1], found {v!r}")

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Seed-OSS builds a plain causal mask whatever the config says


_dataclass_init = SeedOssConfig.__init__


def _init(self, **kwargs: Any) -> None:
    """SeedOssConfig(residual_dropout=0.1, ...) as in transformers: kept among config.json's other keys."""
    if "residual_dropout" in kwargs:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "residual_dropout": kwargs.pop("residual_dropout")}
    _dataclass_init(self, **kwargs)


SeedOssConfig.__init__ = _init


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p else x


class SeedOssDecoderLayer(nn.Module):
    def __init__(self, config: SeedOssConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            o_bias=config.attention_out_bias,
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.residual_dropout = float(config.residual_dropout)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        p, training = self.residual_dropout, self.training
        x = x + _dropout(self.self_attn(self.input_layernorm(x), ctx), p, training)
        return x + _dropout(self.mlp(self.post_attention_layernorm(x)), p, training)


class SeedOssModel(DecoderModel):
    def __init__(self, config: SeedOssConfig):
        super().__init__(config, SeedOssDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def _gguf_write_config(meta: dict[str, Any], config: SeedOssConfig) -> None:
    """GGUF out: TextModel's keys only (the head size as key/value length; no vocabulary size, no RoPE
    dimension count)."""
    meta.pop("vocab_size", None)
    meta.pop("rope.dimension_count", None)


class SeedOssForCausalLM(CausalLM):
    """transformers' SeedOssForCausalLM."""

    config_class = SeedOssConfig
    # llama.cpp's converter (SeedOssModel, TextModel's defaults): q/k rows not permuted (NeoX RoPE), the head size
    # as attention.key_length, post_attention_layernorm as blk.N.post_attention_norm; llama.cpp's seed_oss reads
    # q/k/v biases where the file has them, no o_proj bias and no MLP biases
    gguf = GGUFLayout(
        "seed_oss",
        config=(("attention.key_length", "head_dim"),),
        layer=(("post_attention_norm", "post_attention_layernorm"),),
        fixed=(("attention_bias", False), ("attention_out_bias", False), ("mlp_bias", False)),
        present=(("blk.0.attn_q.bias", "attention_bias"),),
        write_config=_gguf_write_config,
    )
    # transformers' base_model_tp_plan is Llama's: the default LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["SeedOssDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, SeedOssModel(config))
