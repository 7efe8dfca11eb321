"""CTRL (Salesforce/ctrl): token embeddings `w` times sqrt(n_embd) (given inputs_embeds too, as transformers
scales them), plus fixed sinusoidal position encodings (sines of the even columns' angles, then cosines of the
odd columns', a table of n_positions rows); pre-norm layers (layernorm1 before the attention, layernorm2 before
the MLP, both at epsilon 1e-6 whatever the config says, as in transformers), multi-head attention with biased
Wq / Wk / Wv and `dense`, a ReLU MLP `ffn` (0: Linear, 1: ReLU, 2: Linear), a final `layernorm` at
layer_norm_epsilon, and an LM head tied to `w` with a bias of its own (`lm_head.bias`).

transformers' names: the body is `transformer` (w, h, layernorm), which autolm's code reaches as `model`, its
parts as `embed_tokens`, `layers` and `norm`. Dropouts change no inference and are kept as given. llama.cpp has no
CTRL: no GGUF.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig
from ..errors import ConfigError, GenerationError
from ..nn import Attention, CheckpointRules, Linear, Rename
from .base import CausalLM, DecoderModel
from .gpt2 import TokenTypeEmbeddings
from .xglm import NOT_WRITTEN, accept_json_names, check_fractions

_LAYER_EPS = 1e-6  # transformers' EncoderLayer norms: not config.layer_norm_epsilon


@dataclass(repr=False)
class CTRLConfig(PretrainedConfig):
    """transformers' CTRLConfig: config.json keeps CTRL's names (n_embd, dff, n_layer, n_head, n_positions,
    layer_norm_epsilon), which are also attributes and keyword arguments, as in transformers. The MLP's
    activation is ReLU (no field for it)."""

    model_type: ClassVar[str] = "ctrl"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "intermediate_size": "dff",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "rms_norm_eps": "layer_norm_epsilon",
    }
    activations: ClassVar[tuple[str, ...]] = ("relu",)
    # not in transformers' config: written only where set otherwise
    absent_keys: ClassVar[tuple[str, ...]] = ("hidden_act", "attention_dropout")

    vocab_size: int = 246534
    max_position_embeddings: int = 256
    hidden_size: int = 1280
    intermediate_size: int = 8192
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    hidden_act: str = "relu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from n_head and n_embd
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        check_fractions(self, ("resid_pdrop", "embd_pdrop"))

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # sinusoidal position encodings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            if key != "rms_norm_eps":  # written as layer_norm_epsilon
                out.pop(key, None)
        return out


accept_json_names(CTRLConfig)


def positional_encoding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """CTRL's encodings (B, T, dim) in float32 of positions (B, T), each row as transformers' table computes it:
    angle = position / 10000 ** (2 * (i // 2) / dim); sines of the even columns, then cosines of the odd ones."""
    i = torch.arange(dim, dtype=torch.int64, device=position_ids.device).float()
    rates = 1 / torch.pow(10000, (2 * (i // 2)) / dim)
    angles = position_ids.float().unsqueeze(-1) * rates
    return torch.cat([torch.sin(angles[..., 0::2]), torch.cos(angles[..., 1::2])], dim=-1)


class CTRLAttention(Attention):
    """Multi-head attention (no RoPE) with CTRL's names: Wq, Wk, Wv and the output `dense`, all biased."""

    def __init__(self, config: CTRLConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(config.hidden_size, n, n, config.head_dim, layer_idx, bias=True, rope=None)

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.Wq = Linear(hidden, hidden)
        self.Wk = Linear(hidden, hidden)
        self.Wv = Linear(hidden, hidden)
        self.dense = Linear(hidden, hidden)

    # Attention.forward's names for them
    q_proj = property(lambda self: self.Wq)
    k_proj = property(lambda self: self.Wk)
    v_proj = property(lambda self: self.Wv)
    o_proj = property(lambda self: self.dense)


class CTRLEncoderLayer(nn.Module):
    """transformers' EncoderLayer: x + attention(layernorm1(x)), then that + ffn(layernorm2(that))."""

    def __init__(self, config: CTRLConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.multi_head_attention = CTRLAttention(config, layer_idx)
        self.ffn = nn.Sequential(
            Linear(h, config.intermediate_size), nn.ReLU(), Linear(config.intermediate_size, h)
        )
        self.layernorm1 = nn.LayerNorm(h, eps=_LAYER_EPS)
        self.layernorm2 = nn.LayerNorm(h, eps=_LAYER_EPS)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.multi_head_attention(self.layernorm1(x), ctx)
        return x + self.ffn(self.layernorm2(x))


class CTRLModel(DecoderModel):
    """w, h, layernorm; `embed_tokens`, `layers` and `norm` name them (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "w", "layers": "h", "norm": "layernorm"}

    def __init__(self, config: CTRLConfig):
        super().__init__(config, CTRLEncoderLayer, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.embed_scale = math.sqrt(config.hidden_size)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors (embedded or given) times sqrt(n_embd), plus the encodings of their positions (B, T) (the
        padding mask's positions) in the vectors' dtype; a position past n_positions is a clear error (the table's
        end in transformers)."""
        n = self.config.max_position_embeddings
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(
                f"position {int(position_ids.max())} is past CTRL's {n} positions (n_positions): "
                "shorten the prompt or max_new_tokens"
            )
        return x * self.embed_scale + positional_encoding(position_ids, x.shape[-1]).to(x.dtype)


class CTRLLMHeadModel(TokenTypeEmbeddings, CausalLM):
    """transformers' CTRLLMHeadModel: the head's weight tied to `w` unless the config unties it; its bias is its
    own."""

    config_class = CTRLConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.h"
    embeddings_name = "transformer.w"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan for CTRL
    _no_split_modules: ClassVar[list[str]] = ["CTRLEncoderLayer"]
    checkpoint_rules = CheckpointRules(
        # files of the bare model name the body's tensors without "transformer."; saved with it
        [Rename(r"^(?=(w|h|layernorm)\.)", "transformer.", r"(?!)", "")]
    )

    def __init__(self, config: CTRLConfig):
        super().__init__(config, CTRLModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    @property
    def model(self) -> CTRLModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """CausalLM's resizing, and the head's bias to the new vocabulary as transformers resizes it: kept
        entries; added ones zero for a tied head, the old entries' mean for an untied one (zero without
        mean_resizing)."""
        bias, head = self.lm_head.bias, self.lm_head
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n = self.config.vocab_size
        if bias is not None and (self.lm_head.bias is None or self.lm_head.bias.shape[0] != n):
            keep = min(n, bias.shape[0])
            with torch.no_grad():
                new = bias.new_zeros(n)
                new[:keep] = bias[:keep]
                if mean_resizing and n > keep and self.lm_head is not head:  # a new (untied) head
                    new[keep:] = bias.float().mean().to(bias.dtype)
            self.lm_head.bias = nn.Parameter(new, requires_grad=bias.requires_grad)
            self.lm_head.out_features = n
        return emb
