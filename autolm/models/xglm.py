"""XGLM (Meta's facebook/xglm-564M ... 7.5B, multilingual): fairseq's decoder. Token embeddings times sqrt(d_model)
(`scale_embedding`), plus fixed sinusoidal position embeddings read two rows past each position (fairseq's padding
offset; the row at index pad_token_id is zero), OPT's pre-norm layer (LayerNorm with bias, q/k/v/out_proj with
biases, a GELU MLP fc1 -> fc2), a final LayerNorm (`model.layer_norm`) and a head tied to the embeddings.

config.json names the sizes fairseq's way (d_model, ffn_dim, num_layers, attention_heads, activation_function);
they are attributes under transformers' names too. dropout, attention_dropout, activation_dropout and layerdrop
change no inference and are kept as given. `add_cross_attention` (encoder attention in every layer) is refused:
autolm's models are decoders only. llama.cpp has no XGLM: no GGUF.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS
from .base import CausalLM, DecoderModel
from .opt import OPTDecoderLayer

_OFFSET = 2  # fairseq's position rows start at 2 (rows 0 and 1 were its padding)
# config fields these fairseq decoders' config.json does not have (no grouped KV heads, no RoPE, no epsilon)
NOT_WRITTEN = ("num_key_value_heads", "head_dim", "sliding_window", "rope_parameters", "rope_theta",
               "rope_scaling", "rms_norm_eps")  # fmt: skip


def check_fractions(config: PretrainedConfig, names: tuple[str, ...]) -> None:
    """Each named field (a dropout probability) must be a number in [0, 1]: a ConfigError naming it."""
    for name in names:
        v = getattr(config, name)
        if not (_is_number(v) and 0 <= v <= 1):
            raise ConfigError(f"{config.source}: {name} must be a number in [0, 1], found {v!r}")


@dataclass(repr=False)
class XGLMConfig(PretrainedConfig):
    """transformers' XGLMConfig: config.json's names d_model, ffn_dim, num_layers, attention_heads and
    activation_function are hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and hidden_act
    (attributes under both names). LayerNorm's epsilon is PyTorch's default (1e-5)."""

    model_type: ClassVar[str] = "xglm"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "intermediate_size": "ffn_dim",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "attention_heads",
        "hidden_act": "activation_function",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "scale_embedding",
        "add_cross_attention",
    )
    # OPT's layer as XGLM has it: pre-norm, biases everywhere, LayerNorms with weight and bias
    do_layer_norm_before: ClassVar[bool] = True
    enable_bias: ClassVar[bool] = True
    layer_norm_elementwise_affine: ClassVar[bool] = True

    vocab_size: int = 256008
    max_position_embeddings: int = 2048
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5  # nn.LayerNorm's default: XGLM's config has no epsilon
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = True
    decoder_start_token_id: int | None = 2
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        if self.hidden_size < 4:
            raise ConfigError(
                f"{self.source}: hidden_size must be at least 4 for XGLM's sinusoidal positions, "
                f"found {self.hidden_size!r}"
            )
        if self.add_cross_attention:
            raise ConfigError(
                f"{self.source}: add_cross_attention: XGLM with encoder attention is not a causal LM autolm runs"
            )
        check_fractions(self, ("dropout", "attention_dropout", "activation_dropout", "layerdrop"))
        p = self.pad_token_id
        if p is not None and not _is_int(p):
            raise ConfigError(f"{self.source}: pad_token_id must be an integer or null, found {p!r}")

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # sinusoidal position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            out.pop(key, None)
        return out


def accept_json_names(cls: type) -> None:
    """config.json's names for a config class's fields (its attribute_map) as attributes and as keyword
    arguments, as transformers' config class takes them."""
    for ours, theirs in cls.attribute_map.items():
        setattr(cls, theirs, property(lambda self, k=ours: getattr(self, k),
                                      lambda self, v, k=ours: setattr(self, k, v)))  # fmt: skip
    init, names = cls.__init__, {v: k for k, v in cls.attribute_map.items()}

    def __init__(self, **kwargs: Any) -> None:
        init(self, **{names.get(k, k): v for k, v in kwargs.items()})

    cls.__init__ = __init__


accept_json_names(XGLMConfig)


def sinusoidal_positions(position_ids: torch.Tensor, dim: int, padding_idx: int | None) -> torch.Tensor:
    """fairseq's sinusoidal embeddings (B, T, dim) in float32 of positions (B, T), read `_OFFSET` rows on: sines
    then cosines of position * 10000 ** (-i / (dim / 2 - 1)), a zero column for an odd dim, zero at the row
    `padding_idx`; computed as transformers' table computes each row."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=position_ids.device).float() * -step)
    rows = position_ids + _OFFSET
    angles = rows.float().unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(*emb.shape[:-1], 1)], dim=-1)
    if padding_idx is not None:
        emb = emb.masked_fill((rows == padding_idx).unsqueeze(-1), 0.0)
    return emb


class XGLMDecoderLayer(OPTDecoderLayer):
    """OPT's pre-norm layer: self_attn_layer_norm, self_attn (out_proj), final_layer_norm, fc1 -> act -> fc2."""


class XGLMModel(DecoderModel):
    """embed_tokens, embed_positions (a fixed table: no parameters, computed per position), layers, layer_norm;
    `norm` names layer_norm (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"norm": "layer_norm"}

    def __init__(self, config: XGLMConfig, layer_cls: type[nn.Module] = XGLMDecoderLayer):
        super().__init__(config, layer_cls, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings times sqrt(d_model) where scale_embedding (given inputs_embeds are not scaled, as in
        transformers)."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors plus the sinusoidal embeddings of their positions (B, T) (any position: the table has
        no end), cast to the vectors' dtype as transformers' table is."""
        pos = sinusoidal_positions(position_ids, x.shape[-1], self.config.pad_token_id)
        return x + pos.to(x.dtype)


class XGLMForCausalLM(CausalLM):
    """transformers' XGLMForCausalLM: the head tied to embed_tokens unless the config unties it."""

    config_class = XGLMConfig
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan for XGLM
    _no_split_modules: ClassVar[list[str]] = ["XGLMDecoderLayer"]

    def __init__(self, config: XGLMConfig):
        super().__init__(config, XGLMModel(config))
