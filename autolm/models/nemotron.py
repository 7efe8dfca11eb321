"""Nemotron (nvidia/Minitron-4B-Base, Minitron-8B-Base, Nemotron-Mini-4B-Instruct, Nemotron-4-340B): pre-norm
layers of "LayerNorm1P" (a LayerNorm with bias whose weight is used as 1 + w, computed in the input's dtype),
grouped-query attention with optional biases on q/k/v/o (`attention_bias`) and RoPE on the first half of each head
(`partial_rotary_factor`, 0.5 by default), a plain MLP `up_proj -> relu2 (squared ReLU) -> down_proj` with
optional biases (`mlp_bias`), a final LayerNorm1P and an untied head.

config.json names the norms' epsilon `norm_eps`. transformers' attention_dropout is kept in the config and not
applied, as in every autolm family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PartialRotaryConfig, PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, MLP, Attention, GGUFLayout
from .base import LLAMA_TP, CausalLM, DecoderModel


@dataclass(repr=False)
class NemotronConfig(PartialRotaryConfig):
    """transformers' NemotronConfig: its fields and defaults (Nemotron-15B's sizes). partial_rotary_factor
    (top-level in transformers 4's config.json, inside rope_parameters in 5's) defaults to 0.5, as transformers
    sets it."""

    model_type: ClassVar[str] = "nemotron"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("rms_norm_eps", "sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "mlp_bias")

    vocab_size: int = 256000
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 32
    num_attention_heads: int = 48
    hidden_act: str = "relu2"
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    attention_bias: bool = False
    mlp_bias: bool = False

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_number(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise ConfigError(f"{src}: norm_eps must be a positive number below 1, found {self.norm_eps!r}")


class NemotronLayerNorm1P(nn.LayerNorm):
    """transformers' NemotronLayerNorm1P: F.layer_norm with weight 1 + w (the stored weight starts near zero) and
    the bias, all in the input's dtype (no upcast), as transformers computes it outside autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class NemotronDecoderLayer(nn.Module):
    def __init__(self, config: NemotronConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
        )
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = NemotronLayerNorm1P(h, eps=eps)
        self.post_attention_layernorm = NemotronLayerNorm1P(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class NemotronModel(DecoderModel):
    """embed_tokens, layers, norm (a LayerNorm1P)."""

    def __init__(self, config: NemotronConfig):
        norm = NemotronLayerNorm1P(config.hidden_size, eps=config.norm_eps)
        super().__init__(config, NemotronDecoderLayer, norm)


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's nemotron keys: the head size is attention.key_length where the file has it (hidden / heads
    where not); rope.dimension_count is the rotary dimensions, read back as the partial_rotary_factor that
    transformers' int(head_dim * factor) turns into them."""
    heads, hidden, rotary = d.get("num_attention_heads"), d.get("hidden_size"), d.pop("head_dim", None)
    if not (_is_int(heads) and heads > 0 and _is_int(hidden)):
        return  # the config's validation names the key
    head_dim = get("attention.key_length")
    if _is_int(head_dim) and head_dim > 0:
        d["head_dim"] = head_dim
    elif hidden % heads == 0:
        head_dim = hidden // heads
    else:
        return
    if rotary is None:
        rotary = head_dim
    if _is_int(rotary) and 0 < rotary <= head_dim:
        factor = rotary / head_dim
        while int(head_dim * factor) < rotary:
            factor = math.nextafter(factor, 2.0)
        d["rope_parameters"]["partial_rotary_factor"] = factor


def gguf_write_config(m: dict[str, Any], c: NemotronConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's NemotronModel writes it: TextModel's keys (the head size, as
    config.json always holds head_dim), the vocabulary size, the LayerNorm epsilon (no RMS one), the rotary
    dimensions as int(factor * hidden) // heads, and the RoPE scaling type ("none", or linear with its factor)."""
    m.pop("attention.layer_norm_rms_epsilon", None)
    rope = c.rope_parameters
    m["rope.dimension_count"] = int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads
    if rope.get("factor") is None:
        m["rope.scaling.type"] = "none"
    else:
        m["rope.scaling.type"], m["rope.scaling.factor"] = "linear", float(rope["factor"])


class NemotronForCausalLM(CausalLM):
    """transformers' NemotronForCausalLM (the head untied unless the config ties it)."""

    config_class = NemotronConfig
    # llama.cpp's NemotronModel: Llama's tensor names, q/k not permuted (NeoX-style RoPE), 1 added to every norm
    # weight (LayerNorm1P stored as 1 + w; biases as they are), biases read off the tensors
    gguf = GGUFLayout(
        "nemotron",
        config=(("attention.layer_norm_epsilon", "norm_eps"),),
        norm_shift=1.0,
        present=(("blk.0.attn_q.bias", "attention_bias"), ("blk.0.ffn_up.bias", "mlp_bias")),
        derive=gguf_config,
        write_config=gguf_write_config,
    )
    # transformers' base_model_tp_plan: attention as Llama's, up_proj split by output features, down_proj by input
    tp_patterns: ClassVar[dict[str, str]] = {
        **{k: v for k, v in LLAMA_TP.items() if ".self_attn." in k},
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["NemotronDecoderLayer"]

    def __init__(self, config: NemotronConfig):
        super().__init__(config, NemotronModel(config))
