"""Jais 2 (inceptionai/Jais-2-8B-Chat and its 70B): Llama's pre-norm layer (grouped-query attention with full RoPE,
biases on q/k/v/o with `attention_bias`, true by default) with LayerNorms (weight and bias, `layer_norm_eps`) in
place of the RMSNorms and Nemotron's MLP (`up_proj` -> relu2, squared ReLU -> `down_proj`, biases with `mlp_bias`,
true by default); a final LayerNorm and an untied head. No sliding window.

llama.cpp's converter (Jais2Model, conversion/jais.py) writes it as "jais2": TextModel's keys (the head size as
key/value length, the LayerNorm epsilon; no vocabulary size), the rotary dimensions as the head size, q/k not
permuted (NeoX-style RoPE). Its graph loads every bias (attention's and the MLP's): a model without them is refused
on GGUF out (a file without them on GGUF in), as is Llama 3's RoPE scaling, which the converter drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, MLP, GGUFLayout
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig, LlamaDecoderLayer
from .nemotron import NemotronForCausalLM


@dataclass(repr=False)
class Jais2Config(LlamaConfig):
    """transformers' Jais2Config: Llama's fields with Jais-2-8B's sizes, relu2, both biases on, `layer_norm_eps`
    (no rms_norm_eps, no pretraining_tp)."""

    model_type: ClassVar[str] = "jais2"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "max_window_layers",
        "rms_norm_eps",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 150272
    hidden_size: int = 3328
    intermediate_size: int = 26624
    num_attention_heads: int = 26
    hidden_act: str = "relu2"
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 150024
    attention_bias: bool = True
    mlp_bias: bool = True

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Jais 2 attends over the whole context in every layer

    def validate(self) -> None:
        super().validate()
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{self.source}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )


class Jais2DecoderLayer(LlamaDecoderLayer):
    """Llama's layer (its attention and forward) with LayerNorms and Nemotron's ungated MLP."""

    def __init__(self, config: Jais2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.layer_norm_eps
        self.mlp = MLP(h, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)


class Jais2Model(DecoderModel):
    """embed_tokens, layers, norm (a LayerNorm)."""

    def __init__(self, config: Jais2Config):
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        super().__init__(config, Jais2DecoderLayer, norm)


def _gguf_write_config(m: dict[str, Any], c: Jais2Config) -> None:
    """Jais2Model.set_gguf_parameters: TextModel's keys (no vocabulary size, no RMS epsilon) and the rotary
    dimensions as the head size (as autolm writes them). It writes no rope_freqs: Llama 3's RoPE scaling cannot go
    out."""
    m.pop("attention.layer_norm_rms_epsilon", None)
    m.pop("vocab_size", None)
    if (c.rope_parameters or {}).get("rope_type") == "llama3":
        raise ConfigError(
            f"llama.cpp's 'jais2' format cannot hold this {c.model_type!r} model: its converter drops Llama 3's "
            "RoPE scaling (rope_parameters)"
        )


def _gguf_derive(d: dict[str, Any], get: Any) -> None:
    """llama.cpp's jais2 graph loads the attention output's and the MLP's biases: a file without them fails
    there."""
    missing = [name for name in ("attention_bias", "mlp_bias") if not d.get(name)]
    if missing:
        raise ConfigError(f"llama.cpp's 'jais2' needs the attention and MLP biases: {', '.join(missing)}")


class Jais2ForCausalLM(CausalLM):
    """transformers' Jais2ForCausalLM."""

    config_class = Jais2Config
    # llama.cpp's Jais2Model: Llama's tensor names, q/k not permuted (NeoX-style RoPE), the LayerNorms' biases as
    # *_norm.bias, the attention and MLP biases read off the tensors (required by llama.cpp's graph)
    gguf = GGUFLayout(
        "jais2",
        config=(("attention.layer_norm_epsilon", "layer_norm_eps"),),
        fixed=(("attention_bias", False), ("mlp_bias", False)),
        present=(("blk.0.attn_output.bias", "attention_bias"), ("blk.0.ffn_up.bias", "mlp_bias")),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    # transformers' base_model_tp_plan: Nemotron's (attention as Llama's, up_proj by output features, down_proj by input)
    tp_patterns: ClassVar[dict[str, str]] = NemotronForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Jais2DecoderLayer"]

    def __init__(self, config: Jais2Config):
        super().__init__(config, Jais2Model(config))
