"""Phi (microsoft/phi-1, phi-1_5, phi-2): one LayerNorm (with bias) per layer whose output feeds attention and
the MLP in parallel (x + attn(ln(x)) + mlp(ln(x))), q/k/v and the output projection `dense` with biases, RoPE on
the first `partial_rotary_factor` of each head (0.5 unless config.json says otherwise; phi-2: 0.4), optional
per-head LayerNorms on queries and keys (`qk_layernorm`), a GELU MLP fc1 -> fc2 with biases, a final LayerNorm
(`model.final_layernorm`) and an untied LM head with a bias.

transformers' dropouts (resid_pdrop, embd_pdrop, attention_dropout) are kept in the config and not applied, as
in every autolm family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PartialRotaryConfig, PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GGUFLayout, Linear, resize_bias
from .base import CausalLM, DecoderModel


@dataclass(repr=False)
class PhiConfig(PartialRotaryConfig):
    """transformers' PhiConfig. The LayerNorms' epsilon is `layer_norm_eps`; partial_rotary_factor (top-level in
    transformers 4's config.json, inside rope_parameters in 5's) defaults to 0.5, as transformers sets it."""

    model_type: ClassVar[str] = "phi"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "rms_norm_eps", "sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "qk_layernorm")

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    qk_layernorm: bool = False

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{src}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )
        for name in ("resid_pdrop", "embd_pdrop"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                raise ConfigError(f"{src}: {name} must be a number in [0, 1], found {v!r}")


class PhiAttention(Attention):
    """Attention with Phi's names: q_proj, k_proj, v_proj and the output projection `dense`, all with biases;
    with qk_layernorm, LayerNorms over each head's queries and keys (`q_layernorm`, `k_layernorm`)."""

    def __init__(self, config: PhiConfig, layer_idx: int):
        hd = config.head_dim
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, hd,
                         layer_idx, bias=True)  # fmt: skip
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(hd, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(hd, eps=config.layer_norm_eps)
            self.qk_norm = "head"

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = Linear(hidden, nh * hd, bias=bias)
        self.k_proj = Linear(hidden, nkv * hd, bias=bias)
        self.v_proj = Linear(hidden, nkv * hd, bias=bias)
        self.dense = Linear(nh * hd, hidden, bias=o_bias)

    # Attention.forward's names for Phi's modules
    o_proj = property(lambda self: self.dense)
    q_norm = property(lambda self: self.q_layernorm)
    k_norm = property(lambda self: self.k_layernorm)


class PhiMLP(nn.Module):
    """fc2(act(fc1(x))), both with biases."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = Linear(hidden, intermediate)
        self.fc2 = Linear(intermediate, hidden)
        self.activation_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: PhiConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        return self.self_attn(h, ctx) + self.mlp(h) + x  # parallel residual, summed in transformers' order


class PhiModel(DecoderModel):
    """embed_tokens, layers, final_layernorm (the body's final norm under transformers' name)."""

    def __init__(self, config: PhiConfig):
        super().__init__(config, PhiDecoderLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.final_layernorm = self._modules.pop("norm")

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(x)


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's phi2 keys: rope.dimension_count is the rotary dimensions of a head of hidden / heads (all of
    them where the file does not say)."""
    heads, hidden, rotary = d.get("num_attention_heads"), d.get("hidden_size"), d.get("head_dim")
    if not (_is_int(heads) and heads > 0 and _is_int(hidden) and hidden % heads == 0):
        return  # the config's validation names the key
    head_dim = hidden // heads
    if rotary is None:
        rotary = head_dim
    if _is_int(rotary) and 0 < rotary <= head_dim:
        d.pop("head_dim")
        factor = rotary / head_dim
        while int(head_dim * factor) < rotary:  # the factor transformers' int(head_dim * factor) reads back
            factor = math.nextafter(factor, 2.0)
        d["rope_parameters"]["partial_rotary_factor"] = factor


def gguf_write_config(m: dict[str, Any], c: PhiConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's Phi2Model writes it: the rotary dimensions, the LayerNorm
    epsilon; no vocabulary size, head size or RMS epsilon, and no RoPE base where it is llama.cpp's default."""
    for key in (
        "vocab_size",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
    ):
        m.pop(key, None)
    if m.get("rope.freq_base") == 10000.0:
        m.pop("rope.freq_base")
    factor = c.rope_parameters["partial_rotary_factor"]
    m["rope.dimension_count"] = int(factor * c.hidden_size) // c.num_attention_heads


class PhiForCausalLM(CausalLM):
    """transformers' PhiForCausalLM: the LM head has a bias (`lm_head.bias`)."""

    config_class = PhiConfig
    # llama.cpp's Phi2Model: q/k/v as attn_q/k/v (not permuted: NeoX-style RoPE), no RoPE base (10000)
    gguf = GGUFLayout(
        "phi2",
        config=(("attention.layer_norm_epsilon", "layer_norm_eps"),),
        layer=(("attn_output", "self_attn.dense"), ("ffn_up", "mlp.fc1"), ("ffn_down", "mlp.fc2")),
        top=(("output_norm", "model.final_layernorm"),),
        derive=gguf_config,
        write_config=gguf_write_config,
    )
    # transformers' base_model_tp_plan for Phi
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.dense": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["PhiDecoderLayer"]

    def __init__(self, config: PhiConfig):
        super().__init__(config, PhiModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """CausalLM's resizing, and the head's bias resized as transformers resizes it: added entries are the old
        entries' mean (zeros without mean_resizing)."""
        bias = self.lm_head.bias
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(self.lm_head, bias, emb.weight.shape[0], mean_resizing)
        return emb
