"""Persimmon (adept/persimmon-8b-base, persimmon-8b-chat, Fuyu's language model): pre-norm layers of LayerNorm
(with bias), multi-head attention whose q/k/v are one fused `query_key_value` laid out per head as GPT-NeoX's
(with biases, the output projection `dense` too), a LayerNorm (with bias) over each head's queries and keys
(`qk_layernorm`, on by default), RoPE on the first `partial_rotary_factor` (0.5) of each head, a squared-ReLU MLP
`dense_h_to_4h` -> `dense_4h_to_h` with biases, a final LayerNorm (`model.final_layernorm`) and an untied head.

config.json spells RoPE the old way (rope_theta and partial_rotary_factor at the top level, Persimmon's files) or
the new one (rope_parameters); a config is written back in the spelling it was read in. transformers' dropouts
(hidden_dropout, attention_dropout) are kept in the config and not applied, as in every autolm family. llama.cpp
dropped its Persimmon architecture: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PartialRotaryConfig, PretrainedConfig, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS
from .base import CausalLM, DecoderModel
from .gpt_neox import GPTNeoXAttention, GPTNeoXMLP
from .image_text import ImageTextConfig


@dataclass(repr=False)
class PersimmonConfig(PartialRotaryConfig):
    """transformers' PersimmonConfig. The LayerNorms' epsilon is `layer_norm_eps`; partial_rotary_factor (top-level
    in Persimmon's config.json, inside rope_parameters in transformers 5's) defaults to 0.5. Persimmon has no
    grouped KV heads and no head_dim of its own (hidden_size / num_attention_heads)."""

    model_type: ClassVar[str] = "persimmon"
    rotary_factor: ClassVar[float] = 0.5
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = (
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "sliding_window",
    )
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "qk_layernorm")
    attention_bias: ClassVar[bool] = True  # q/k/v and dense always have biases (GPTNeoXAttention reads it)

    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        super().__post_init__()

    def _implied(self, f) -> Any:
        if f.name == "num_key_value_heads":
            return self.num_attention_heads
        return super()._implied(f)

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{src}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )
        if not _is_number(self.hidden_dropout) or not 0 <= self.hidden_dropout <= 1:
            raise ConfigError(
                f"{src}: hidden_dropout must be a number in [0, 1], found {self.hidden_dropout!r}"
            )


class PersimmonAttention(GPTNeoXAttention):
    """GPT-NeoX's attention (`query_key_value` per head, `dense`, biases); with qk_layernorm, one LayerNorm (with
    bias) shared by the heads over each head's queries (`q_layernorm`) and keys (`k_layernorm`), before RoPE."""

    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(config.head_dim, eps=config.layer_norm_eps)
            self.qk_norm = "head"

    # Attention.forward's names for Persimmon's q/k norms
    q_norm = property(lambda self: self.q_layernorm)
    k_norm = property(lambda self: self.k_layernorm)


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return self.mlp(self.post_attention_layernorm(x)) + x


class PersimmonModel(DecoderModel):
    """embed_tokens, layers, final_layernorm; `norm` names final_layernorm (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: PersimmonConfig):
        super().__init__(
            config, PersimmonDecoderLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )


class FuyuConfig(ImageTextConfig):
    """transformers' FuyuConfig (Fuyu): its language model's, a Persimmon (Fuyu's files keep its settings at the top
    level); the head untied by default. Text goes through the language model as it is (the patch embedding skipped)."""

    model_type: ClassVar[str] = "fuyu"
    text_class: ClassVar[type] = PersimmonConfig
    tie_default: ClassVar[bool | None] = False
    flat: ClassVar[bool] = True


class PersimmonForCausalLM(CausalLM):
    """transformers' PersimmonForCausalLM (the head untied unless the config ties it)."""

    config_class = PersimmonConfig
    # none, as in transformers (PersimmonConfig declares no base_model_tp_plan): tp_plan="auto" is refused
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["PersimmonDecoderLayer"]

    def __init__(self, config: PersimmonConfig):
        super().__init__(config, PersimmonModel(config))
