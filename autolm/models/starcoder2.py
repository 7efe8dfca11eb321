"""StarCoder 2 (BigCode): pre-norm decoder layers of LayerNorm (with bias), grouped-query attention with RoPE and
biases on q/k/v/o (`use_bias`), and a plain MLP `c_fc -> gelu_pytorch_tanh -> c_proj` (biases too); a sliding
window on every layer where one is set, the LM head tied to the embeddings by default. Dropout on the
embeddings (`embedding_dropout`) and on each sublayer's output (`residual_dropout`) while training only.

config.json names the norms' epsilon `norm_epsilon`; it is also an attribute here, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GGUFLayout, Linear
from .base import LLAMA_TP, CausalLM, DecoderModel

_DROPOUTS = ("residual_dropout", "embedding_dropout")


@dataclass(repr=False)
class Starcoder2Config(PretrainedConfig):
    """transformers' Starcoder2Config: its fields and defaults (starcoder2-7b's sizes)."""

    model_type: ClassVar[str] = "starcoder2"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "norm_epsilon"}
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim",)  # not in transformers' config: written when set
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "use_bias")

    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: int | None = 2
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    use_bias: bool = True

    def validate(self) -> None:
        eps = self.rms_norm_eps
        if not _is_number(eps) or not 0 < eps < 1:
            raise ConfigError(f"{self.source}: norm_epsilon must be a positive number below 1, found {eps!r}")
        super().validate()
        for name in _DROPOUTS:
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                raise ConfigError(f"{self.source}: {name} must be a number in [0, 1], found {v!r}")

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window  # every layer, when set (transformers reads no layer_types here)

    norm_epsilon = property(lambda self: self.rms_norm_eps, lambda self, v: setattr(self, "rms_norm_eps", v))


_dataclass_init = Starcoder2Config.__init__


def _init(self, **kwargs: Any) -> None:
    """Starcoder2Config(norm_epsilon=1e-5, ...) as in transformers: config.json's name as an argument too."""
    if "norm_epsilon" in kwargs:
        kwargs["rms_norm_eps"] = kwargs.pop("norm_epsilon")
    _dataclass_init(self, **kwargs)


Starcoder2Config.__init__ = _init


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p else x


class Starcoder2MLP(nn.Module):
    """c_proj(act(c_fc(x))) with biases where use_bias, as transformers' Starcoder2MLP (its residual dropout is
    the decoder layer's here)."""

    def __init__(self, hidden: int, inner: int, act: str, bias: bool):
        super().__init__()
        self.c_fc = Linear(hidden, inner, bias=bias)
        self.c_proj = Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config: Starcoder2Config, layer_idx: int):
        super().__init__()
        h, eps, bias = config.hidden_size, config.norm_epsilon, config.use_bias
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=bias,
            window=config.layer_window(layer_idx),
        )
        self.mlp = Starcoder2MLP(h, config.intermediate_size, config.hidden_act, bias)
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.residual_dropout = float(config.residual_dropout)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        p, training = self.residual_dropout, self.training
        x = x + _dropout(self.self_attn(self.input_layernorm(x), ctx), p, training)
        return x + _dropout(self.mlp(self.post_attention_layernorm(x)), p, training)


class Starcoder2Model(DecoderModel):
    def __init__(self, config: Starcoder2Config):
        norm = nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)
        super().__init__(config, Starcoder2DecoderLayer, norm)
        self.embedding_dropout = float(config.embedding_dropout)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The input vectors (embedded or given), dropped out while training."""
        return _dropout(x, self.embedding_dropout, self.training)


def _gguf_metadata(meta: dict[str, Any], config: Starcoder2Config) -> None:
    """GGUF out: TextModel's keys only; the norms are LayerNorms (layer_norm_epsilon), not RMSNorms."""
    meta.pop("attention.layer_norm_rms_epsilon", None)
    meta.pop("attention.sliding_window", None)


def _gguf_derive(d: dict[str, Any], get: Any) -> None:
    """llama.cpp's starcoder2 loads every bias (q/k/v/o, the MLP's, the norms'): a file without them fails there."""
    if not d.get("use_bias"):
        raise ConfigError("llama.cpp's 'starcoder2' needs the attention and MLP biases: use_bias")


class Starcoder2ForCausalLM(CausalLM):
    """transformers' Starcoder2ForCausalLM."""

    config_class = Starcoder2Config
    # llama.cpp's converter (its StarCoder2Model is TextModel's defaults): layer_norm_epsilon, no q/k permutation,
    # c_fc / c_proj as ffn_up / ffn_down, biases (llama.cpp's graph needs them), no sliding window (its graph attends
    # over the whole context: a model with one goes out with a warning, gguf_plan.check)
    gguf = GGUFLayout(
        "starcoder2",
        config=(("attention.layer_norm_epsilon", "norm_epsilon"),),
        layer=(("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")),
        fixed=(("use_bias", False), ("sliding_window", None)),
        present=(("blk.0.attn_q.bias", "use_bias"),),
        derive=_gguf_derive,
        write_config=_gguf_metadata,
    )
    # transformers' base_model_tp_plan: attention as Llama's, c_fc split by output features, c_proj by input
    tp_patterns: ClassVar[dict[str, str]] = {
        **{k: v for k, v in LLAMA_TP.items() if ".self_attn." in k},
        "layers.*.mlp.c_fc": "colwise",
        "layers.*.mlp.c_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["Starcoder2DecoderLayer"]

    def __init__(self, config: Starcoder2Config):
        super().__init__(config, Starcoder2Model(config))
