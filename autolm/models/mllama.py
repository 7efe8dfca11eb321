"""Mllama's text model (Llama 3.2 Vision's language model: model_type mllama_text_model, and the language model of
the image-text checkpoints, model_type mllama, meta-llama/Llama-3.2-11B-Vision and 90B).

Llama 3's decoder (pre-norm grouped-query attention with RoPE, no biases, a SiLU-gated MLP, RMSNorm; head_dim always
hidden_size / num_attention_heads, RoPE base 500000 where config.json gives none) with, at the indices
`cross_attention_layers` lists (by default 3, 8, ..., 38), a cross-attention layer instead
(MllamaCrossAttentionDecoderLayer): its queries attend to the image's projected vision states (q/k per-head RMS
norms `q_norm` / `k_norm`), and its attention and MLP outputs are added through tanh gates (`cross_attn_attn_gate`,
`cross_attn_mlp_gate`). The embeddings have vocab_size + 8 rows (the image token and spares), the head vocab_size;
transformers never ties them (a config that asks is refused, naming tie_word_embeddings).

Text only: autolm runs no image inputs. Without cross_attention_states and with nothing cached for the layer,
transformers' MllamaTextModel skips each cross-attention layer entirely (its output is its input, it records no
hidden state or attention and keeps no cache entry), and so does autolm; their weights load and save under
transformers' names all the same. forward() refuses image inputs (cross_attention_states, pixel_values, ...) by name.
transformers' `dropout` is kept in the config and not applied, as in every autolm family.

llama.cpp has no Mllama architecture (its converter writes no text model of it): no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError, GenerationError
from ..nn import GatedMLP, Linear, RMSNorm, embedding
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig
from .llama import LlamaDecoderLayer

_CROSS_DEFAULT = [3, 8, 13, 18, 23, 28, 33, 38]
# the inputs of transformers' Mllama forward that carry an image: autolm runs the text model alone
IMAGE_INPUTS = ("cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask", "pixel_values",
                "aspect_ratio_ids", "aspect_ratio_mask")  # fmt: skip


@dataclass(repr=False)
class MllamaTextConfig(PretrainedConfig):
    """transformers' MllamaTextConfig: its fields and defaults (Llama 3.2 11B Vision's language model)."""

    model_type: ClassVar[str] = "mllama_text_model"
    # not in transformers' config: written when set (head_dim only as hidden_size / num_attention_heads)
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "attention_dropout", "sliding_window")
    default_theta: ClassVar[float] = 500000.0

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = 128004
    cross_attention_layers: list[int] | None = None
    dropout: float = 0.0
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    def __post_init__(self) -> None:
        if self.cross_attention_layers is None:
            self.cross_attention_layers = list(_CROSS_DEFAULT)  # as transformers fills it in
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    # what Llama's decoder layer asks of its config: Mllama's self-attention layers have no biases or q/k norms
    qkv_bias = o_bias = qk_norm = mlp_bias = property(lambda self: False)

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Mllama builds a plain causal mask whatever the config says

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + 8  # the image token and spares; the head has vocab_size rows

    def is_cross(self, i: int) -> bool:
        """Whether layer i is a cross-attention layer (skipped on text)."""
        return i in self.cross_attention_layers

    def validate(self) -> None:
        super().validate()
        src, layers = self.source, self.cross_attention_layers
        if not isinstance(layers, list) or not all(_is_int(i) for i in layers):
            raise ConfigError(
                f"{src}: cross_attention_layers must be a list of layer indices, found {layers!r}"
            )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"{src}: head_dim must be hidden_size / num_attention_heads "
                              f"({self.hidden_size // self.num_attention_heads}) in Mllama, found {self.head_dim!r}")  # fmt: skip
        if not _is_number(self.dropout) or not 0 <= self.dropout <= 1:
            raise ConfigError(f"{src}: dropout must be a number in [0, 1], found {self.dropout!r}")
        if self.tie_word_embeddings:
            raise ConfigError(f"{src}: tie_word_embeddings must be false: Mllama's embeddings have vocab_size + 8 "
                              "rows and its head vocab_size, and transformers never ties them")  # fmt: skip


class MllamaConfig(ImageTextConfig):
    """transformers' MllamaConfig (model_type mllama: Llama 3.2 Vision's image-text checkpoints): its language model,
    text_config read as a MllamaTextConfig, as transformers' AutoModelForCausalLM builds a MllamaForCausalLM from
    it; loading skips the vision model's and projector's tensors. Saved, it is the text model
    (mllama_text_model)."""

    model_type: ClassVar[str] = "mllama"
    text_class: ClassVar[type] = MllamaTextConfig

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool | None:
        return None  # MllamaForCausalLM reads text_config alone (and never ties)


class MllamaTextCrossAttention(nn.Module):
    """The cross-attention's weights under transformers' names: q/k/v/o projections without biases and the per-head
    RMS norms of queries and keys. The keys and values would come from an image's vision states, which autolm does
    not compute: the layer holding it is skipped on text, as transformers skips it."""

    def __init__(self, config: MllamaTextConfig):
        super().__init__()
        h, d, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
        self.q_proj = Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = Linear(config.num_attention_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, eps)
        self.k_norm = RMSNorm(d, eps)


class MllamaSelfAttentionDecoderLayer(LlamaDecoderLayer):
    """transformers' MllamaSelfAttentionDecoderLayer: Llama's decoder layer."""


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """transformers' MllamaCrossAttentionDecoderLayer (its modules and tanh gates). On text (no image states, none
    cached) transformers skips it: its output is its input. MllamaTextModel.run skips it too; the one-token graphs,
    built one per layer, run it as that."""

    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.cross_attn = MllamaTextCrossAttention(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return x  # text only: transformers' MllamaTextModel skips the layer


def _layer(config: MllamaTextConfig, i: int) -> nn.Module:
    cls = MllamaCrossAttentionDecoderLayer if config.is_cross(i) else MllamaSelfAttentionDecoderLayer
    return cls(config, i)


class MllamaTextModel(DecoderModel):
    def __init__(self, config: MllamaTextConfig):
        super().__init__(config, _layer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embed_tokens = embedding(config.embedding_rows, config.hidden_size)

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        """DecoderModel.run over the self-attention layers: transformers' text-only path skips the
        cross-attention layers (no hidden state recorded for them)."""
        for i, layer in enumerate(self.layers):
            if self.config.is_cross(i):
                continue
            if hidden_states is not None:
                hidden_states.append(self.shown(x))
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        x = self.final_norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


class MllamaForCausalLM(CausalLM):
    """transformers' MllamaForCausalLM, text only (see the module docstring)."""

    config_class = MllamaTextConfig
    _no_split_modules: ClassVar[list[str]] = [
        "MllamaCrossAttentionDecoderLayer",
        "MllamaSelfAttentionDecoderLayer",
    ]

    def __init__(self, config: MllamaTextConfig):
        super().__init__(config, MllamaTextModel(config))

    def forward(self, *args, **kwargs):
        """CausalLM's forward; image inputs (transformers' cross_attention_states, ...) are refused by name."""
        given = [k for k in IMAGE_INPUTS if kwargs.get(k) is not None]
        if given:
            raise GenerationError(f"MllamaForCausalLM: {', '.join(given)}: autolm runs Mllama's text model alone "
                                  "(its cross-attention layers are skipped, as transformers does without images)")  # fmt: skip
        return super().forward(*args, **kwargs)
